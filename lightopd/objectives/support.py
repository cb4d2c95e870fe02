"""Distributions over the teacher's top-k support, and the divergences between them (pure math).

`p̂` and `q̂` of docs/objectives.md: the teacher's and the student's distributions over the k
tokens the teacher ranked highest, plus (support "tail") one bucket holding the mass of every
other token, or (support "renormalized") the k tokens alone, renormalised. A `Dist` keeps the
k log-probs and the bucket's log-mass apart, so nothing concatenates them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lightopd.objectives.base import EPS, Inputs

if TYPE_CHECKING:
    from torch import Tensor

SUPPORTS = ("tail", "renormalized")


@dataclass
class Dist:
    """Log-probs over k named tokens [N, k] and, optionally, one bucket for the rest [N]."""

    top: Tensor
    rest: Tensor | None = None

    def map(self, fn) -> Dist:
        return Dist(fn(self.top), None if self.rest is None else fn(self.rest))

    def detach(self) -> Dist:
        return self.map(lambda t: t.detach())


def with_tail(log_topk: Tensor) -> Dist:
    """The top-k log-probs and a bucket holding 1 − Σ exp(top-k) (floored at EPS)."""
    rest = (1.0 - log_topk.exp().sum(-1)).clamp_min(EPS).log()
    return Dist(log_topk, rest)


def renormalized(log_topk: Tensor) -> Dist:
    return Dist(log_topk - log_topk.logsumexp(-1, keepdim=True))


def supports(inputs: Inputs, support: str) -> tuple[Dist, Dist]:
    """(log q̂, log p̂) on the chosen support."""
    make = with_tail if support == "tail" else renormalized
    return make(inputs.lq_topk), make(inputs.topk_logprobs.float())


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
