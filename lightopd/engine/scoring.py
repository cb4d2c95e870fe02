"""A teacher reduced to per-token statistics: sampled-token log-prob, top-k, tail log-mass, entropy
and, optionally, m tokens per position drawn from its distribution with their log-probs.

The decoder runs once per batch; its hidden states at completion positions go through the
output layer a chunk of positions at a time (engine.chunks, as in training), so the float32
logits in memory never exceed `chunk_elements` entries (a [tokens × vocab] array never exists). Every statistic is of
softmax(logits / temperature) over the full vocabulary (objectives.stats). The draws of each row
come from its own stream of uniforms (data/support_draws.py), so they do not depend on batching.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lightopd.data.batching import pack_rows
from lightopd.data.support_draws import row_uniforms
from lightopd.engine.chunks import over_chunks
from lightopd.engine.forward import PositionLogits
from lightopd.errors import NonFiniteLogits
from lightopd.objectives.stats import SPLIT, LogprobStats, logprob_stats


class Scorer:
    """Per-token teacher statistics for batches of (prompt ids, completion ids) rows."""

    unavailable: tuple[str, ...] = ()  # teacher columns it cannot fill (it fills them all)

    def __init__(self, model, vocab: int, k: int, temperature: float, chunk_elements: int,
                 support_samples: int = 0, support_seed: int = 0):
        """Statistics over the first `vocab` ids (the tokenizer's; padded output rows are left out);
        with `support_samples` m, m draws per position."""
        self.k = k
        self.temperature = temperature
        self.support_samples, self.support_seed = support_samples, support_seed
        self.positions = PositionLogits(model, vocab)
        self.chunk_positions = max(1, chunk_elements // self.positions.vocab)

    @torch.inference_mode()
    def score(self, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
              keys: Sequence[tuple[str, int]] = ()) -> list[LogprobStats]:
        """Statistics at each completion position of each row (right-padded batch), on the CPU; `keys`
        (each row's prompt id and sample index) seed the draws of a sampled support."""
        lengths = [len(c) for c in completions]
        m = self.support_samples
        if not any(lengths):
            empty = logprob_stats(torch.zeros((0, self.positions.vocab)), torch.zeros(0, dtype=torch.long), k=self.k,
                                  draws=torch.zeros((0, m)) if m else None)
            return empty.rows(lengths)
        layout = pack_rows(prompts, completions, self.positions.device)
        uniforms = None
        if m:
            uniforms = torch.from_numpy(np.concatenate([
                row_uniforms(self.support_seed, prompt_id, index, n, m)
                for (prompt_id, index), n in zip(keys, lengths, strict=True)]))
            if self.positions.device.type != "mps":  # (no float64 on MPS: the draws are made on the CPU there)
                uniforms = uniforms.to(self.positions.device)

        def stats_of(logits: torch.Tensor, lo: int, hi: int) -> LogprobStats:
            if not bool(torch.isfinite(logits).all()):
                raise NonFiniteLogits("the teacher's logits are not finite (NaN or inf): its weights hold NaN or "
                                      "inf, or it overflows in this dtype")
            return logprob_stats(logits, layout.targets[lo:hi], self.temperature, k=self.k,
                                 draws=None if uniforms is None else uniforms[lo:hi])

        parts = over_chunks(self.positions.logits_at(layout), len(layout.targets), self.chunk_positions, stats_of)
        stats = LogprobStats(**{name: torch.cat([getattr(p, name) for p in parts]).cpu()
                                for name in SPLIT if getattr(parts[0], name) is not None})
        return stats.rows(lengths)
