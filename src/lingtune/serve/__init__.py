"""Serving: a BentoML service (service.py) around vLLM's own OpenAI-compatible server (app.py),
task endpoints for sentiment and NER (tasks.py), and a request guard (guard.py)."""
