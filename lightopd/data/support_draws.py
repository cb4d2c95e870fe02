"""The random numbers behind a teacher store's sampled support (score-teacher --support-samples).

Each row gets its own counter-based stream (Philox), keyed by a hash of the seed, its prompt id
and its sample index: position t of a row reads the stream's uniforms t·M to (t + 1)·M − 1. So a
row's draws depend on nothing else (not on batching, worker, device or the rows beside it), and a
re-scored row draws the same tokens wherever its teacher scores it the same. The uniforms are
float64 in [0, 1), so a token's chance of being drawn is resolved to 2^-53, far below any
probability float32 logits can express; the inverse-CDF step that turns them into token ids is
objectives/stats.py's `draw_support`.
"""

from __future__ import annotations

import hashlib

import numpy as np


def row_key(seed: int, prompt_id: str, sample_index: int) -> np.ndarray:
    """The Philox key (two uint64) of one row's stream."""
    digest = hashlib.sha256(f"lightopd.support\0{seed}\0{prompt_id}\0{sample_index}".encode()).digest()
    return np.frombuffer(digest[:16], dtype=np.uint64).copy()


def row_uniforms(seed: int, prompt_id: str, sample_index: int, positions: int, m: int) -> np.ndarray:
    """[positions, m] float64 uniforms in [0, 1) of one row."""
    generator = np.random.Generator(np.random.Philox(key=row_key(seed, prompt_id, sample_index)))
    return generator.random((positions, m))
