"""Per-token policy-gradient objectives on the teacher's log-prob of the sampled token:
lightning-opd, opd-is, vopd, g-opd.

They read `teacher_logprobs`, which is exact whether or not the sampled token is in the top-k.
`lq_y` is the student's log-prob of the sampled token (full softmax at τ), `ℓT` the teacher's.
Ratios and rewards against the rollout model use ℓref: ℓold, its untruncated log-prob stored at
rollout (`behavior = policy`, the default: ratio 1 before any update), or ℓμ, the log-prob under
the truncated distribution actually sampled from (`behavior = sampler`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lightopd.objectives.base import REFERENCE, TOPK, Inputs, Objective, RatioParams, Requirements
from lightopd.objectives.support import kl, supports
from lightopd.options import check, opt

if TYPE_CHECKING:
    from torch import Tensor

IMPORTANCE = ("none", "tis")
PG_COLUMNS = ("teacher_logprobs",)


@dataclass(frozen=True, kw_only=True)
class PolicyGradientParams(RatioParams):
    importance: str = opt("none", "none, or tis: weight each token by min(exp(lq_y − ℓref), is_cap), truncated "
                                  "importance sampling against the rollout model (ℓref: see behavior).",
                          choices=IMPORTANCE)
    is_cap: float = opt(2.0, "Cap of the importance weight.")

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.importance in IMPORTANCE, "objective.importance",
              f"must be none or tis, got {self.importance!r}")
        check(self.is_cap > 0, "objective.is_cap", f"must be > 0, got {self.is_cap}")


@dataclass(frozen=True, kw_only=True)
class ImportanceSamplingParams(RatioParams):
    is_cap: float = opt(2.0, "Cap of the importance ratio exp(lq_y − ℓref).")

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.is_cap > 0, "objective.is_cap", f"must be > 0, got {self.is_cap}")


GOPD_REFERENCES = ("behavior", "scored")


@dataclass(frozen=True, kw_only=True)
class GOPDParams(PolicyGradientParams):
    lambda_: float = opt(1.25, "λ, set as objective.lambda: the reward extrapolation factor; 1 is lightning-opd.")
    reference: str = opt("behavior", "ℓref of the reward: behavior, the rollout model's (as `behavior` says); or "
                                     "scored, a model score-teacher --reference scored once (the paper's base: the "
                                     "student's initialisation in its multi-teacher merge).", choices=GOPD_REFERENCES)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.reference in GOPD_REFERENCES, "objective.reference",
              f"must be behavior or scored, got {self.reference!r}")


class PolicyGradient(Objective):
    Params = PolicyGradientParams
    columns = PG_COLUMNS

    def requirements(self) -> Requirements:
        tis = self.params.importance == "tis"
        columns = (*self.columns, REFERENCE[self.params.behavior]) if tis else self.columns
        return Requirements(columns, behavior_probability=tis, on_policy=True)

    def weight(self, inputs: Inputs) -> Tensor | float:
        """The truncated importance weight of each position (1 without `importance = tis`)."""
        if self.params.importance == "tis":
            reference = inputs.reference(self.params.behavior)
            return (inputs.lq_y.detach() - reference).exp().clamp(max=self.params.is_cap)
        return 1.0


class LightningOPD(PolicyGradient):
    name = "lightning-opd"
    summary = "A = ℓT − lq_y on the student's own tokens (the Lightning OPD estimator)"

    def loss(self, inputs: Inputs) -> Tensor:
        lq_y = inputs.lq_y
        advantage = inputs.teacher_logprobs - lq_y.detach()
        return -self.weight(inputs) * advantage * lq_y


class VOPD(PolicyGradient):
    name = "vopd"
    summary = "lightning-opd with −KL(q̂ ‖ p̂) on the top-k as a control-variate baseline"
    columns = (*PG_COLUMNS, *TOPK)

    def loss(self, inputs: Inputs) -> Tensor:
        lq_y = inputs.lq_y
        log_q, log_p = supports(inputs, "tail")
        value = -kl(log_q, log_p).detach()  # V = −KL(q̂ ‖ p̂)
        advantage = inputs.teacher_logprobs - lq_y.detach() - value
        return -self.weight(inputs) * advantage * lq_y


class GOPD(PolicyGradient):
    name = "g-opd"
    summary = "reward extrapolation A = λ(ℓT − ℓref) − (lq_y − ℓref) (G-OPD / ExOPD)"
    Params = GOPDParams

    def requirements(self) -> Requirements:
        if self.params.reference == "scored":
            columns = (*self.columns, "reference_logprobs")
            return Requirements((*columns, REFERENCE[self.params.behavior]) if self.params.importance == "tis"
                                else columns, behavior_probability=self.params.importance == "tis", on_policy=True)
        return Requirements((*self.columns, REFERENCE[self.params.behavior]), behavior_probability=True,
                            on_policy=True)

    def loss(self, inputs: Inputs) -> Tensor:
        lq_y = inputs.lq_y
        mu = inputs.reference_logprobs if self.params.reference == "scored" else inputs.reference(self.params.behavior)
        advantage = self.params.lambda_ * (inputs.teacher_logprobs - mu) - (lq_y.detach() - mu)
        return -self.weight(inputs) * advantage * lq_y


class OPDImportanceSampling(Objective):
    name = "opd-is"
    summary = "A = ℓT − ℓref with a capped importance ratio exp(lq_y − ℓref)"
    Params = ImportanceSamplingParams
    columns = PG_COLUMNS

    def requirements(self) -> Requirements:
        return Requirements((*self.columns, REFERENCE[self.params.behavior]), behavior_probability=True)

    def loss(self, inputs: Inputs) -> Tensor:
        reference = inputs.reference(self.params.behavior)
        advantage = inputs.teacher_logprobs - reference
        ratio = (inputs.lq_y - reference).exp().clamp(max=self.params.is_cap)
        return -ratio * advantage
