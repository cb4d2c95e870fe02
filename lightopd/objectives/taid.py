"""taid: KL to a target that moves from the student towards the teacher over training (TAID).

The target is r = softmax((1 − t)·sg(log q̂) + t·log p̂) on the top-k support; the loss is
KL(r ‖ q̂). t starts at `t_start` and rises to `t_end`: at least linearly, faster while the loss
keeps falling (the adaptive rule below). t is state carried across steps and saved in
checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lightopd.objectives.base import Inputs
from lightopd.objectives.divergences import DivergenceParams, TopKDivergence
from lightopd.objectives.support import blend, kl, supports
from lightopd.options import check, opt

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True, kw_only=True)
class TAIDParams(DivergenceParams):
    t_start: float = opt(0.4, "The interpolation t at the first step.")
    t_end: float = opt(1.0, "The largest t, reached by the last step at the latest.")
    alpha: float = opt(5e-4, "How fast t moves ahead of the linear schedule while the loss falls.")
    momentum: float = opt(0.99, "Momentum of the relative loss change that drives t.")

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0 <= self.t_start <= self.t_end <= 1, "objective.t_start/t_end",
              f"need 0 <= t_start <= t_end <= 1, got {self.t_start}, {self.t_end}")
        check(0 <= self.momentum < 1, "objective.momentum", f"must be in [0, 1), got {self.momentum}")


@dataclass
class TaidSchedule:
    """t rises from t_start to t_end: linearly at least, faster while the loss keeps falling."""

    params: TAIDParams
    total_steps: int
    t: float = 0.0
    momentum: float = 0.0
    previous_loss: float | None = None

    def __post_init__(self) -> None:
        self.t = self.params.t_start

    def update(self, step: int, loss: float) -> float:
        """After optimizer step `step` (1-based) with loss `loss`: the t for the next step."""
        p = self.params
        linear = p.t_start + (p.t_end - p.t_start) * min(1.0, step / max(1, self.total_steps))
        if self.previous_loss is not None and self.previous_loss != 0:
            delta = (self.previous_loss - loss) / self.previous_loss
            self.momentum = p.momentum * self.momentum + (1 - p.momentum) * delta
        self.previous_loss = loss
        sigmoid = 1.0 / (1.0 + math.exp(-self.momentum))
        self.t = min(p.t_end, max(linear, self.t + p.alpha * sigmoid * (1 - self.t)))
        return self.t


class TAID(TopKDivergence):
    name = "taid"
    summary = "KL to an interpolation that moves from the student to the teacher (TAID)"
    Params = TAIDParams

    def __init__(self, params: TAIDParams | None = None, total_steps: int = 1):
        super().__init__(params, total_steps)
        self.schedule = TaidSchedule(self.params, total_steps)

    def loss(self, inputs: Inputs) -> Tensor:
        log_q, log_p = supports(inputs, self.params.support)
        target = blend(log_q.detach(), log_p, self.schedule.t)
        return kl(target, log_q)

    def finish_step(self, step: int, loss: float) -> dict[str, float]:
        used = self.schedule.t
        self.schedule.update(step, loss)
        return {"taid_t": used}

    def state_dict(self) -> dict:
        s = self.schedule
        return {"t": s.t, "momentum": s.momentum, "previous_loss": s.previous_loss}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.schedule.t, self.schedule.momentum = state["t"], state["momentum"]
            self.schedule.previous_loss = state["previous_loss"]
