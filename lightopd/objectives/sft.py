"""sft: cross-entropy on the stored completions (SFT, or sequence-level KD on a teacher's samples).

It reads only the token ids, so it trains on a rollout store; a teacher store works too. Its τ is 1
unless `objective.temperature` says otherwise, whatever temperature the store was sampled at: it
learns samples, not a policy, and at τ = 1 its loss is the HF `labels=` loss.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightopd.objectives.base import Inputs, Objective

if TYPE_CHECKING:
    from torch import Tensor


class SFT(Objective):
    name = "sft"
    summary = "cross-entropy on the stored completions (works on a rollout store; τ = 1 by default)"
    default_temperature = 1.0  # not on-policy: it learns someone else's samples as they are, whatever T drew them

    def loss(self, inputs: Inputs) -> Tensor:
        return -inputs.student.sampled  # the full softmax: every other token is pushed down, nucleus or not
