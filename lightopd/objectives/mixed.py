"""Objectives that mix the teacher into an outcome-calibrated policy gradient: uni-opd and rlad.

`uni-opd`: Uni-OPD, "Uni-OPD: Unifying On-Policy Distillation with a Dual-Perspective Recipe"
(arXiv 2605.03677), outcome-guided margin calibration as its authors' code does it (margin_shift,
with the settings of its released scripts: per prompt group, by the mean, shifted both ways). The
per-token advantage is the teacher's reward A_t = ℓT − ℓref; with s_i the mean of row i's A_t, a
group whose correct rows' mean s does not exceed its wrong rows' mean s by the margin δ gets the
difference made up: shift = (s̄_wrong − s̄_correct) + δ, +shift/2 on every token of its correct
rows and −shift/2 on its wrong rows'. Groups without both outcomes are left as they are. Tokens
where |ℓref − ℓT| ≥ `max_gap` (10) are dropped, from the means and the loss alike, as the authors'
trainer masks them. The loss is the PPO surrogate of opd-seq with its clip-higher (ε_high 0.28),
averaged per row then over rows (length_norm sequence).

`rlad`: RLAD's trust-region ratio distillation (TRRD), "Reinforcement-aware Knowledge Distillation
for LLM Reasoning" (arXiv 2602.22495): GRPO's advantage (the group's population std, as the paper
writes it) with the ratio anchored to a geometric mixture of the rollout model and the teacher,
    log r = α (lq_y − ℓref) + (1 − α) · clamp(lq_y − ℓT, −1, 1),
PPO-clipped (its Eq. 3, α = 0.5, and App. B's clamp); α = 1 is grpo's ratio (its anchor is its
own: `anchor` and `is_cap` are not used).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lightopd.objectives.base import REFERENCE, Inputs, Objective, Requirements, StepRows
from lightopd.objectives.grpo import GRPOParams, LengthParams, group_advantages, rewards_of, row_weights
from lightopd.objectives.opd_seq import ppo_clip, surrogate
from lightopd.objectives.weights import group_sum
from lightopd.options import check, opt

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True, kw_only=True)
class UniOPDParams(LengthParams):
    margin: float = opt(0.4, "δ: how far a group's correct rows' mean teacher advantage must exceed its wrong "
                             "rows' (0.4, the authors' scripts).")
    max_gap: float | None = opt(10.0, "Drop tokens where |ℓref − ℓT| ≥ this from the loss and from their row's "
                                      "token count (10, the authors' trainer); none keeps every token.")
    clip_eps_high: float | None = opt(0.28, "ε_high, the clip's upper side (0.28, the authors' scripts).")

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.margin >= 0, "objective.margin", f"must be >= 0, got {self.margin}")
        check(self.max_gap is None or self.max_gap > 0, "objective.max_gap", f"must be > 0, got {self.max_gap}")


def margin_shift(advantages: Tensor, mask: Tensor, correct: Tensor, groups: Tensor, margin: float) -> Tensor:
    """[R] the shift each row's token advantages get (see the module doc); 0 where none is needed."""
    s = (advantages * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    counted = mask.sum(-1) > 0  # a row whose every token was dropped takes no part in the means
    c, w = (correct & counted).to(s.dtype), (~correct & counted).to(s.dtype)
    n_c, n_w = group_sum(c, groups), group_sum(w, groups)
    mean_c = group_sum(s * c, groups) / n_c.clamp(min=1)
    mean_w = group_sum(s * w, groups) / n_w.clamp(min=1)
    shift = ((mean_w - mean_c) + margin).where((mean_c - mean_w < margin) & (n_c > 0) & (n_w > 0), 0.0)
    return (c - w) * shift[groups] / 2


class UniOPD(Objective):
    name = "uni-opd"
    summary = "teacher advantages ℓT − ℓref shifted so a group's correct rows beat its wrong ones by δ (Uni-OPD)"
    Params = UniOPDParams
    columns = ("teacher_logprobs",)

    def requirements(self) -> Requirements:
        return Requirements((*self.columns, REFERENCE[self.params.behavior]), behavior_probability=True,
                            on_policy=True, rewards=True)

    def prepare(self, rows: StepRows) -> dict[str, Tensor]:
        mask, params = rows.mask, self.params
        advantages = (rows.column("teacher_logprobs") - rows.column(REFERENCE[params.behavior])) * mask
        kept = mask if params.max_gap is None else mask * (advantages.abs() < params.max_gap)
        shift = margin_shift(advantages, kept, rewards_of(rows) >= 1.0, rows.groups, params.margin)
        c = row_weights(mask, params, rows.reduce, counted=kept)
        return {"advantages": (advantages + shift.unsqueeze(-1)) * kept, "length_weight": c.unsqueeze(-1) * kept,
                "kept": kept}

    def diagnostics(self, inputs: Inputs) -> dict[str, Tensor]:
        return {"gap_kept_fraction": inputs.prepared["kept"]}

    def loss(self, inputs: Inputs) -> Tensor:
        return inputs.prepared["length_weight"] * surrogate(inputs, inputs.prepared["advantages"], self.params)


@dataclass(frozen=True, kw_only=True)
class RLADParams(GRPOParams):
    alpha: float = opt(0.5, "α of the ratio's anchor: α · rollout model + (1 − α) · teacher, geometrically "
                            "(0.5, the paper's); 1 is grpo's ratio.")

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0 <= self.alpha <= 1, "objective.alpha", f"must be in [0, 1], got {self.alpha}")


class RLAD(Objective):
    name = "rlad"
    summary = "grpo with the ratio anchored to a mixture of the rollout model and the teacher (RLAD's TRRD)"
    Params = RLADParams
    columns = ("teacher_logprobs",)

    def requirements(self) -> Requirements:
        return Requirements((*self.columns, REFERENCE[self.params.behavior]), min_samples=2,
                            why="its baseline is the mean reward of the prompt's samples", behavior_probability=True,
                            on_policy=True, rewards=True)

    def prepare(self, rows: StepRows) -> dict[str, Tensor]:
        a = group_advantages(rewards_of(rows), rows.groups, self.params.normalize, ddof=0)
        c = row_weights(rows.mask, self.params, rows.reduce)
        return {"advantages": a.unsqueeze(-1) * rows.mask, "length_weight": c.unsqueeze(-1) * rows.mask}

    def loss(self, inputs: Inputs) -> Tensor:
        lq_y, a, alpha = inputs.lq_y, inputs.prepared["advantages"], self.params.alpha
        log_ratio = alpha * (lq_y - inputs.reference(self.params.behavior)) + (1 - alpha) * (
            lq_y - inputs.teacher_logprobs).clamp(-1.0, 1.0)
        return inputs.prepared["length_weight"] * ppo_clip(log_ratio.exp(), a, self.params.clip)
