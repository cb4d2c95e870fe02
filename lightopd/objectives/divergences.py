"""Analytic divergences over the teacher's stored top-k: rkl, fkl, jsd, skew-fkl, skew-rkl.

Each is computed between the student's and the teacher's distributions on the top-k support
(support.py): with the tail bucket (default) a lower bound of the full-vocabulary divergence,
exact when k = V.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lightopd.objectives.base import TOPK, Inputs, Objective, ObjectiveParams
from lightopd.objectives.support import SUPPORTS, kl, mixture, supports
from lightopd.options import check, opt

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True, kw_only=True)
class DivergenceParams(ObjectiveParams):
    support: str = opt("tail", "tail: the top-k plus one bucket for every other token (a lower bound of the "
                               "full divergence); renormalized: the top-k alone.", choices=SUPPORTS)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.support in SUPPORTS, "objective.support", f"must be tail or renormalized, got {self.support!r}")


@dataclass(frozen=True, kw_only=True)
class JSDParams(DivergenceParams):
    beta: float = opt(0.5, "β: the mixture is β·p̂ + (1 − β)·q̂; 0 is fkl, 1 is rkl.")

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0 <= self.beta <= 1, "objective.beta", f"must be in [0, 1], got {self.beta}")


@dataclass(frozen=True, kw_only=True)
class SkewParams(DivergenceParams):
    alpha: float = opt(0.1, "α: the share of the other distribution mixed into the second argument.")

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0 <= self.alpha < 1, "objective.alpha", f"must be in [0, 1), got {self.alpha}")


class TopKDivergence(Objective):
    Params = DivergenceParams
    columns = TOPK


class ReverseKL(TopKDivergence):
    name = "rkl"
    summary = "reverse KL(q̂ ‖ p̂) on the teacher's top-k (mode-seeking)"

    def loss(self, inputs: Inputs) -> Tensor:
        log_q, log_p = supports(inputs, self.params.support)
        return kl(log_q, log_p)


class ForwardKL(TopKDivergence):
    name = "fkl"
    summary = "forward KL(p̂ ‖ q̂) on the teacher's top-k (word-level KD, mass-covering)"

    def loss(self, inputs: Inputs) -> Tensor:
        log_q, log_p = supports(inputs, self.params.support)
        return kl(log_p, log_q)


class JSD(TopKDivergence):
    name = "jsd"
    summary = "generalised Jensen-Shannon divergence of GKD (β = 0 is fkl, β = 1 is rkl)"
    Params = JSDParams

    def loss(self, inputs: Inputs) -> Tensor:
        log_q, log_p = supports(inputs, self.params.support)
        beta = self.params.beta
        if beta == 0:
            return kl(log_p, log_q)
        if beta == 1:
            return kl(log_q, log_p)
        log_m = mixture(log_p, log_q, beta)
        return beta * kl(log_p, log_m) + (1 - beta) * kl(log_q, log_m)


class SkewForwardKL(TopKDivergence):
    name = "skew-fkl"
    summary = "DistiLLM's skew KL(p̂ ‖ α p̂ + (1 − α) q̂)"
    Params = SkewParams

    def loss(self, inputs: Inputs) -> Tensor:
        log_q, log_p = supports(inputs, self.params.support)
        return kl(log_p, mixture(log_p, log_q, self.params.alpha))


class SkewReverseKL(TopKDivergence):
    name = "skew-rkl"
    summary = "DistiLLM's skew reverse KL(q̂ ‖ (1 − α) p̂ + α q̂)"
    Params = SkewParams

    def loss(self, inputs: Inputs) -> Tensor:
        log_q, log_p = supports(inputs, self.params.support)
        return kl(log_q, mixture(log_p, log_q, 1 - self.params.alpha))
