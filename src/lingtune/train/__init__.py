"""Training: data loading, SFT (Lightning), and later RL (TRL)."""
