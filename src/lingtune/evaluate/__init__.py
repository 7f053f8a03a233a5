"""Evaluation: metrics, the vLLM engine, `lingtune eval` and the evaluate stage."""
