"""What one chunk of a micro-batch's completion positions computes in a training step: the
objectives' view of the chunk (its logits' statistics, the stored columns, the prepared inputs),
the objective's per-position loss times the weights every objective shares (the reward-based row
weights, the token selection, the teachers' weights), and the step's diagnostics (the shared ones,
the objective's own, the selection's kept and dropped split, each teacher's share, loss and k1).
"""

from __future__ import annotations

import torch

from lightopd.objectives import Inputs, Objective
from lightopd.objectives.diagnostics import diagnostics
from lightopd.objectives.stats import logprob_stats
from lightopd.objectives.support import kl, supports

ROW_WEIGHT = "row_weight"  # the shared row weights' key among the prepared inputs, and its diagnostic
TOKEN_WEIGHT = "token_weight"  # the token selection's weights' key among the prepared inputs
TEACHER_WEIGHT = "teacher_weight"  # --teacher-weight's weights of each row's teacher
SHARED_WEIGHTS = (ROW_WEIGHT, TOKEN_WEIGHT, TEACHER_WEIGHT)
TEACHER = "teacher/"  # the prefix of each teacher's positions among the prepared inputs (several teacher stores)


def chunk_inputs(mb, logits: torch.Tensor, lo: int, hi: int, temperature: float = 1.0,
                 prepared: dict[str, torch.Tensor] | None = None) -> Inputs:
    """The objectives' view of positions lo:hi of a micro-batch, from their logits: the student's
    statistics at `temperature`, the stored columns and the prepared inputs of those positions."""
    stored = {name: values[lo:hi] for name, values in mb.stored.items()}
    student = logprob_stats(logits, mb.targets[lo:hi], temperature, at=stored.get("topk_ids"),
                            support=stored.get("support_ids"))
    return Inputs(student, **stored, prepared={name: v[lo:hi] for name, v in (prepared or {}).items()})


def chunk_loss(objective: Objective, mb, prepared: dict[str, torch.Tensor]):
    """The function of one chunk of a micro-batch's completion positions (their logits, lo, hi) that
    returns their per-position loss (with gradient) and diagnostics (without), for engine.chunks."""
    own = {name: values for name, values in prepared.items() if name not in SHARED_WEIGHTS
           and not name.startswith(TEACHER)}

    def loss(logits: torch.Tensor, lo: int, hi: int):
        with torch.autocast(logits.device.type, enabled=False):  # statistics in float32
            inputs = chunk_inputs(mb, logits, lo, hi, objective.params.temperature, own)
            per_token = objective.loss(inputs)
            with torch.no_grad():
                diagnosed = {**diagnostics(inputs), **objective.diagnostics(inputs)}
                for name in prepared:  # per teacher: its share of the positions, its loss and k1 there
                    if name.startswith(TEACHER):
                        diagnosed.update(per_teacher(name.removeprefix(TEACHER), prepared[name][lo:hi], per_token,
                                                     diagnosed))
            if TEACHER_WEIGHT in prepared:  # --teacher-weight, on any objective's loss
                per_token = per_token * prepared[TEACHER_WEIGHT][lo:hi]
            if ROW_WEIGHT in prepared:  # the shared reward-based row weights, on any objective's loss
                weight = prepared[ROW_WEIGHT][lo:hi]
                per_token = per_token * weight
                diagnosed[ROW_WEIGHT] = weight
            if TOKEN_WEIGHT in prepared:  # the token selection, on any objective's loss
                weight = prepared[TOKEN_WEIGHT][lo:hi]
                per_token = per_token * weight
                diagnosed.update(kept_split(diagnosed, (weight > 0).float()))
        return per_token, {name: values.detach() for name, values in diagnosed.items()}

    return loss


def per_teacher(name: str, mine: torch.Tensor, per_token: torch.Tensor, diagnosed: dict[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
    """A teacher's diagnostics: `teacher_token_frac/NAME` (its positions), and its loss and k1 (summed
    here, divided by its positions in the step's record)."""
    out = {f"teacher_token_frac/{name}": mine, f"teacher_loss/{name}": per_token.detach() * mine}
    if "k1" in diagnosed:
        out[f"teacher_k1/{name}"] = diagnosed["k1"] * mine
    return out


def kept_split(diagnosed: dict[str, torch.Tensor], kept: torch.Tensor) -> dict[str, torch.Tensor]:
    """The selection's diagnostics: `kept_fraction`, and the student entropy and k1 of the kept and
    the dropped positions (summed here, divided by their counts in the step's record)."""
    out = {"kept_fraction": kept}
    for name in ("student_entropy", "k1"):
        if name in diagnosed:
            out[f"kept_{name}"] = diagnosed[name] * kept
            out[f"dropped_{name}"] = diagnosed[name] * (1 - kept)
    return out


def student_statistics(mb, temperature: float):
    """The function of one chunk of a micro-batch's positions that returns the current student's
    entropy and its divergence from the teacher (KL(q̂ ‖ p̂) on the top-k with the tail where the store
    has it, else |lq_y − ℓT|), for the token selection's pass without gradients."""
    def stats(logits: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(logits.device.type, enabled=False):
            inputs = chunk_inputs(mb, logits, lo, hi, temperature)
            student = inputs.student
            if inputs.topk_logprobs is not None and inputs.teacher_log_tail is not None:
                divergence = kl(*supports(inputs, "tail"))
            elif inputs.teacher_logprobs is not None:
                divergence = (inputs.lq_y - inputs.teacher_logprobs).abs()
            else:  # a rollout store: only the entropy selection runs on it (train checks)
                divergence = student.entropy * 0
        return student.entropy.float(), divergence.float()

    return stats
