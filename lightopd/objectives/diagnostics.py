"""The per-position diagnostics of docs/objectives.md, written every step whatever the objective.

`k1` (lq_y − ℓT, the sampled estimate of reverse KL), `is_ratio` (exp(lq_y − ℓμ), drift from the
rollout policy; lq_y is under the student's sampling policy, so the ratio is 1 before any
update), `teacher_topk_mass` (P), `student_topk_mass` (Q), `top1_agree` (the student's argmax is
the teacher's first choice) and `student_entropy` (full vocabulary). The trainer averages them
over the step's completion tokens (and reports the max of `is_ratio`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightopd.objectives.base import Inputs

if TYPE_CHECKING:
    from torch import Tensor


def diagnostics(inputs: Inputs) -> dict[str, Tensor]:
    """Per-position values [N] of every diagnostic the inputs allow; none carries a gradient."""
    s = inputs.student
    lq_y = s.policy.detach()
    out = {"student_entropy": s.entropy}
    if inputs.teacher_logprobs is not None:
        out["k1"] = lq_y - inputs.teacher_logprobs
    if inputs.behavior_logprobs is not None:
        out["is_ratio"] = (lq_y - inputs.behavior_logprobs).exp()
    if inputs.topk_logprobs is not None and s.at is not None:
        out["teacher_topk_mass"] = inputs.topk_logprobs.float().exp().sum(-1)
        out["student_topk_mass"] = s.at.detach().exp().sum(-1)
    if inputs.topk_ids is not None:
        out["top1_agree"] = (s.argmax == inputs.topk_ids[:, 0]).float()
    return out
