"""Corpora, the neutral format, the prompt template, and the prepare/validate stages."""
