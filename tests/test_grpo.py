"""grpo and kdrl against hand-written float64 formulas on a hand-built step of two prompt groups:
group-relative advantages (with and without the std), the row weights of each length
normalisation, PPO clipping, kdrl's KL estimators and masks, kdrl at β = 0 equal to grpo, and
zero advantage where a group's rewards are all equal."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightopd import objectives as O
from lightopd.objectives.grpo import STD_EPS, GRPOParams, KDRLParams
from lightopd.objectives.stats import LogprobStats

LENGTHS = [3, 2, 4, 1, 2, 3]
GROUPS = [0, 0, 0, 0, 1, 1]
REWARDS = [1.0, 0.0, 1.0, 0.5, 0.0, 0.0]
EPS = 0.2


def step(rewards=REWARDS):
    """StepRows of the hand-built step, and per-position lq_y (a leaf), ℓold and ℓT."""
    width = max(LENGTHS)
    mask = torch.zeros(len(LENGTHS), width, dtype=torch.float64)
    for i, n in enumerate(LENGTHS):
        mask[i, :n] = 1
    rows = O.StepRows(lambda name: torch.zeros_like(mask), mask, torch.tensor(GROUPS), lambda t: t,
                      lambda name: torch.tensor(rewards, dtype=torch.float64))
    n = sum(LENGTHS)
    g = np.random.default_rng(0)
    lq_y = torch.tensor(-g.uniform(0.1, 3.0, n), requires_grad=True)
    old = lq_y.detach() - torch.tensor(np.linspace(-0.5, 0.5, n))  # ratios e^-0.5 .. e^0.5: some clipped
    teacher = torch.tensor(-g.uniform(0.1, 3.0, n))
    return rows, lq_y, old, teacher


def loss_and_grad(name, params, rewards=REWARDS):
    rows, lq_y, old, teacher = step(rewards)
    objective = O.OBJECTIVES[name](params)
    prepared = {k: v[rows.mask.bool()] for k, v in objective.prepare(rows).items()}
    view = LogprobStats(lq_y, torch.zeros(len(lq_y)), torch.zeros(len(lq_y), dtype=torch.long))
    inputs = O.Inputs(view, teacher_logprobs=teacher, policy_logprobs=old, prepared=prepared)
    loss = objective.loss(inputs)
    (grad,) = torch.autograd.grad(loss.sum(), lq_y)
    return loss.detach().numpy(), grad.numpy(), lq_y.detach().numpy(), old.numpy(), teacher.numpy()


def hand_advantages(rewards, normalize):
    r, groups = np.array(rewards), np.array(GROUPS)
    a = np.zeros(len(r))
    for g in set(GROUPS):
        member = groups == g
        centred = r[member] - r[member].mean()
        a[member] = centred / (r[member].std(ddof=1) + STD_EPS) if normalize == "std" else centred
    return np.repeat(a, LENGTHS)


def hand_row_weights(length_norm, max_length=8):
    n, b = sum(LENGTHS), len(LENGTHS)
    per_row = {"sequence": [n / (b * m) for m in LENGTHS], "constant": [n / (b * max_length)] * b,
               "token": [1.0] * b}[length_norm]
    return np.repeat(per_row, LENGTHS)


def hand_surrogate(lq_y, old, a):
    """−min(ρA, clip(ρ)A) and its derivative in lq_y (ρA's where the min takes it, else 0)."""
    rho = np.exp(lq_y - old)
    clipped = np.clip(rho, 1 - EPS, 1 + EPS)
    loss = -np.minimum(rho * a, clipped * a)
    live = (rho * a <= clipped * a) | ((rho >= 1 - EPS) & (rho <= 1 + EPS))
    return loss, np.where(live, -rho * a, 0.0)


@pytest.mark.parametrize("normalize", ["std", "none"])
@pytest.mark.parametrize("length_norm", ["sequence", "constant", "token"])
def test_grpo_against_its_formula(normalize, length_norm):
    params = GRPOParams(normalize=normalize, length_norm=length_norm, max_length=8, clip_eps=EPS)
    loss, grad, lq_y, old, _ = loss_and_grad("grpo", params)
    a, c = hand_advantages(REWARDS, normalize), hand_row_weights(length_norm)
    want, want_grad = hand_surrogate(lq_y, old, a)
    np.testing.assert_allclose(loss, c * want, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(grad, c * want_grad, rtol=1e-12, atol=1e-15)
    assert (want_grad == 0).any() and (want_grad != 0).any(), "the clip is exercised"


def test_equal_rewards_within_every_group_give_zero_advantage():
    rewards = [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    for normalize in ("std", "none"):
        loss, grad, *_ = loss_and_grad("grpo", GRPOParams(normalize=normalize), rewards)
        assert np.all(loss == 0) and np.all(grad == 0)


def test_kdrl_with_beta_zero_is_grpo_exactly():
    for settings in ({}, {"normalize": "none", "length_norm": "token"}, {"anchor": "current"}):
        got = loss_and_grad("kdrl", KDRLParams(beta=0.0, **settings))
        want = loss_and_grad("grpo", GRPOParams(**settings))
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("kd_mask", ["none", "response", "group"])
def test_kdrl_against_its_formula(estimator, kd_mask):
    beta = 0.3
    params = KDRLParams(beta=beta, estimator=estimator, kd_mask=kd_mask, clip_eps=EPS)
    loss, grad, lq_y, old, teacher = loss_and_grad("kdrl", params)
    a, c = hand_advantages(REWARDS, "std"), hand_row_weights("sequence")
    rl, rl_grad = hand_surrogate(lq_y, old, a)
    r = teacher - lq_y
    value, slope = {"k1": (-r * lq_y, -r),  # R held constant: the reward form
                    "k2": (0.5 * r ** 2, -r),
                    "k3": (np.exp(r) - r - 1, 1 - np.exp(r))}[estimator]
    failed = np.array(REWARDS) < 1.0
    on_row = {"none": np.ones(6, bool), "response": failed,
              "group": np.array([False, False, False, False, True, True])}[kd_mask]  # group 0 has a pass
    on = np.repeat(on_row, LENGTHS)
    np.testing.assert_allclose(loss, c * (rl + beta * on * value), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(grad, c * (rl_grad + beta * on * slope), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("settings, want", [
    ({"row_weight": "paced"}, [0.25] * 4 + [0.0] * 2),  # group 0 passes 2 of 4: p(1 − p); group 1 never
    ({"row_weight": "paced", "paced_alpha": 2.0}, [0.125] * 4 + [0.0] * 2),
    ({"reward_gate": 0.5}, [1.0, 0.0, 1.0, 1.0, 0.0, 0.0]),
    ({"row_weight": "paced", "reward_gate": 1.0}, [0.25, 0.0, 0.25, 0.0, 0.0, 0.0]),
])
def test_row_weights_by_hand(settings, want):
    rows, *_ = step()
    objective = O.OBJECTIVES["lightning-opd"](O.OBJECTIVES["lightning-opd"].Params(**settings))
    got = objective.row_weights(rows)
    np.testing.assert_allclose(got.numpy(), np.array(want)[:, None] * rows.mask.numpy())
    needs = objective.needs()
    assert needs.rewards and needs.min_samples == (2 if "row_weight" in settings else 1)
    assert O.OBJECTIVES["lightning-opd"]().row_weights(rows) is None


@pytest.mark.parametrize("alpha", [0.8, 0.0])
def test_redi_against_its_formula(alpha):
    """−mean over positive rows of their length-normalised log-likelihood + α × the same over negatives."""
    rows, lq_y, *_ = step()
    objective = O.OBJECTIVES["redi"](O.OBJECTIVES["redi"].Params(alpha=alpha))
    prepared = {k: v[rows.mask.bool()] for k, v in objective.prepare(rows).items()}
    view = LogprobStats(lq_y, torch.zeros(len(lq_y)), torch.zeros(len(lq_y), dtype=torch.long))
    step_loss = objective.loss(O.Inputs(view, prepared=prepared)).sum() / len(lq_y)  # the trainer's token mean
    (grad,) = torch.autograd.grad(step_loss, lq_y)
    per_row = np.split(lq_y.detach().numpy(), np.cumsum(LENGTHS)[:-1])
    positive = [r >= 1.0 for r in REWARDS]  # rows 0, 2
    pos = [row.mean() for row, p in zip(per_row, positive, strict=True) if p]
    neg = [row.mean() for row, p in zip(per_row, positive, strict=True) if not p]
    assert step_loss.item() == pytest.approx(-np.mean(pos) + alpha * np.mean(neg), rel=1e-12)
    want = np.concatenate([np.full(n, (-1 / 2 if p else alpha / 4) / n)
                           for n, p in zip(LENGTHS, positive, strict=True)])
    np.testing.assert_allclose(grad.numpy(), want, rtol=1e-12)
