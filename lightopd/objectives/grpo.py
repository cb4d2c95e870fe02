"""grpo and kdrl: outcome rewards with a group-relative baseline, without and with the teacher.

`grpo` (the reward-only baseline). GRPO: "DeepSeekMath: Pushing the Limits of Mathematical
Reasoning in Open Language Models" (arXiv 2402.03300); its unbiased variant Dr. GRPO:
"Understanding R1-Zero-Like Training: A Critical Perspective" (arXiv 2503.20783). Every token of
row i carries A_i = r_i − mean of its prompt group's rewards, divided by the group's standard
deviation (`normalize = std`, GRPO) or not (`none`, Dr. GRPO); the loss is opd-seq's surrogate
(PPO-clipped ratio to the rollout model, or the current student's gradient). How a row's tokens
are averaged is `length_norm`: `sequence` (GRPO: each row's token mean, then the mean over rows),
`constant` (Dr. GRPO: each row's token sum over a fixed length, the store's max_new_tokens unless
`max_length` is set) or `token` (the step's token mean).

`kdrl`: "KDRL: Post-Training Reasoning LLMs via Unified Knowledge Distillation and Reinforcement
Learning" (arXiv 2506.02208): grpo's loss plus β × an estimate of KL(π_θ ‖ π_T) per token, averaged
like grpo's, on every row or (reward-guided) only on rows whose reward is below a threshold, or
only in groups where no row reaches it. β anneals linearly from `beta` to `beta_end` over the run
(the step count is state, saved in checkpoints). β = 0 is grpo exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lightopd.objectives.base import REFERENCE, TOPK, Inputs, Objective, Requirements, StepRows
from lightopd.objectives.opd_seq import SurrogateParams, clip_fraction, surrogate
from lightopd.objectives.support import kl, supports
from lightopd.objectives.weights import group_sum
from lightopd.options import check, opt

if TYPE_CHECKING:
    from torch import Tensor

NORMALIZE = ("std", "none")
LENGTH_NORM = ("sequence", "constant", "token")
ESTIMATORS = ("k1", "k2", "k3", "topk")
KD_MASKS = ("none", "response", "group")
STD_EPS = 1e-6  # added to a group's std: a group whose rewards are all equal gets A = 0


@dataclass(frozen=True, kw_only=True)
class LengthParams(SurrogateParams):
    """The surrogate, and how a row's token losses are averaged."""

    length_norm: str = opt("sequence", "sequence: each row's token mean, then the mean over rows (GRPO); "
                                       "constant: each row's token sum over max_length (Dr. GRPO); token: the "
                                       "step's token mean.", choices=LENGTH_NORM)
    max_length: int | None = opt(None, "The fixed length of length_norm = constant. [default: the store's "
                                       "max_new_tokens]")

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.length_norm in LENGTH_NORM, "objective.length_norm",
              f"must be one of {', '.join(LENGTH_NORM)}, got {self.length_norm!r}")
        check(self.max_length is None or self.max_length >= 1, "objective.max_length",
              f"must be >= 1, got {self.max_length}")


@dataclass(frozen=True, kw_only=True)
class GRPOParams(LengthParams):
    normalize: str = opt("std", "std: divide each advantage by its group's standard deviation (GRPO); none: "
                                "the group mean alone (Dr. GRPO).", choices=NORMALIZE)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.normalize in NORMALIZE, "objective.normalize", f"must be std or none, got {self.normalize!r}")


@dataclass(frozen=True, kw_only=True)
class KDRLParams(GRPOParams):
    beta: float = opt(0.005, "β: the weight of the KL term at the first step (0 is grpo).")
    beta_end: float = opt(0.001, "β at the last step: β falls linearly from beta to this over the run (KDRL's "
                                 "annealing, 5e-3 to 1e-3); set it to beta for a constant β. Never above beta.")
    estimator: str = opt("k2", "The per-token KL(π ‖ π_T) estimate, with R = ℓT − lq_y: k1 (as a reward, "
                                "−R·lq_y with R held constant), k2 (½R²), k3 (exp(R) − R − 1), or topk (the "
                                "exact KL on the teacher's top-k plus a tail bucket).", choices=ESTIMATORS)
    kd_mask: str = opt("none", "Where the KL term applies: none (every row), response (rows whose reward is "
                               "below reward_threshold), group (rows of groups where no row reaches it).",
                       choices=KD_MASKS)
    reward_threshold: float = opt(1.0, "A reward below this fails, for kd_mask.")

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.beta >= 0, "objective.beta", f"must be >= 0, got {self.beta}")
        check(self.beta_end >= 0, "objective.beta_end", f"must be >= 0, got {self.beta_end}")
        check(self.estimator in ESTIMATORS, "objective.estimator",
              f"must be one of {', '.join(ESTIMATORS)}, got {self.estimator!r}")
        check(self.kd_mask in KD_MASKS, "objective.kd_mask",
              f"must be one of {', '.join(KD_MASKS)}, got {self.kd_mask!r}")


def group_advantages(rewards: Tensor, groups: Tensor, normalize: str, ddof: int = 1) -> Tensor:
    """[R] A_i = r_i − mean of its group's rewards, over the group's std (+ STD_EPS; `ddof` 1: the
    sample std, 0: the population std) with `normalize` std. A group of one row gets 0."""
    count = group_sum(rewards.new_ones(rewards.shape), groups)
    centred = rewards - (group_sum(rewards, groups) / count)[groups]
    if normalize == "none":
        return centred
    squares = group_sum(centred.square(), groups)
    std = (squares / (count - ddof).clamp(min=1)).sqrt()
    return centred / (std[groups] + STD_EPS)


def row_weights(mask: Tensor, params: LengthParams, reduce, counted: Tensor | None = None) -> Tensor:
    """[R] the weight c_i of row i's token losses that turns the step's token mean (the trainer's, over
    N = all of `mask`'s tokens, all ranks, B rows) into `length_norm`'s average over the `counted`
    tokens (default: all): N / (B·|y_i|), N / (B·max_length) or N / N_counted, |y_i| row i's counted
    tokens."""
    counted = mask if counted is None else counted
    lengths = counted.sum(-1)
    totals = reduce(lengths.new_tensor([mask.sum(), counted.sum(), float(len(lengths))]))
    tokens, kept, rows = float(totals[0]), float(totals[1]), float(totals[2])
    if params.length_norm == "token":
        return lengths.new_full(lengths.shape, tokens / max(kept, 1.0))
    if params.length_norm == "constant":
        return lengths.new_full(lengths.shape, tokens / (rows * params.max_length))
    return tokens / (rows * lengths.clamp(min=1))


def rewards_of(rows: StepRows) -> Tensor:
    rewards = rows.row("reward")
    if bool(rewards.isnan().any()):
        raise ValueError("a row without a reward reached an objective that needs rewards")
    return rewards


class GRPO(Objective):
    name = "grpo"
    summary = "outcome rewards alone: group-relative advantages, PPO clipping (GRPO / Dr. GRPO)"
    Params = GRPOParams
    columns: tuple[str, ...] = ()

    def requirements(self) -> Requirements:
        return Requirements((*self.columns, REFERENCE[self.params.behavior]), min_samples=2,
                            why="its baseline is the mean reward of the prompt's samples", behavior_probability=True,
                            on_policy=True, rewards=True)

    def prepare(self, rows: StepRows) -> dict[str, Tensor]:
        a = group_advantages(rewards_of(rows), rows.groups, self.params.normalize)
        c = row_weights(rows.mask, self.params, rows.reduce)
        return {"advantages": a.unsqueeze(-1) * rows.mask, "length_weight": c.unsqueeze(-1) * rows.mask}

    def loss(self, inputs: Inputs) -> Tensor:
        return inputs.prepared["length_weight"] * surrogate(inputs, inputs.prepared["advantages"], self.params)

    def diagnostics(self, inputs: Inputs) -> dict[str, Tensor]:
        return {"clip_fraction": clip_fraction(inputs, inputs.prepared["advantages"], self.params)}


class KDRL(GRPO):
    name = "kdrl"
    summary = "grpo plus β·KL(π ‖ π_T) to the teacher, optionally only on failed rows (KDRL)"
    Params = KDRLParams

    def __init__(self, params: KDRLParams | None = None, total_steps: int = 1):
        super().__init__(params, total_steps)
        self.done = 0  # optimizer steps finished: the schedule's clock, saved in checkpoints

    @property
    def beta(self) -> float:
        """β of the next step: linear from `beta` at the first step to min(beta_end, beta) at the last."""
        start, end = self.params.beta, min(self.params.beta_end, self.params.beta)
        return start + (end - start) * min(1.0, self.done / max(1, self.total_steps - 1))

    @property
    def columns(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("teacher_logprobs", *(TOPK if self.params.estimator == "topk" else ()))

    def prepare(self, rows: StepRows) -> dict[str, Tensor]:
        prepared = super().prepare(rows)
        rewards, threshold = rewards_of(rows), self.params.reward_threshold
        if self.params.kd_mask == "response":
            on = (rewards < threshold).to(rewards.dtype)
        elif self.params.kd_mask == "group":
            best = rewards.new_full((int(rows.groups.max()) + 1,), -math.inf).scatter_reduce_(
                0, rows.groups, rewards, "amax")
            on = (best[rows.groups] < threshold).to(rewards.dtype)
        else:
            on = rewards.new_ones(rewards.shape)
        return {**prepared, "kd_on": on.unsqueeze(-1) * rows.mask}

    def loss(self, inputs: Inputs) -> Tensor:
        rl = surrogate(inputs, inputs.prepared["advantages"], self.params)
        return inputs.prepared["length_weight"] * (rl + self.beta * inputs.prepared["kd_on"] * self.kl(inputs))

    def kl(self, inputs: Inputs) -> Tensor:
        """The per-position estimate of KL(π_θ ‖ π_T) that `estimator` names."""
        lq_y, estimator = inputs.lq_y, self.params.estimator
        if estimator == "topk":
            log_q, log_p = supports(inputs, "tail")
            return kl(log_q, log_p)
        r = inputs.teacher_logprobs - lq_y
        if estimator == "k1":
            return -r.detach() * lq_y
        if estimator == "k2":
            return 0.5 * r.square()
        return r.exp() - r - 1

    def diagnostics(self, inputs: Inputs) -> dict[str, Tensor]:
        return {**super().diagnostics(inputs), "kd_fraction": inputs.prepared["kd_on"]}

    def finish_step(self, step: int, loss: float) -> dict[str, float]:
        used = self.beta
        self.done = step
        return {"kd_beta": used}

    def state_dict(self) -> dict:
        return {"done": self.done}

    def load_state_dict(self, state: dict) -> None:
        self.done = state.get("done", self.done)
