"""The losses of OBJECTIVES.md as pure tensor functions, one per objective; no I/O.

Every function returns the per-position loss [N] over the N unmasked completion positions it is
given; the trainer sums these over an optimizer step and divides by the step's token count.
The student's log-softmax over the vocabulary is computed once (`student_view`), in float32,
and everything else is gathered from it, so no second float32 [N × V] copy exists.

Notation as in OBJECTIVES.md: lq_y student log-prob of the sampled token, ℓT teacher log-prob of
it, ℓμ rollout-policy log-prob of it, I/LT teacher top-k ids/log-probs, p̂/q̂ the teacher's and
student's distributions over the top-k plus one tail bucket.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lightopd import config as C

EPS = 1e-8


@dataclass
class StudentView:
    lq_y: Tensor  # [N], with gradient
    lq_topk: Tensor | None  # [N, k] student log-probs at the teacher's top-k ids, with gradient
    entropy: Tensor  # [N], no gradient
    argmax: Tensor  # [N]


def student_view(logits: Tensor, targets: Tensor, topk_ids: Tensor | None, temperature: float = 1.0) -> StudentView:
    """Everything the objectives read from the student's logits [N, V], from one log-softmax."""
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    lq = torch.log_softmax(z, dim=-1)
    with torch.no_grad():
        entropy = -torch.bmm(lq.exp().unsqueeze(1), lq.unsqueeze(2)).view(-1)
        argmax = lq.argmax(dim=-1)
    return StudentView(
        lq_y=lq.gather(-1, targets.unsqueeze(-1)).squeeze(-1),
        lq_topk=None if topk_ids is None else lq.gather(-1, topk_ids),
        entropy=entropy,
        argmax=argmax,
    )


@dataclass
class Inputs:
    """One batch of positions as the objectives see it (stored columns are float32 tensors)."""

    student: StudentView
    teacher_logprobs: Tensor | None = None  # ℓT [N]
    behavior_logprobs: Tensor | None = None  # ℓμ [N]
    topk_ids: Tensor | None = None  # I [N, k]
    topk_logprobs: Tensor | None = None  # LT [N, k]
    advantages: Tensor | None = None  # opd-seq: A [N], computed from the whole step beforehand
    taid_t: float | None = None  # taid: the current interpolation t


# ---- distributions over the top-k support ----

def with_tail(log_topk: Tensor) -> Tensor:
    """[N, k] log-probs -> [N, k+1]: the top-k plus a bucket holding the rest (floored at EPS)."""
    tail = (1.0 - log_topk.exp().sum(-1, keepdim=True)).clamp_min(EPS)
    return torch.cat([log_topk, tail.log()], dim=-1)


def renormalized(log_topk: Tensor) -> Tensor:
    return log_topk - torch.logsumexp(log_topk, dim=-1, keepdim=True)


def supports(inputs: Inputs, support: str) -> tuple[Tensor, Tensor]:
    """(log q̂, log p̂) on the chosen support."""
    make = with_tail if support == "tail" else renormalized
    return make(inputs.student.lq_topk), make(inputs.topk_logprobs.float())


def kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a ‖ b) along the last axis, for log-probability vectors."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def mixture(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(w·a + (1 − w)·b)."""
    if weight_a <= 0:
        return log_b
    if weight_a >= 1:
        return log_a
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


# ---- policy-gradient objectives (sampled-token teacher log-prob) ----

def _importance(inputs: Inputs, params: C.PolicyGradientParams) -> Tensor | float:
    if params.importance == "tis":
        return torch.exp(inputs.student.lq_y.detach() - inputs.behavior_logprobs).clamp(max=params.is_cap)
    return 1.0


def lightning_opd(inputs: Inputs, params: C.PolicyGradientParams) -> Tensor:
    lq_y = inputs.student.lq_y
    advantage = inputs.teacher_logprobs - lq_y.detach()
    return -_importance(inputs, params) * advantage * lq_y


def opd_is(inputs: Inputs, params: C.ImportanceSamplingParams) -> Tensor:
    advantage = inputs.teacher_logprobs - inputs.behavior_logprobs
    ratio = torch.exp(inputs.student.lq_y - inputs.behavior_logprobs).clamp(max=params.is_cap)
    return -ratio * advantage


def vopd(inputs: Inputs, params: C.PolicyGradientParams) -> Tensor:
    lq_y = inputs.student.lq_y
    log_q, log_p = supports(inputs, "tail")
    value = -kl(log_q, log_p).detach()  # V = −KL(q̂ ‖ p̂), a control variate
    advantage = inputs.teacher_logprobs - lq_y.detach() - value
    return -_importance(inputs, params) * advantage * lq_y


def g_opd(inputs: Inputs, params: C.GOPDParams) -> Tensor:
    lq_y, mu = inputs.student.lq_y, inputs.behavior_logprobs
    advantage = params.lambda_ * (inputs.teacher_logprobs - mu) - (lq_y.detach() - mu)
    return -_importance(inputs, params) * advantage * lq_y


def opd_seq(inputs: Inputs, params: C.OPDSeqParams) -> Tensor:
    ratio = torch.exp(inputs.student.lq_y - inputs.behavior_logprobs)
    a = inputs.advantages
    clipped = ratio.clamp(1 - params.clip_eps, 1 + params.clip_eps)
    return -torch.minimum(ratio * a, clipped * a)


def sft(inputs: Inputs, params: C.ObjectiveParams) -> Tensor:
    return -inputs.student.lq_y


# ---- analytic divergences over the top-k support ----

def rkl(inputs: Inputs, params: C.DivergenceParams) -> Tensor:
    log_q, log_p = supports(inputs, params.support)
    return kl(log_q, log_p)


def fkl(inputs: Inputs, params: C.DivergenceParams) -> Tensor:
    log_q, log_p = supports(inputs, params.support)
    return kl(log_p, log_q)


def jsd(inputs: Inputs, params: C.JSDParams) -> Tensor:
    """Generalised JSD with M = β p̂ + (1 − β) q̂; β = 0 is exactly fkl, β = 1 exactly rkl."""
    log_q, log_p = supports(inputs, params.support)
    if params.beta == 0:
        return kl(log_p, log_q)
    if params.beta == 1:
        return kl(log_q, log_p)
    log_m = mixture(log_p, log_q, params.beta)
    return params.beta * kl(log_p, log_m) + (1 - params.beta) * kl(log_q, log_m)


def skew_fkl(inputs: Inputs, params: C.SkewParams) -> Tensor:
    log_q, log_p = supports(inputs, params.support)
    return kl(log_p, mixture(log_p, log_q, params.alpha))


def skew_rkl(inputs: Inputs, params: C.SkewParams) -> Tensor:
    log_q, log_p = supports(inputs, params.support)
    return kl(log_q, mixture(log_p, log_q, 1 - params.alpha))


def taid(inputs: Inputs, params: C.TAIDParams) -> Tensor:
    log_q, log_p = supports(inputs, params.support)
    t = inputs.taid_t
    log_r = torch.log_softmax((1 - t) * log_q.detach() + t * log_p, dim=-1)
    return kl(log_r, log_q)


# ---- opd-seq advantages: computed from stored columns for a whole optimizer step ----

def discounted_returns(rewards: Tensor, mask: Tensor, discount: float) -> Tensor:
    """G[r, t] = Σ_{s ≥ t} γ^{s−t} rewards[r, s] over a row's unmasked positions ([R, T] padded)."""
    r = rewards * mask
    if discount == 0:
        return r
    if discount == 1:
        return r.flip(-1).cumsum(-1).flip(-1) * mask
    steps = torch.arange(r.shape[-1], device=r.device, dtype=r.dtype)
    gap = steps.unsqueeze(0) - steps.unsqueeze(1)  # [t, s] = s − t
    weights = torch.where(gap >= 0, discount ** gap.clamp(min=0), torch.zeros_like(gap))
    return (r @ weights.T) * mask


def leave_one_out(values: Tensor, mask: Tensor, groups: Tensor) -> Tensor:
    """Per row and position: the mean of `values` over the other rows of its group that reach
    that position (0 where none does)."""
    n_groups = int(groups.max()) + 1
    sums = torch.zeros((n_groups, values.shape[1]), dtype=values.dtype, device=values.device)
    counts = torch.zeros_like(sums)
    sums.index_add_(0, groups, values * mask)
    counts.index_add_(0, groups, mask.to(values.dtype))
    others = counts[groups] - mask
    return torch.where(others > 0, (sums[groups] - values * mask) / others.clamp(min=1), torch.zeros_like(values))


def opd_seq_advantages(teacher: Tensor, behavior: Tensor, mask: Tensor, groups: Tensor,
                       params: C.OPDSeqParams, reduce: Callable[[Tensor], Tensor] = lambda t: t) -> Tensor:
    """A = G − B (optionally / std over the step) for padded [R, T] rows; `groups` [R] prompt ids.

    The std is the population std of every valid position of the step; when a step is split
    between ranks, `reduce` sums (count, Σa, Σa²) over them so every rank divides by the same std.
    """
    returns = discounted_returns(teacher - behavior, mask, params.discount)
    advantages = returns - leave_one_out(returns, mask, groups) if params.baseline == "loo" else returns
    if params.normalize:
        valid = advantages[mask.bool()].double()
        count, total, squares = reduce(torch.stack([valid.new_tensor(valid.numel()), valid.sum(),
                                                    valid.square().sum()])).tolist()
        if count > 1:
            std = math.sqrt(max(squares / count - (total / count) ** 2, 0.0))
            advantages = advantages / (std + EPS)
    return advantages * mask


# ---- TAID's adaptive interpolation schedule ----

@dataclass
class TaidSchedule:
    """t rises from t_start to t_end: linearly at least, faster while the loss keeps falling."""

    params: C.TAIDParams
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


# ---- the registry ----

@dataclass(frozen=True)
class Objective:
    name: str
    loss: Callable[[Inputs, C.ObjectiveParams], Tensor]
    params: type[C.ObjectiveParams]
    columns: tuple[str, ...]  # stored columns it reads beyond the rollout's token ids

    @property
    def needs_teacher(self) -> bool:
        return any(c in self.columns for c in ("teacher_logprobs", "topk_ids"))


TOPK = ("topk_ids", "topk_logprobs")
OBJECTIVES: dict[str, Objective] = {o.name: o for o in [
    Objective("lightning-opd", lightning_opd, C.PolicyGradientParams, ("teacher_logprobs", "behavior_logprobs")),
    Objective("opd-is", opd_is, C.ImportanceSamplingParams, ("teacher_logprobs", "behavior_logprobs")),
    Objective("vopd", vopd, C.PolicyGradientParams, ("teacher_logprobs", "behavior_logprobs", *TOPK)),
    Objective("g-opd", g_opd, C.GOPDParams, ("teacher_logprobs", "behavior_logprobs")),
    Objective("opd-seq", opd_seq, C.OPDSeqParams, ("teacher_logprobs", "behavior_logprobs")),
    Objective("rkl", rkl, C.DivergenceParams, TOPK),
    Objective("fkl", fkl, C.DivergenceParams, TOPK),
    Objective("jsd", jsd, C.JSDParams, TOPK),
    Objective("skew-fkl", skew_fkl, C.SkewParams, TOPK),
    Objective("skew-rkl", skew_rkl, C.SkewParams, TOPK),
    Objective("taid", taid, C.TAIDParams, TOPK),
    Objective("sft", sft, C.ObjectiveParams, ()),
]}


def diagnostics(inputs: Inputs) -> dict[str, Tensor]:
    """Per-position diagnostics of OBJECTIVES.md (the trainer averages them over the step)."""
    s = inputs.student
    out = {"student_entropy": s.entropy}
    with torch.no_grad():
        if inputs.teacher_logprobs is not None:
            out["k1"] = s.lq_y.detach() - inputs.teacher_logprobs
        if inputs.behavior_logprobs is not None:
            out["is_ratio"] = torch.exp(s.lq_y.detach() - inputs.behavior_logprobs)
        if inputs.topk_logprobs is not None and s.lq_topk is not None:
            out["teacher_topk_mass"] = inputs.topk_logprobs.float().exp().sum(-1)
            out["student_topk_mass"] = s.lq_topk.detach().exp().sum(-1)
        if inputs.topk_ids is not None:
            out["top1_agree"] = (s.argmax == inputs.topk_ids[:, 0]).float()
    return out
