"""Distributions over the teacher's top-k support, and the divergences between them (pure math);
and the forward KL estimated from a sampled support instead (`sampled_forward_kl`).

`p̂` and `q̂` of docs/objectives.md: the teacher's and the student's distributions over the k
tokens the teacher ranked highest, plus (support "tail") one bucket holding the mass of every
other token, or (support "renormalized") the k tokens alone, renormalised. A `Dist` keeps the
k log-probs and the bucket's log-mass apart, so nothing concatenates them. The buckets are exact:
the teacher's is stored by score-teacher from its full distribution, the student's is a
log-sum-exp over the ids outside the top-k; neither is rebuilt as 1 − Σ exp(top-k).

The sampled support (score-teacher --support-samples) is m tokens y_j drawn from the teacher's whole
distribution p, with ℓT(y_j); the student's lq(y_j) are gathered from its full softmax. From them,
without any bucket, comes an unbiased estimate of the full-vocabulary forward KL (Sparse Logit
Sampling): KL(p ‖ q) = E_p[ℓT − lq].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lightopd.objectives.base import LOG_EPS, Inputs

if TYPE_CHECKING:
    from torch import Tensor

SUPPORTS = ("tail", "renormalized")
SAMPLED = "sampled"  # fkl's support estimated from the teacher's draws


@dataclass
class Dist:
    """Log-probs over k named tokens [N, k] and, optionally, one bucket for the rest [N]."""

    top: Tensor
    rest: Tensor | None = None

    def map(self, fn) -> Dist:
        return Dist(fn(self.top), None if self.rest is None else fn(self.rest))

    def detach(self) -> Dist:
        return self.map(lambda t: t.detach())


def with_tail(log_topk: Tensor, log_rest: Tensor) -> Dist:
    """The top-k log-probs and the bucket of the rest, its log-mass floored at log EPS."""
    return Dist(log_topk, log_rest.clamp_min(LOG_EPS))


def renormalized(log_topk: Tensor) -> Dist:
    return Dist(log_topk - log_topk.logsumexp(-1, keepdim=True))


def supports(inputs: Inputs, support: str) -> tuple[Dist, Dist]:
    """(log q̂, log p̂) on the chosen support."""
    teacher = inputs.topk_logprobs.float()
    if support == "tail":
        return with_tail(inputs.lq_topk, inputs.student.at_rest()), with_tail(teacher, inputs.teacher_log_tail)
    return renormalized(inputs.lq_topk), renormalized(teacher)


def kl(a: Dist, b: Dist) -> Tensor:
    """KL(a ‖ b) over the support."""
    total = (a.top.exp() * (a.top - b.top)).sum(-1)
    if a.rest is not None:
        total = total + a.rest.exp() * (a.rest - b.rest)
    return total


def mixture(a: Dist, b: Dist, weight_a: float) -> Dist:
    """log(w·a + (1 − w)·b)."""
    if weight_a <= 0:
        return b
    if weight_a >= 1:
        return a
    wa, wb = math.log(weight_a), math.log1p(-weight_a)
    top = (a.top + wa).logaddexp(b.top + wb)
    return Dist(top, None if a.rest is None else (a.rest + wa).logaddexp(b.rest + wb))


def blend(a: Dist, b: Dist, t: float) -> Dist:
    """log_softmax((1 − t)·a + t·b): a geometric interpolation, renormalised over the support."""
    top = a.top * (1 - t) + b.top * t
    rest = None if a.rest is None else a.rest * (1 - t) + b.rest * t
    norm = top.logsumexp(-1) if rest is None else top.logsumexp(-1).logaddexp(rest)
    return Dist(top - norm.unsqueeze(-1), None if rest is None else rest - norm)


def sampled_forward_kl(inputs: Inputs) -> Tensor:
    """[N] KL(p ‖ q) over the whole vocabulary, estimated from the m tokens drawn from p:
    (1/m) Σ_j (ℓT(y_j) − lq(y_j)). Unbiased, and so is its gradient −(1/m) Σ_j ∇lq(y_j) (the draws do
    not depend on the student): Sparse Logit Sampling's, with the target count/m."""
    at = inputs.student.at_support
    return (inputs.support_logprobs.to(at.dtype) - at).mean(-1)
