"""Analytic divergences over the teacher's stored top-k: rkl, fkl, jsd, skew-fkl, skew-rkl.

Each is computed between the student's and the teacher's distributions on the top-k support
(support.py): with the tail bucket (default) a lower bound of the full-vocabulary divergence,
exact when k = V. fkl also takes the sampled support, an unbiased estimate of the
full-vocabulary divergence from tokens drawn from the teacher (support.sampled_forward_kl).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lightopd.objectives.base import SUPPORT_COLUMNS, TOPK, Inputs, Objective, ObjectiveParams, Requirements
from lightopd.objectives.support import SAMPLED, SUPPORTS, kl, mixture, sampled_forward_kl, supports
from lightopd.options import check, opt

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True, kw_only=True)
class DivergenceParams(ObjectiveParams):
    support: str = opt("tail", "tail: the top-k plus one bucket for every other token (a lower bound of the "
                               "full divergence); renormalized: the top-k alone; sampled (fkl only): the "
                               "tokens drawn from the teacher (score-teacher --support-samples), an unbiased "
                               "estimate of the full divergence.", choices=(*SUPPORTS, SAMPLED))

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.support in (*SUPPORTS, SAMPLED), "objective.support",
              f"must be tail, renormalized or sampled, got {self.support!r}")


def top_k_only(params: DivergenceParams, name: str) -> None:
    """InputError unless `params.support` is a top-k support (every objective but fkl)."""
    check(params.support in SUPPORTS, "objective.support",
          f"{name} needs the top-k (tail or renormalized): the sampled support serves fkl only (an estimate of "
          "the others from the teacher's draws needs the student's mass where the teacher rarely draws; "
          "docs/objectives.md)")


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

    def __init__(self, params: DivergenceParams | None = None, total_steps: int = 1):
        super().__init__(params, total_steps)
        if type(self) is not ForwardKL:
            top_k_only(self.params, self.name)

    def requirements(self) -> Requirements:
        return Requirements(SUPPORT_COLUMNS if self.params.support == SAMPLED else self.columns)


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
        if self.params.support == SAMPLED:
            return sampled_forward_kl(inputs)
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
