"""lingtune: from Chinese corpora to a private, OpenAI-compatible endpoint."""

__version__ = "0.1.0"
