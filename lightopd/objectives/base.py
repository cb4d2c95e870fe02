"""The Objective protocol: what every loss of docs/objectives.md declares and implements.

An objective declares its parameters (a dataclass of `opt` fields next to its loss), the stored
columns and store properties it needs (`Requirements`, checked before training starts), any state
it carries across optimizer steps (`state_dict`), and two hooks around a step: `prepare` computes
per-position inputs from the whole step's stored columns before any forward (opd-seq's
advantages), and `finish_step` updates its state from the step's loss (TAID's t). `loss` maps one
micro-batch of positions to a per-position loss; the trainer sums it over the step and divides by
the step's completion tokens. The trainer knows no objective by name.

Losses use tensor methods only, so this package imports without torch (`--help` lists the
objectives in a fraction of a second).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from lightopd.objectives.weights import gate, paced
from lightopd.options import MIN_TEMPERATURE, check, opt

if TYPE_CHECKING:
    from torch import Tensor

    from lightopd.objectives.stats import LogprobStats

EPS = 1e-8  # floors probabilities inside logs (the tail buckets)
LOG_EPS = math.log(EPS)
TEACHER_COLUMNS = ("teacher_logprobs", "topk_ids", "topk_logprobs", "teacher_log_tail")
TOPK = ("topk_ids", "topk_logprobs", "teacher_log_tail")
SUPPORT_COLUMNS = ("support_ids", "support_logprobs")  # the sampled support (score-teacher --support-samples)
ROW_WEIGHTS = ("none", "paced")


@dataclass(frozen=True, kw_only=True)
class ObjectiveParams:
    """Shared by every objective."""

    temperature: float | None = opt(None, "τ: the student's log-probs are log_softmax(logits / τ). Default: 1 for "
                                          "sft, which learns samples as they are (the HF labels= loss); for every "
                                          "other objective the store's sampling temperature (1 for a greedy store), "
                                          "so that the student that sampled the store has lq_y = ℓold.")
    row_weight: str = opt("none", "none, or paced: weight each row by p^paced_alpha (1 − p)^paced_beta, p its "
                                  "prompt's pass rate (PACED). Needs rewards and n ≥ 2.", choices=ROW_WEIGHTS)
    paced_alpha: float = opt(1.0, "α of the paced weight.")
    paced_beta: float = opt(1.0, "β of the paced weight.")
    reward_gate: float | None = opt(None, "Keep the objective's signal only on rows whose reward is at least this "
                                          "(KEPO's quality gate); others weigh 0. Needs rewards.")

    def __post_init__(self) -> None:
        check(self.temperature is None or self.temperature >= MIN_TEMPERATURE, "objective.temperature",
              f"must be at least {MIN_TEMPERATURE}, got {self.temperature}")
        check(self.row_weight in ROW_WEIGHTS, "objective.row_weight",
              f"must be one of {', '.join(ROW_WEIGHTS)}, got {self.row_weight!r}")
        check(self.paced_alpha >= 0 and self.paced_beta >= 0, "objective.paced_alpha/paced_beta",
              f"must be >= 0, got {self.paced_alpha}, {self.paced_beta}")

    @property
    def weighs_rows(self) -> bool:
        """Whether rows are weighted by their rewards (row_weight, reward_gate)."""
        return self.row_weight != "none" or self.reward_gate is not None


SHARED = ("temperature", "row_weight", "paced_alpha", "paced_beta", "reward_gate")  # every objective's parameters


BEHAVIORS = ("policy", "sampler")
REFERENCE = {"policy": "policy_logprobs", "sampler": "behavior_logprobs"}  # the stored column of each


@dataclass(frozen=True, kw_only=True)
class RatioParams(ObjectiveParams):
    """Shared by the objectives that take a ratio or a reward against the rollout model."""

    behavior: str = opt("policy", "What ratios and rewards are taken against. policy: ℓold, the rollout model's "
                                  "untruncated softmax at its temperature (ratio 1 before any update; the "
                                  "sampler's truncation is a known behaviour mismatch, left uncorrected); "
                                  "sampler: ℓμ, the distribution the tokens were drawn from (after top-p, top-k, "
                                  "min-p, penalties), which corrects for the truncation by importance weighting.",
                        choices=BEHAVIORS)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.behavior in BEHAVIORS, "objective.behavior", f"must be policy or sampler, got {self.behavior!r}")


@dataclass(frozen=True)
class Requirements:
    """What a store must offer for an objective to train on it."""

    columns: tuple[str, ...] = ()  # stored per-token columns beyond the token ids
    min_samples: int = 1  # samples per prompt (rollout --n)
    why: str = ""  # the reason for min_samples, for the error message
    behavior_probability: bool = False  # reads ℓμ as a probability, so a greedy store (ℓμ ≡ 0) will not do
    rewards: bool = False  # reads each row's reward (rollout --checker), grouped by prompt
    on_policy: bool = False  # assumes the rollouts were sampled by the student (or the model it came from)

    @property
    def teacher(self) -> bool:
        """Whether it needs a teacher store (score-teacher's columns)."""
        return any(c in TEACHER_COLUMNS for c in self.columns)


@dataclass
class Inputs:
    """One micro-batch of N completion positions as the objectives see it."""

    student: LogprobStats  # the student's log-probs (with gradient), entropy and argmax
    teacher_logprobs: Tensor | None = None  # ℓT [N]
    behavior_logprobs: Tensor | None = None  # ℓμ [N]: under the distribution sampled from
    policy_logprobs: Tensor | None = None  # ℓold [N]: under the rollout model's untruncated softmax at its T
    topk_ids: Tensor | None = None  # I [N, k]
    topk_logprobs: Tensor | None = None  # LT [N, k]
    teacher_log_tail: Tensor | None = None  # log of the teacher's mass outside its top-k [N]
    reference_logprobs: Tensor | None = None  # ℓref [N]: a reference model's, scored once (score-teacher --reference)
    support_ids: Tensor | None = None  # [N, m] tokens drawn from the teacher's distribution, ascending
    support_logprobs: Tensor | None = None  # ℓT at them [N, m]
    prepared: dict[str, Tensor] = field(default_factory=dict)  # the objective's `prepare` outputs, [N] each

    @property
    def lq_y(self) -> Tensor:
        """The student's log-prob of each sampled token under its full softmax at τ, with gradient
        [N]: never cut to a nucleus, so every position has a gradient; with the student equal to the
        rollout model and τ its temperature, lq_y = ℓold."""
        return self.student.sampled

    def reference(self, behavior: str) -> Tensor:
        """ℓold (`behavior` policy) or ℓμ (sampler) [N]: what ratios and rewards are taken against."""
        return self.policy_logprobs if behavior == "policy" else self.behavior_logprobs

    @property
    def lq_topk(self) -> Tensor | None:
        """The student's log-probs at the teacher's top-k ids, with gradient [N, k]."""
        return self.student.at


@dataclass
class StepRows:
    """A whole optimizer step's rows, for `Objective.prepare` (padded [R, T], row-major)."""

    column: Callable[[str], Tensor]  # a stored per-token column as float64 [R, T], zero past each row's end
    mask: Tensor  # [R, T] float64: 1 at real positions
    groups: Tensor  # [R] int64: the prompt group of each row (a prompt's samples share one)
    reduce: Callable[[Tensor], Tensor]  # sums a tensor over the ranks that share the step
    row: Callable[[str], Tensor] | None = None  # a stored per-row column (reward) as float64 [R], NaN for null
    spans: list | None = None  # each row's marked spans, (start, end, kind) token offsets (data/spans.py), if read


class Objective:
    """A per-position loss over stored columns; subclasses set the class attributes and `loss`."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line, for --help
    Params: ClassVar[type[ObjectiveParams]] = ObjectiveParams
    columns: ClassVar[tuple[str, ...]] = ()
    default_temperature: ClassVar[float | None] = None  # τ when objective.temperature is unset; None: the store's

    def __init__(self, params: ObjectiveParams | None = None, total_steps: int = 1):
        self.params = params if params is not None else self.Params()
        self.total_steps = total_steps

    def requirements(self) -> Requirements:
        return Requirements(self.columns)

    def needs(self) -> Requirements:
        """`requirements()` with what the shared row weights add (rewards; n ≥ 2 for a pass rate)."""
        own, params = self.requirements(), self.params
        if not params.weighs_rows:
            return own
        paced = params.row_weight == "paced"
        return dataclasses.replace(
            own, rewards=True, min_samples=max(own.min_samples, 2 if paced else 1),
            why=own.why or ("the paced weight is the pass rate of the prompt's samples" if paced else ""))

    def row_weights(self, rows: StepRows) -> Tensor | None:
        """[R, T] the shared row weights of the step (None without any): paced × reward gate."""
        params = self.params
        if not params.weighs_rows:
            return None
        rewards = rows.row("reward")
        weight = rewards.new_ones(rewards.shape)
        if params.row_weight == "paced":
            weight = weight * paced(rewards, rows.groups, params.paced_alpha, params.paced_beta)
        if params.reward_gate is not None:
            weight = weight * gate(rewards, params.reward_gate)
        return weight.unsqueeze(-1) * rows.mask

    def prepare(self, rows: StepRows) -> dict[str, Tensor]:
        """Per-position inputs computed from the whole step before any forward, each [R, T]."""
        return {}

    def loss(self, inputs: Inputs) -> Tensor:
        raise NotImplementedError

    def diagnostics(self, inputs: Inputs) -> dict[str, Tensor]:
        """Per-position values [N] of the objective's own diagnostics, averaged over the step."""
        return {}

    def finish_step(self, step: int, loss: float) -> dict[str, float]:
        """After optimizer step `step` (1-based): update carried state; returns metrics of the step."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
