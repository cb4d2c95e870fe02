"""sft: cross-entropy on the stored completions (SFT, or sequence-level KD on a teacher's samples).

It reads only the token ids, so it trains on a rollout store; a teacher store works too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightopd.objectives.base import Inputs, Objective

if TYPE_CHECKING:
    from torch import Tensor


class SFT(Objective):
    name = "sft"
    summary = "cross-entropy on the stored completions (works on a rollout store)"

    def loss(self, inputs: Inputs) -> Tensor:
        return -inputs.student.sampled  # the full softmax: every other token is pushed down, nucleus or not
