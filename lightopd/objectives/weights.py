"""Row weights from outcome rewards, composable with any objective, and the per-prompt-group sums
they and the reward objectives are built from (tensor methods only).

- PACED ("PACED: Distillation and On-Policy Self-Distillation at the Frontier of Student
  Competence", arXiv 2603.11178): each row weighted by w(p) = p^α (1 − p)^β, p the pass rate of
  its prompt's samples (a sample passes when its reward is at least 1); α = β = 1 is the paper's
  p(1 − p). Prompts the student always or never solves get no weight. The weights are not
  renormalised over the step (the paper states no renormalisation), so they also scale the loss.
- KEPO ("KEPO: Knowledge-Enhanced Preference Optimization ...", arXiv 2602.00400): a quality gate,
  the objective's signal only on rows whose reward is at least the gate (its authors' code gates
  the teacher's signal to rows with reward ≥ τ, τ = 1).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor


def group_sum(values: Tensor, groups: Tensor) -> Tensor:
    """[G, ...] the sum of `values` [R, ...] over the rows of each prompt group (`groups` [R], 0..G−1)."""
    return values.new_zeros((int(groups.max()) + 1, *values.shape[1:])).index_add_(0, groups, values)


def pass_rates(rewards: Tensor, groups: Tensor) -> Tensor:
    """[R] the share of each row's prompt group whose reward is at least 1."""
    passed = group_sum((rewards >= 1.0).to(rewards.dtype), groups)
    return (passed / group_sum(rewards.new_ones(rewards.shape), groups))[groups]


def paced(rewards: Tensor, groups: Tensor, alpha: float, beta: float) -> Tensor:
    """[R] w(p) = p^α (1 − p)^β of each row's group pass rate p."""
    p = pass_rates(rewards, groups)
    return p.pow(alpha) * (1 - p).pow(beta)


def gate(rewards: Tensor, threshold: float) -> Tensor:
    """[R] 1 on rows whose reward is at least `threshold`, else 0."""
    return (rewards >= threshold).to(rewards.dtype)
