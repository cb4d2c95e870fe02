"""redi: REDI, "Harnessing Negative Signals: Reinforcement Distillation from Teacher Data for LLM
Reasoning" (arXiv 2505.24850). Reference-free and offline: on a store of (usually the teacher's)
samples with rewards, it raises the length-normalised log-likelihood of the positive traces and
lowers, α times as strongly, that of the negative ones:

    L = − mean_{positive rows} (1/|y|) Σ_t lq_y  +  α · mean_{negative rows} (1/|y|) Σ_t lq_y

A row is positive when its reward is at least 1. The paper pairs one positive with one negative
trace per prompt and averages over pairs; a store holds n samples per prompt, so the two means are
taken over the step's positive and negative rows (over all ranks): the paper's loss when every
prompt gives one of each. A step without negatives is SFT on its positives (length-normalised);
one without positives only pushes its negatives down. Like sft it learns samples, not a policy:
τ is 1 unless set. α = 0.8, the paper's choice ("we recommend initially fixing α = 0.8").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lightopd.objectives.base import Inputs, Objective, ObjectiveParams, Requirements, StepRows
from lightopd.options import check, opt

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True, kw_only=True)
class REDIParams(ObjectiveParams):
    alpha: float = opt(0.8, "α: the weight of the negative traces' term (0 is length-normalised SFT on the "
                            "positives; 1 is symmetric).")

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0 <= self.alpha <= 1, "objective.alpha", f"must be in [0, 1], got {self.alpha}")


class REDI(Objective):
    name = "redi"
    summary = "raise positive traces' length-normalised log-likelihood, lower negatives' α times as much (REDI)"
    Params = REDIParams
    default_temperature = 1.0  # it learns stored traces as they are, like sft

    def requirements(self) -> Requirements:
        return Requirements((), rewards=True)

    def prepare(self, rows: StepRows) -> dict[str, Tensor]:
        """Per position, the signed weight of −lq_y: N / (B₊·|y|) on positive rows, −α·N / (B₋·|y|)
        on negative ones (N the step's completion tokens, B± its positive and negative rows)."""
        positive = (rows.row("reward") >= 1.0).to(rows.mask.dtype)
        lengths = rows.mask.sum(-1)
        totals = rows.reduce(lengths.new_tensor([lengths.sum(), positive.sum(), (1 - positive).sum()]))
        tokens, n_pos, n_neg = (float(x) for x in totals)
        per_row = (positive * tokens / max(n_pos, 1) - (1 - positive) * self.params.alpha * tokens / max(n_neg, 1))
        return {"signed_weight": (per_row / lengths.clamp(min=1)).unsqueeze(-1) * rows.mask}

    def loss(self, inputs: Inputs) -> Tensor:
        return -inputs.prepared["signed_weight"] * inputs.student.sampled
