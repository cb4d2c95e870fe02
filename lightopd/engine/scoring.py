"""A teacher reduced to per-token statistics: sampled-token log-prob, top-k, tail log-mass, entropy.

The decoder runs once per batch; its hidden states at completion positions go through the
output layer a chunk of positions at a time (engine.chunks, as in training), so the float32
logits in memory never exceed `chunk_elements` entries (a [tokens × vocab] array never exists). Every statistic is of
softmax(logits / temperature) over the full vocabulary (objectives.stats).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lightopd.data.batching import pack_rows
from lightopd.engine.chunks import over_chunks
from lightopd.engine.forward import PositionLogits
from lightopd.errors import NonFiniteLogits
from lightopd.objectives.stats import SPLIT, LogprobStats, logprob_stats


class Scorer:
    """Per-token teacher statistics for batches of (prompt ids, completion ids) rows."""

    unavailable: tuple[str, ...] = ()  # teacher columns it cannot fill (it fills them all)

    def __init__(self, model, vocab: int, k: int, temperature: float, chunk_elements: int):
        """Statistics over the first `vocab` ids (the tokenizer's; padded output rows are left out)."""
        self.k = k
        self.temperature = temperature
        self.positions = PositionLogits(model, vocab)
        self.chunk_positions = max(1, chunk_elements // self.positions.vocab)

    @torch.inference_mode()
    def score(self, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]) -> list[LogprobStats]:
        """Statistics at each completion position of each row (right-padded batch), on the CPU."""
        lengths = [len(c) for c in completions]
        if not any(lengths):
            empty = logprob_stats(torch.zeros((0, self.positions.vocab)), torch.zeros(0, dtype=torch.long), k=self.k)
            return empty.rows(lengths)
        layout = pack_rows(prompts, completions, self.positions.device)

        def stats_of(logits: torch.Tensor, lo: int, hi: int) -> LogprobStats:
            if not bool(torch.isfinite(logits).all()):
                raise NonFiniteLogits("the teacher's logits are not finite (NaN or inf): its weights hold NaN or "
                                      "inf, or it overflows in this dtype")
            return logprob_stats(logits, layout.targets[lo:hi], self.temperature, k=self.k)

        parts = over_chunks(self.positions.logits_at(layout), len(layout.targets), self.chunk_positions, stats_of)
        stats = LogprobStats(**{name: torch.cat([getattr(p, name) for p in parts]).cpu()
                                for name in SPLIT if getattr(parts[0], name) is not None})
        return stats.rows(lengths)
