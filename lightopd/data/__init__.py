"""Data on disk and its way to tensors: stores (store.py: formats and the manifest; reader.py:
verified reads; writer.py: atomic writes; lock.py: one run per output), the training stream of
prompt groups (stream.py), prompt files (prompts.py), and batching (batching.py)."""
