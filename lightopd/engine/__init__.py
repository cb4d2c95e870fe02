"""Models at work: loading them (models.py), logits at chosen positions (forward.py), the sampling
distribution (sampling.py), the HF decoding loop (generate.py) and a teacher reduced to per-token
statistics (scoring.py)."""
