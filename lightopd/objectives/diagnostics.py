"""The per-position diagnostics of docs/objectives.md, written every step whatever the objective.

`k1` (lq_y − ℓT, the sampled estimate of reverse KL), `is_ratio` (w = exp(lq_y − ℓold), drift from
the rollout model: both are full softmaxes at τ, so the ratio is 1 before any update), and from it
two measures of how stale the store has become: `rollout_kl` (w − 1 − log w, the k3 estimate of
KL(π_old ‖ π_θ) on tokens π_old sampled: 0 before any update) and `is_ess` (the importance
weights' effective sample size over the step, (Σw)² / (N Σw²), 1 before any update; the trainer
forms it from the per-position w² here, `is_ratio_sq`),
`teacher_topk_mass` (P), `student_topk_mass` (Q), `top1_agree` (the student's argmax is the
teacher's first choice) and `student_entropy` (full vocabulary); and two of the store's sampler:
`sampler_single_token` (positions where it kept a single token, ℓμ = 0: there the sampled token
was certain, yet the student still learns from it) and `sampler_kept_mass` (exp(ℓold − ℓμ), the
probability the truncation kept; with penalties, the ratio of the model's probability of the
token to the sampler's). The trainer averages them over the step's completion tokens (and
reports the max of `is_ratio`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightopd.objectives.base import Inputs

if TYPE_CHECKING:
    from torch import Tensor


def diagnostics(inputs: Inputs) -> dict[str, Tensor]:
    """Per-position values [N] of every diagnostic the inputs allow; none carries a gradient."""
    s = inputs.student
    lq_y = s.sampled.detach()
    out = {"student_entropy": s.entropy}
    if inputs.teacher_logprobs is not None:
        out["k1"] = lq_y - inputs.teacher_logprobs
    if inputs.policy_logprobs is not None:
        log_w = lq_y - inputs.policy_logprobs
        out["is_ratio"] = log_w.exp()
        out["is_ratio_sq"] = (2 * log_w).exp()
        out["rollout_kl"] = log_w.exp() - 1 - log_w
    if inputs.behavior_logprobs is not None:
        out["sampler_single_token"] = (inputs.behavior_logprobs == 0).float()
        if inputs.policy_logprobs is not None:
            out["sampler_kept_mass"] = (inputs.policy_logprobs - inputs.behavior_logprobs).exp()
    if inputs.topk_logprobs is not None and s.at is not None:
        out["teacher_topk_mass"] = inputs.topk_logprobs.float().exp().sum(-1)
        out["student_topk_mass"] = s.at.detach().exp().sum(-1)
    if inputs.topk_ids is not None:
        out["top1_agree"] = (s.argmax == inputs.topk_ids[:, 0]).float()
    return out
