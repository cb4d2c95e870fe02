"""Objectives that route each row by its outcome: scope and srpo.

`scope`: SCOPE, "SCOPE: Signal-Calibrated On-Policy Distillation Enhancement with Dual-Path
Adaptive Weighting" (arXiv 2604.10688). In each prompt group, correct rows (reward ≥ 1) get
maximum likelihood weighted by the student's perplexity, wrong rows the teacher's signal weighted
by the inverse of the teacher's perplexity; each weight is a softmax over its sub-group (sum 1):
    w_stu ∝ PPL_S(y)^(1/T_w) over the correct rows,  w_tea ∝ PPL_T(y)^(−1/T_w) over the wrong ones,
    L = E_x [ Σ_correct w_stu · (−Σ_t ρ_t) + Σ_wrong w_tea · Σ_t ρ_t · sg(lq_y − ℓT) ],
with ρ_t = exp(lq_y − ℓref) and PPL_M(y) = exp(−mean_t ℓM). PPL_S is the rollout model's (ℓref, as
the authors' code takes its old log-probs), PPL_T the stored teacher's.

`srpo`: SRPO, "Unifying Group-Relative and Self-Distillation Policy Optimization via Sample
Routing" (arXiv 2604.02288). A failed row whose group holds a correct row goes to distillation, a
Jensen-Shannon divergence (β = 0.5) to the teacher on the top-k plus a tail bucket, weighted per
token by exp(−β_H · H_T) with H_T the teacher's entropy, normalised to mean 1 over the step's
distilled tokens; every other row goes to grpo's group-relative surrogate. The step's loss is the
mean over all routed tokens (the trainer's token mean).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lightopd.objectives.base import REFERENCE, TOPK, Inputs, Objective, Requirements, StepRows
from lightopd.objectives.divergences import JSD, JSDParams
from lightopd.objectives.grpo import NORMALIZE, group_advantages, rewards_of
from lightopd.objectives.opd_seq import SurrogateParams, surrogate
from lightopd.objectives.weights import group_sum
from lightopd.options import check, opt

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True, kw_only=True)
class SCOPEParams(SurrogateParams):
    weight_temperature: float = opt(1.0, "T_w of the perplexity softmaxes (the paper's τ, 1.0).")

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.weight_temperature > 0, "objective.weight_temperature",
              f"must be > 0, got {self.weight_temperature}")


def subgroup_softmax(scores: Tensor, groups: Tensor, member: Tensor) -> Tensor:
    """[R] softmax of `scores` within each group's rows where `member` (0 elsewhere)."""
    n_groups = int(groups.max()) + 1
    masked = scores.masked_fill(~member, float("-inf"))
    top = masked.new_full((n_groups,), float("-inf")).scatter_reduce_(0, groups, masked, "amax")
    e = (masked - top[groups].clamp(min=-1e300)).exp().where(member, 0.0)
    return e / group_sum(e, groups)[groups].clamp(min=1e-300)


class SCOPE(Objective):
    name = "scope"
    summary = "correct rows: perplexity-weighted MLE; wrong rows: the teacher's signal, weighted (SCOPE)"
    Params = SCOPEParams
    columns = ("teacher_logprobs",)

    def requirements(self) -> Requirements:
        return Requirements((*self.columns, REFERENCE[self.params.behavior]), behavior_probability=True,
                            on_policy=True, rewards=True)

    def prepare(self, rows: StepRows) -> dict[str, Tensor]:
        mask, groups = rows.mask, rows.groups
        lengths = mask.sum(-1).clamp(min=1)
        correct = rewards_of(rows) >= 1.0
        mean_student = (rows.column(REFERENCE[self.params.behavior]) * mask).sum(-1) / lengths
        mean_teacher = (rows.column("teacher_logprobs") * mask).sum(-1) / lengths
        t = self.params.weight_temperature
        w = subgroup_softmax(-mean_student / t, groups, correct) + subgroup_softmax(mean_teacher / t, groups, ~correct)
        totals = rows.reduce(mask.new_tensor([mask.sum(), float(int(groups.max()) + 1)]))
        scale = float(totals[0]) / float(totals[1])  # N / P: the mean over prompts of each group's sums
        return {"weight": (scale * w).unsqueeze(-1) * mask, "correct": correct.to(mask.dtype).unsqueeze(-1) * mask}

    def loss(self, inputs: Inputs) -> Tensor:
        lq_y, correct = inputs.lq_y, inputs.prepared["correct"]
        ratio = (lq_y - inputs.reference(self.params.behavior)).exp()
        wrong = ratio * (lq_y - inputs.teacher_logprobs).detach()
        return inputs.prepared["weight"] * (correct * -ratio + (1 - correct) * wrong)


@dataclass(frozen=True, kw_only=True)
class SRPOParams(SurrogateParams):
    normalize: str = opt("std", "The grpo branch's advantage: std (the paper's formula) or none.", choices=NORMALIZE)
    entropy_beta: float = opt(1.0, "β_H of the distilled tokens' weight exp(−β_H · H_T) (the paper's β, 1).")
    jsd_beta: float = opt(0.5, "β of the distillation's Jensen-Shannon divergence (0.5).")
    clip_eps_high: float | None = opt(0.28, "ε_high, the grpo branch's upper clip (0.28, the paper's).")

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.normalize in NORMALIZE, "objective.normalize", f"must be std or none, got {self.normalize!r}")
        check(self.entropy_beta >= 0, "objective.entropy_beta", f"must be >= 0, got {self.entropy_beta}")
        check(0 <= self.jsd_beta <= 1, "objective.jsd_beta", f"must be in [0, 1], got {self.jsd_beta}")


class SRPO(Objective):
    name = "srpo"
    summary = "failed rows with a correct sibling: entropy-weighted distillation; the rest: grpo (SRPO)"
    Params = SRPOParams
    columns = (*TOPK, "teacher_entropy")

    def __init__(self, params=None, total_steps: int = 1):
        super().__init__(params, total_steps)
        self.divergence = JSD(JSDParams(beta=self.params.jsd_beta))

    def requirements(self) -> Requirements:
        return Requirements((*self.columns, REFERENCE[self.params.behavior]), min_samples=2,
                            why="a failed row is distilled when a sample of its prompt is correct",
                            behavior_probability=True, on_policy=True, rewards=True)

    def prepare(self, rows: StepRows) -> dict[str, Tensor]:
        mask, groups, rewards = rows.mask, rows.groups, rewards_of(rows)
        correct = (rewards >= 1.0).to(mask.dtype)
        n_correct = group_sum(correct, groups)
        distilled = ((1 - correct) * (n_correct[groups] > 0)).unsqueeze(-1) * mask
        raw = (-self.params.entropy_beta * rows.column("teacher_entropy")).exp() * distilled
        totals = rows.reduce(mask.new_tensor([raw.sum(), distilled.sum()]))
        mean = float(totals[0]) / max(float(totals[1]), 1.0)
        a = group_advantages(rewards, groups, self.params.normalize)
        return {"advantages": a.unsqueeze(-1) * mask, "distilled": distilled,
                "weight": raw / mean if mean > 0 else raw}

    def loss(self, inputs: Inputs) -> Tensor:
        distilled = inputs.prepared["distilled"]
        rl = surrogate(inputs, inputs.prepared["advantages"], self.params)
        return (1 - distilled) * rl + distilled * inputs.prepared["weight"] * self.divergence.loss(inputs)

    def diagnostics(self, inputs: Inputs) -> dict[str, Tensor]:
        return {"distilled_fraction": inputs.prepared["distilled"]}
