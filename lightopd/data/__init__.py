"""Data on disk and its way to tensors: stores (store.py reads, writer.py writes), the training
stream of prompt groups (stream.py), prompt files (prompts.py), and batching (batching.py)."""
