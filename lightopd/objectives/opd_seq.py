"""opd-seq: sequence-level reverse KL as a policy gradient, with a group baseline and PPO clipping.

Each token is credited with the discounted sum of the teacher-vs-rollout log-ratios r = ℓT − ℓref
of everything from it to the end of its sample (the return G). The baseline B is, per position,
the mean return of the prompt's other samples (leave-one-out, so a store needs n ≥ 2 samples per
prompt); advantages A = G − B are divided by their standard deviation over the whole optimizer
step. The returns need the whole step, so they are computed in `prepare`, before any forward.
The ratio to the rollout policy is PPO-clipped (anchor "rollout"), or the gradient is the
current student's with a truncated importance weight to the rollout policy (anchor "current").
ℓref is ℓold, the rollout model's untruncated log-prob (`behavior = policy`, the default), or ℓμ,
the truncated distribution's (`behavior = sampler`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lightopd.objectives.base import EPS, REFERENCE, Inputs, Objective, RatioParams, Requirements, StepRows
from lightopd.objectives.policy_gradient import PG_COLUMNS
from lightopd.objectives.weights import group_sum
from lightopd.options import check, opt

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch import Tensor

BASELINES = ("loo", "none")
ANCHORS = ("rollout", "current")


@dataclass(frozen=True, kw_only=True)
class SurrogateParams(RatioParams):
    """The policy-gradient surrogate shared by opd-seq, grpo and kdrl: how the ratio is anchored."""

    anchor: str = opt("rollout", "What the ratio is taken against. rollout: ρ = exp(lq_y − ℓref), PPO-clipped, "
                                 "for the whole run; current: the current student (ρ = exp(lq_y − sg(lq_y)), an "
                                 "on-policy gradient) weighted by min(exp(sg(lq_y) − ℓref), is_cap), truncated "
                                 "importance sampling to the rollout policy.", choices=ANCHORS)
    clip_eps: float = opt(0.2, "ε of the PPO clip of the ratio to [1 − ε, 1 + ε_high] (anchor rollout).")
    clip_eps_high: float | None = opt(None, "ε_high, the clip's upper side (DAPO's clip-higher). [default: "
                                            "clip_eps, a symmetric clip]")
    is_cap: float = opt(2.0, "Cap of the truncated importance weight (anchor current).")

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.anchor in ANCHORS, "objective.anchor", f"must be rollout or current, got {self.anchor!r}")
        check(0 < self.clip_eps < 1, "objective.clip_eps", f"must be in (0, 1), got {self.clip_eps}")
        check(self.clip_eps_high is None or self.clip_eps_high > 0, "objective.clip_eps_high",
              f"must be > 0, got {self.clip_eps_high}")
        check(self.is_cap > 0, "objective.is_cap", f"must be > 0, got {self.is_cap}")

    @property
    def clip(self) -> tuple[float, float]:
        """The ratio's clip interval [1 − ε, 1 + ε_high]."""
        high = self.clip_eps if self.clip_eps_high is None else self.clip_eps_high
        return 1 - self.clip_eps, 1 + high


@dataclass(frozen=True, kw_only=True)
class OPDSeqParams(SurrogateParams):
    discount: float = opt(1.0, "γ: a token's return sums the rewards after it discounted by γ per token; 0 "
                               "is per-token.")
    baseline: str = opt("loo", "loo: subtract the mean return of the prompt's other samples (needs n ≥ 2 "
                               "samples per prompt); none.", choices=BASELINES)
    normalize: bool = opt(True, "Divide advantages by their standard deviation over the optimizer step.")

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0 <= self.discount <= 1, "objective.discount", f"must be in [0, 1], got {self.discount}")
        check(self.baseline in BASELINES, "objective.baseline", f"must be loo or none, got {self.baseline!r}")


def discounted_returns(rewards: Tensor, mask: Tensor, discount: float) -> Tensor:
    """G[r, t] = Σ_{s ≥ t} γ^{s−t} rewards[r, s] over a row's unmasked positions ([R, T] padded)."""
    r = rewards * mask
    if discount == 0:
        return r
    if discount == 1:
        return r.flip(-1).cumsum(-1).flip(-1) * mask
    steps = r.new_ones(r.shape[-1]).cumsum(-1) - 1
    gap = steps.unsqueeze(0) - steps.unsqueeze(1)  # [t, s] = s − t
    weights = (discount ** gap.clamp(min=0)) * (gap >= 0)
    return (r @ weights.T) * mask


def leave_one_out(values: Tensor, mask: Tensor, groups: Tensor) -> Tensor:
    """Per row and position: the mean of `values` over the other rows of its group that reach
    that position (0 where none does)."""
    sums, counts = group_sum(values * mask, groups), group_sum(mask.to(values.dtype), groups)
    others = counts[groups] - mask
    return ((sums[groups] - values * mask) / others.clamp(min=1)).where(others > 0, 0.0)


def advantages(teacher: Tensor, behavior: Tensor, mask: Tensor, groups: Tensor, params: OPDSeqParams,
               reduce: Callable[[Tensor], Tensor] = lambda t: t) -> Tensor:
    """A = G − B (optionally / std over the step) for padded [R, T] rows; `groups` [R] prompt ids.

    The std is the population std of every valid position of the step; when a step is split
    between ranks, `reduce` sums (count, Σa, Σa²) over them so every rank divides by the same std.
    """
    returns = discounted_returns(teacher - behavior, mask, params.discount)
    adv = returns - leave_one_out(returns, mask, groups) if params.baseline == "loo" else returns
    if params.normalize:
        valid = adv[mask.bool()].double()
        moments = valid.new_zeros(3)
        moments[0], moments[1], moments[2] = valid.numel(), valid.sum(), valid.square().sum()
        count, total, squares = reduce(moments).tolist()
        if count > 1:
            std = math.sqrt(max(squares / count - (total / count) ** 2, 0.0))
            adv = adv / (std + EPS)
    return adv * mask


class OPDSeq(Objective):
    name = "opd-seq"
    summary = "discounted sequence-level returns of ℓT − ℓref, leave-one-out group baseline, PPO clipping"
    Params = OPDSeqParams
    columns = PG_COLUMNS

    def requirements(self) -> Requirements:
        columns = (*self.columns, REFERENCE[self.params.behavior])
        if self.params.baseline == "loo":
            return Requirements(columns, min_samples=2, behavior_probability=True, on_policy=True,
                                why="its loo baseline is the mean over the prompt's other samples "
                                    "(or set objective.baseline=none)")
        return Requirements(columns, behavior_probability=True, on_policy=True)

    def prepare(self, rows: StepRows) -> dict[str, Tensor]:
        teacher, reference = rows.column("teacher_logprobs"), rows.column(REFERENCE[self.params.behavior])
        return {"advantages": advantages(teacher, reference, rows.mask, rows.groups, self.params, rows.reduce)}

    def loss(self, inputs: Inputs) -> Tensor:
        return surrogate(inputs, inputs.prepared["advantages"], self.params)

    def diagnostics(self, inputs: Inputs) -> dict[str, Tensor]:
        return {"clip_fraction": clip_fraction(inputs, inputs.prepared["advantages"], self.params)}


def surrogate(inputs: Inputs, a: Tensor, params: SurrogateParams) -> Tensor:
    """The per-position policy-gradient loss for advantages `a` [N]: PPO's clipped surrogate of the ratio
    to the rollout model (anchor rollout), or the current student's gradient with a truncated importance
    weight to it (anchor current)."""
    reference = inputs.reference(params.behavior)
    if params.anchor == "current":
        lq_y = inputs.lq_y
        weight = (lq_y.detach() - reference).exp().clamp(max=params.is_cap)
        return -weight * a * (lq_y - lq_y.detach()).exp()
    return ppo_clip((inputs.lq_y - reference).exp(), a, params.clip)


def ppo_clip(ratio: Tensor, a: Tensor, clip: tuple[float, float]) -> Tensor:
    """PPO's clipped surrogate loss −min(ρA, clip(ρ, lo, hi)A), per position; `clip` is
    [1 − ε, 1 + ε_high]."""
    return -(ratio * a).minimum(ratio.clamp(*clip) * a)


def clip_fraction(inputs: Inputs, a: Tensor, params: SurrogateParams) -> Tensor:
    """Per position, 1 where the PPO clip removed the gradient (ratio beyond 1 − ε or 1 + ε_high on the
    side the advantage pushes it); 0 when anchored to the current student."""
    ratio = (inputs.lq_y.detach() - inputs.reference(params.behavior)).exp()
    if params.anchor == "current":
        return ratio * 0
    low, high = params.clip
    return (((ratio > high) & (a > 0)) | ((ratio < low) & (a < 0))).float()
