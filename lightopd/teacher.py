"""A teacher model reduced to per-token statistics: sampled-token log-prob, top-k, entropy.

The decoder runs once per batch; its hidden states at completion positions go through the
output layer a chunk of positions at a time, so the float32 logits in memory never exceed
`chunk_elements` entries (a [tokens × vocab] array never exists). Every statistic is of
softmax(logits / temperature) over the full vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lightopd.batching import pack_rows
from lightopd.forward import PositionLogits


@dataclass
class PositionStats:
    """Statistics of N positions (flattened over rows)."""

    logprobs: torch.Tensor  # [N] float32, log-prob of the sampled (next) token
    topk_logprobs: torch.Tensor  # [N, k] float32, descending
    topk_ids: torch.Tensor  # [N, k] int64
    entropy: torch.Tensor  # [N] float32


def position_stats(logits: torch.Tensor, targets: torch.Tensor, k: int, temperature: float) -> PositionStats:
    """Statistics of softmax(logits / temperature) [N, V] for the tokens `targets` [N].

    Uses PyTorch's fused log_softmax (about 5x faster on CPU than logsumexp plus a separate exp)
    and at most two more float32 [N, V] buffers: the log-probs and their exponent.
    """
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    lp = torch.log_softmax(z, dim=-1)
    del z
    top_lp, top_ids = lp.topk(k, dim=-1, sorted=True)
    sampled = lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -torch.bmm(lp.exp().unsqueeze(1), lp.unsqueeze(2)).view(-1)  # -sum p log p, no [N, V] product
    return PositionStats(sampled, top_lp, top_ids, entropy)


class Scorer:
    """Per-token teacher statistics for batches of (prompt ids, completion ids) rows."""

    def __init__(self, model, k: int, temperature: float, chunk_elements: int):
        self.k = k
        self.temperature = temperature
        self.positions = PositionLogits(model)
        self.chunk_positions = max(1, chunk_elements // self.positions.vocab)

    @torch.inference_mode()
    def score(self, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]) -> list[PositionStats]:
        """Statistics at each completion position of each row (right-padded batch)."""
        if not any(completions):
            none = torch.zeros(0)
            return [PositionStats(none, none.view(0, self.k), none.long().view(0, self.k), none) for _ in completions]
        ids, mask, rows, cols, targets = pack_rows(prompts, completions, self.positions.device)
        logits_of = self.positions.logits_at(ids, mask, rows, cols)
        parts = []
        for lo in range(0, len(targets), self.chunk_positions):
            hi = min(lo + self.chunk_positions, len(targets))
            parts.append(position_stats(logits_of(lo, hi), targets[lo:hi], self.k, self.temperature))
        stats = PositionStats(*(torch.cat([getattr(s, f) for s in parts]).cpu() for f in
                                ("logprobs", "topk_logprobs", "topk_ids", "entropy")))
        out, start = [], 0
        for c in completions:
            end = start + len(c)
            out.append(PositionStats(stats.logprobs[start:end], stats.topk_logprobs[start:end],
                                     stats.topk_ids[start:end], stats.entropy[start:end]))
            start = end
        return out
