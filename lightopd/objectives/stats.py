"""Per-position statistics of a model's next-token distribution, from one float32 log-softmax
(float64 when the logits are).

One function serves both sides: the teacher's scoring (the sampled token's log-prob, its top-k,
the log-mass outside the top-k, its entropy, and optionally m tokens drawn from it, under
inference mode) and the student's view in training (the sampled token's log-prob under the full
softmax, its log-probs at the teacher's top-k ids and the log-mass outside them, and at the drawn
tokens, with gradient; entropy and argmax as diagnostics).
Everything is gathered from a single float32 [N × V] log-softmax: no second
[N × V] copy is kept for backward, the entropy is a batched dot product, and the log-mass
outside a set of ids is a log-sum-exp over the excluded ids (never 1 − Σ p, which cancels
to nothing for a confident model) with a backward that reuses the log-softmax.

The student's policy is its full softmax at τ, never cut to a nucleus: the sampler's truncation
(engine/sampling.py) is a property of how rows were drawn, stored with them, not of the policy
trained, so every position has a gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

ROWS = 1024  # positions per temporary [rows × V] block (entropy, the log-mass outside a set)
TINY = math.log(1e-30)  # below this log-mass, float32 probabilities no longer sum to it accurately


def _by_rows(fn, *tensors: Tensor) -> Tensor:
    """fn over blocks of ROWS positions, concatenated: the temporaries fn makes stay [ROWS × V]."""
    return torch.cat([fn(*parts) for parts in zip(*(t.split(ROWS) for t in tensors), strict=True)])


def _rest(probs: Tensor, lq: Tensor, ids: Tensor) -> Tensor:
    """log Σ_{i ∉ ids} p_i for one block, from its probabilities (zeroed at `ids` in place): a sum of
    positive terms, no cancellation. A row whose mass is below 1e-30, where float32 probabilities
    underflow or lose precision, is redone as a log-sum-exp of its log-probs."""
    rest = probs.scatter_(-1, ids, 0.0).sum(-1).log()
    tiny = (rest < TINY) & (ids.shape[-1] < lq.shape[-1])
    if bool(tiny.any()):
        rest[tiny] = lq[tiny].scatter(-1, ids[tiny], float("-inf")).logsumexp(-1)
    return rest


class _LogMassOutside(torch.autograd.Function):
    """log Σ_{i ∉ ids} exp(lq_i) per row; backward recomputes from lq instead of saving a copy."""

    @staticmethod
    def forward(ctx, lq: Tensor, ids: Tensor) -> Tensor:
        out = _by_rows(lambda x, i: _rest(x.exp(), x, i), lq, ids)
        ctx.save_for_backward(lq, ids, out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        lq, ids, out = ctx.saved_tensors
        share = (lq - out.unsqueeze(-1)).exp_().scatter_(-1, ids, 0.0)  # each excluded token's share of the mass
        return share.mul_(grad.unsqueeze(-1)), None


def log_mass_outside(lq: Tensor, ids: Tensor) -> Tensor:
    """The log of the probability mass outside `ids` [N, m] of log-probs `lq` [N, V]: [N], -inf when
    `ids` cover the vocabulary."""
    return _LogMassOutside.apply(lq, ids)


@dataclass
class LogprobStats:
    """Statistics of N positions of log_softmax(logits / temperature)."""

    sampled: Tensor  # [N] log-prob of each target token under the full softmax (with gradient)
    entropy: Tensor  # [N] full-vocabulary entropy, no gradient
    argmax: Tensor  # [N] the most likely token
    at: Tensor | None = None  # [N, m] log-probs at the ids asked for (`at=`), with gradient
    topk_logprobs: Tensor | None = None  # [N, k] the k largest log-probs, descending (`k=`)
    topk_ids: Tensor | None = None  # [N, k] their ids
    topk_rest: Tensor | None = None  # [N] log-mass outside the top-k (`k=`), no gradient
    support_ids: Tensor | None = None  # [N, m] ids drawn from this distribution, ascending (`draws=`)
    support_logprobs: Tensor | None = None  # [N, m] their log-probs
    at_support: Tensor | None = None  # [N, m] log-probs at the ids of a sampled support (`support=`), with gradient
    at_ids: Tensor | None = field(default=None, repr=False)  # the ids of `at`
    lq: Tensor | None = field(default=None, repr=False)  # [N, V] the log-softmax, kept for `at_rest`
    _at_rest: Tensor | None = field(default=None, repr=False)

    def at_rest(self) -> Tensor:
        """[N] log-mass outside the `at` ids, with gradient (computed on first use)."""
        if self._at_rest is None:
            self._at_rest = log_mass_outside(self.lq, self.at_ids)
        return self._at_rest

    def rows(self, lengths: list[int]) -> list[LogprobStats]:
        """Split the per-position fields into consecutive pieces of `lengths` positions (one per row)."""
        pieces = {name: getattr(self, name).split(lengths) for name in SPLIT if getattr(self, name) is not None}
        return [LogprobStats(**{name: parts[i] for name, parts in pieces.items()}) for i in range(len(lengths))]


SPLIT = ("sampled", "entropy", "argmax", "at", "topk_logprobs", "topk_ids", "topk_rest", "support_ids",
         "support_logprobs")


def draw_support(lq: Tensor, uniforms: Tensor) -> Tensor:
    """[N, m] token ids drawn with replacement from the distributions exp(lq) [N, V] by inverse CDF,
    one per uniform in [0, 1) of `uniforms` [N, m], each row ascending. The CDF is a float64 running
    sum, so its rounding moves no token's chance by more than about V·2^-53; a token of probability 0
    is never drawn."""
    out = []
    here = "cpu" if lq.device.type == "mps" else lq.device  # (no float64 on MPS)
    for x, u in zip(lq.split(ROWS), uniforms.split(ROWS), strict=True):
        cdf = x.detach().to(here).double().exp().cumsum_(-1)
        ids = torch.searchsorted(cdf, (u.to(here).double() * cdf[:, -1:]).contiguous(), right=True)
        out.append(ids.clamp_(max=lq.shape[-1] - 1).sort(-1).values.to(lq.device))
    return torch.cat(out) if out else uniforms.new_zeros(uniforms.shape, dtype=torch.long)


def logprob_stats(logits: Tensor, targets: Tensor, temperature: float = 1.0, *, at: Tensor | None = None,
                  k: int | None = None, draws: Tensor | None = None, support: Tensor | None = None) -> LogprobStats:
    """Statistics of softmax(logits / temperature) over the full vocabulary, for logits [N, V]:
    at `at` ids [N, m] (and the mass outside them, on demand), the top `k` (and the mass outside
    them), a sampled support of m tokens per position from `draws` uniforms [N, m] (and their
    log-probs), the log-probs at a stored sampled `support` [N, m], and the targets' log-probs."""
    z = logits if logits.dtype == torch.float64 else logits.float()  # at least float32
    lq = torch.log_softmax(z / temperature if temperature != 1.0 else z, dim=-1)
    del z
    top_lp, top_ids = lq.topk(k, dim=-1, sorted=True) if k else (None, None)
    with torch.no_grad():  # entropy -Σ p log p and (with k) the mass outside the top-k share one exp per block
        entropy, top_rest = [], []
        for i, x in enumerate(lq.detach().split(ROWS)):
            probs = x.exp()
            entropy.append(-torch.bmm(probs.unsqueeze(1), x.unsqueeze(2)).view(-1))
            if top_ids is not None:
                top_rest.append(_rest(probs, x, top_ids[i * ROWS:(i + 1) * ROWS]))
        entropy = torch.cat(entropy) if entropy else lq.new_zeros(0)
        top_rest = (torch.cat(top_rest) if top_rest else lq.new_zeros(0)) if top_ids is not None else None
        argmax = top_ids[:, 0] if top_ids is not None else lq.argmax(dim=-1)
    sampled = lq.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    drawn = None if draws is None else draw_support(lq, draws)
    return LogprobStats(
        sampled=sampled,
        entropy=entropy,
        argmax=argmax,
        at=None if at is None else lq.gather(-1, at),
        topk_logprobs=top_lp,
        topk_ids=top_ids,
        topk_rest=top_rest,
        support_ids=drawn,
        support_logprobs=None if drawn is None else lq.gather(-1, drawn),
        at_support=None if support is None else lq.gather(-1, support),
        at_ids=at,
        lq=lq if at is not None else None,
    )
