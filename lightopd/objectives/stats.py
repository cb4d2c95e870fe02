"""Per-position statistics of a model's next-token distribution, from one float32 log-softmax.

One function serves both sides: the teacher's scoring (the sampled token's log-prob, its top-k,
its entropy, under inference mode) and the student's view in training (the sampled token's
log-prob and its log-probs at the teacher's top-k ids, with gradient; entropy and argmax as
diagnostics). Everything is gathered from a single float32 [N × V] log-softmax, so no second
[N × V] copy exists; the entropy is a batched dot product, not an [N × V] product.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LogprobStats:
    """Statistics of N positions of log_softmax(logits / temperature)."""

    sampled: Tensor  # [N] log-prob of each target token (with gradient when the logits have one)
    entropy: Tensor  # [N] full-vocabulary entropy, no gradient
    argmax: Tensor  # [N] the most likely token
    at: Tensor | None = None  # [N, m] log-probs at the ids asked for (`at=`), with gradient
    topk_logprobs: Tensor | None = None  # [N, k] the k largest log-probs, descending (`k=`)
    topk_ids: Tensor | None = None  # [N, k] their ids

    def rows(self, lengths: list[int]) -> list[LogprobStats]:
        """Split into consecutive pieces of `lengths` positions (one per row)."""
        pieces = {name: value.split(lengths) for name, value in vars(self).items() if value is not None}
        return [LogprobStats(**{name: parts[i] for name, parts in pieces.items()}) for i in range(len(lengths))]


def logprob_stats(logits: Tensor, targets: Tensor, temperature: float = 1.0, *, at: Tensor | None = None,
                  k: int | None = None) -> LogprobStats:
    """Statistics of softmax(logits / temperature) over the full vocabulary, for logits [N, V]."""
    z = logits.float()
    lq = torch.log_softmax(z / temperature if temperature != 1.0 else z, dim=-1)
    del z
    top_lp, top_ids = lq.topk(k, dim=-1, sorted=True) if k else (None, None)
    with torch.no_grad():
        entropy = -torch.bmm(lq.exp().unsqueeze(1), lq.unsqueeze(2)).view(-1)  # -Σ p log p, no [N, V] product
        argmax = top_ids[:, 0] if top_ids is not None else lq.argmax(dim=-1)
    return LogprobStats(
        sampled=lq.gather(-1, targets.unsqueeze(-1)).squeeze(-1),
        entropy=entropy,
        argmax=argmax,
        at=None if at is None else lq.gather(-1, at),
        topk_logprobs=top_lp,
        topk_ids=top_ids,
    )
