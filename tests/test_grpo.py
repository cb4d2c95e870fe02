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


def hand_surrogate(lq_y, old, a, high=EPS, low=EPS):
    """−min(ρA, clip(ρ, 1 − ε, 1 + ε_high)A) and its derivative in lq_y (ρA's where the min takes it,
    else 0)."""
    rho = np.exp(lq_y - old)
    clipped = np.clip(rho, 1 - low, 1 + high)
    loss = -np.minimum(rho * a, clipped * a)
    live = (rho * a <= clipped * a) | ((rho >= 1 - low) & (rho <= 1 + high))
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


def test_grpo_clip_higher_against_its_formula():
    """DAPO's clip-higher: the ratio clipped to [1 − ε, 1 + ε_high], ε_high 0.12 > ε 0.05; ratios in
    (1.05, 1.12] with a positive advantage keep their gradient only under the higher clip."""
    params = GRPOParams(clip_eps=0.05, clip_eps_high=0.12)
    loss, grad, lq_y, old, _ = loss_and_grad("grpo", params)
    a, c = hand_advantages(REWARDS, "std"), hand_row_weights("sequence")
    want, want_grad = hand_surrogate(lq_y, old, a, high=0.12, low=0.05)
    np.testing.assert_allclose(loss, c * want, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(grad, c * want_grad, rtol=1e-12, atol=1e-15)
    _, symmetric_grad = hand_surrogate(lq_y, old, a, high=0.05, low=0.05)
    assert (want_grad != symmetric_grad).any(), "some ratio lies between the two upper clips"


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


def test_kdrl_beta_anneals_linearly_and_resumes():
    """β falls from beta at the first step to beta_end at the last, linearly; the step count is saved
    in a checkpoint; β = 0 stays 0 whatever beta_end is (so kdrl at β = 0 is grpo at every step)."""
    kdrl = O.OBJECTIVES["kdrl"]
    objective = kdrl(KDRLParams(beta=0.005, beta_end=0.001), total_steps=5)
    used = [objective.finish_step(step, 1.0)["kd_beta"] for step in range(1, 6)]
    np.testing.assert_allclose(used, [0.005, 0.004, 0.003, 0.002, 0.001], rtol=1e-12)
    resumed = kdrl(KDRLParams(beta=0.005, beta_end=0.001), total_steps=5)
    partial = kdrl(KDRLParams(beta=0.005, beta_end=0.001), total_steps=5)
    for step in (1, 2):
        partial.finish_step(step, 1.0)
    resumed.load_state_dict(partial.state_dict())
    assert resumed.beta == pytest.approx(0.003, rel=1e-12)
    zero = kdrl(KDRLParams(beta=0.0), total_steps=5)
    assert [zero.finish_step(step, 1.0)["kd_beta"] for step in range(1, 6)] == [0.0] * 5
    constant = kdrl(KDRLParams(beta=0.005, beta_end=0.005), total_steps=5)
    assert {constant.finish_step(step, 1.0)["kd_beta"] for step in range(1, 6)} == {0.005}


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


def stored_step(columns: dict[str, np.ndarray]):
    """StepRows whose per-token columns are the given flat arrays, padded [R, T]."""
    rows, *_ = step()
    mask = rows.mask

    def column(name):
        out = torch.zeros_like(mask)
        out[mask.bool()] = torch.tensor(columns[name])
        return out
    return O.StepRows(column, mask, rows.groups, rows.reduce, rows.row)


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def test_scope_against_its_formula():
    _, lq_y, old, teacher = step()
    rows = stored_step({"policy_logprobs": old.numpy(), "teacher_logprobs": teacher.numpy()})
    objective = O.OBJECTIVES["scope"]()
    prepared = {k: v[rows.mask.bool()] for k, v in objective.prepare(rows).items()}
    view = LogprobStats(lq_y, torch.zeros(len(lq_y)), torch.zeros(len(lq_y), dtype=torch.long))
    loss = objective.loss(O.Inputs(view, teacher_logprobs=teacher, policy_logprobs=old, prepared=prepared))
    (grad,) = torch.autograd.grad(loss.sum(), lq_y)
    split = lambda x: np.split(x, np.cumsum(LENGTHS)[:-1])  # noqa: E731
    mean_old, mean_t = [r.mean() for r in split(old.numpy())], [r.mean() for r in split(teacher.numpy())]
    w = np.zeros(6)
    for members, scores in (([0, 2], [-mean_old[i] for i in (0, 2)]), ([1, 3], [mean_t[i] for i in (1, 3)]),
                            ([4, 5], [mean_t[i] for i in (4, 5)])):
        w[members] = softmax(np.array(scores))  # PPL_S^(1/T) among the correct, PPL_T^(−1/T) among the wrong
    scale = sum(LENGTHS) / 2  # N / P: the mean over the two prompts of each group's token sums
    x, t, o = lq_y.detach().numpy(), teacher.numpy(), old.numpy()
    rho = np.exp(x - o)
    correct = np.repeat([True, False, True, False, False, False], LENGTHS)
    weight = scale * np.repeat(w, LENGTHS)
    np.testing.assert_allclose(loss.detach().numpy(), weight * np.where(correct, -rho, rho * (x - t)), rtol=1e-12)
    np.testing.assert_allclose(grad.numpy(), weight * np.where(correct, -rho, rho * (x - t)), rtol=1e-12)


def top_k_world(k=3, vocab=6):
    """Student logits and a teacher over a small vocabulary, the teacher's top-k (k < V) with its tail,
    and the hand-built tail buckets p̂ = [p_I, 1 − P], q̂ = [q_I, 1 − Q] per position."""
    from lightopd.objectives.stats import logprob_stats

    n = sum(LENGTHS)
    g = np.random.default_rng(1)
    student_logits = torch.tensor(g.normal(0, 2, (n, vocab)), requires_grad=True)
    teacher_lp = torch.log_softmax(torch.tensor(g.normal(0, 2, (n, vocab))), -1)
    targets = torch.tensor(g.integers(0, vocab, n))
    top_lp, top_ids = teacher_lp.topk(k, -1)
    tail = teacher_lp.scatter(-1, top_ids, float("-inf")).logsumexp(-1)
    view = logprob_stats(student_logits, targets, at=top_ids)
    q, p, ids = torch.softmax(student_logits.detach(), -1).numpy(), teacher_lp.exp().numpy(), top_ids.numpy()
    buckets = [(np.append(p[i, ids[i]], 1 - p[i, ids[i]].sum()), np.append(q[i, ids[i]], 1 - q[i, ids[i]].sum()))
               for i in range(n)]
    return view, teacher_lp, top_lp, top_ids, tail, buckets


def test_kdrl_topk_estimator_is_the_tail_bucket_kl():
    _, _, old, _ = step()
    view, teacher_lp, top_lp, top_ids, tail, buckets = top_k_world()
    rows = stored_step({})
    beta = 0.3
    objective = O.OBJECTIVES["kdrl"](KDRLParams(beta=beta, estimator="topk", clip_eps=EPS))
    prepared = {key: v[rows.mask.bool()] for key, v in objective.prepare(rows).items()}
    teacher = teacher_lp.gather(-1, view.argmax.unsqueeze(-1)).squeeze(-1)  # unused by topk
    inputs = O.Inputs(view, teacher_logprobs=teacher, policy_logprobs=old, topk_ids=top_ids, topk_logprobs=top_lp,
                      teacher_log_tail=tail, prepared=prepared)
    loss = objective.loss(inputs).detach().numpy()
    kl = np.array([(qh * np.log(qh / ph)).sum() for ph, qh in buckets])
    rl, _ = hand_surrogate(view.sampled.detach().numpy(), old.numpy(), hand_advantages(REWARDS, "std"))
    np.testing.assert_allclose(loss, hand_row_weights("sequence") * (rl + beta * kl), rtol=1e-6, atol=1e-9)


def test_srpo_routes_and_weights_by_hand():
    """Failed rows of a group with a correct row (rows 1 and 3) are distilled with exp(−H_T) weights of
    mean 1 over their tokens; every other row takes grpo's surrogate."""
    _, _, old, _ = step()
    n = sum(LENGTHS)
    view, teacher_lp, top_lp, top_ids, tail, buckets = top_k_world()
    entropy = -(teacher_lp.exp() * teacher_lp).sum(-1)
    rows = stored_step({"policy_logprobs": old.numpy(), "teacher_entropy": entropy.numpy()})
    objective = O.OBJECTIVES["srpo"]()
    prepared = {key: v[rows.mask.bool()] for key, v in objective.prepare(rows).items()}
    inputs = O.Inputs(view, policy_logprobs=old, topk_ids=top_ids, topk_logprobs=top_lp, teacher_log_tail=tail,
                      prepared=prepared)
    loss = objective.loss(inputs).detach().numpy()
    distilled = np.repeat([False, True, False, True, False, False], LENGTHS)
    raw = np.exp(-entropy.numpy())
    weight = raw / raw[distilled].mean()
    jsd = np.zeros(n)
    for i, (ph, qh) in enumerate(buckets):
        m = 0.5 * ph + 0.5 * qh
        jsd[i] = 0.5 * (ph * np.log(ph / m)).sum() + 0.5 * (qh * np.log(qh / m)).sum()
    rl, _ = hand_surrogate(view.sampled.detach().numpy(), old.numpy(), hand_advantages(REWARDS, "std"), high=0.28)
    np.testing.assert_allclose(loss, np.where(distilled, weight * jsd, rl), rtol=1e-6, atol=1e-9)


def test_uni_opd_margin_calibration_by_hand():
    """Group 0's correct rows (0, 2) must beat its wrong rows (1, 3) by δ in mean teacher advantage;
    group 1 has no correct row and is left alone."""
    _, lq_y, old, teacher = step()
    rows = stored_step({"policy_logprobs": old.numpy(), "teacher_logprobs": teacher.numpy()})
    delta = 5.0  # wide enough that group 0 is shifted whatever its advantages
    objective = O.OBJECTIVES["uni-opd"](O.OBJECTIVES["uni-opd"].Params(margin=delta, clip_eps=EPS, max_gap=None))
    prepared = {k: v[rows.mask.bool()] for k, v in objective.prepare(rows).items()}
    view = LogprobStats(lq_y, torch.zeros(len(lq_y)), torch.zeros(len(lq_y), dtype=torch.long))
    loss = objective.loss(O.Inputs(view, teacher_logprobs=teacher, policy_logprobs=old, prepared=prepared))
    a = teacher.numpy() - old.numpy()
    s = [r.mean() for r in np.split(a, np.cumsum(LENGTHS)[:-1])]
    shift = (np.mean([s[1], s[3]]) - np.mean([s[0], s[2]])) + delta
    a = a + np.repeat([shift / 2, -shift / 2, shift / 2, -shift / 2, 0, 0], LENGTHS)
    want, _ = hand_surrogate(lq_y.detach().numpy(), old.numpy(), a, high=0.28)
    np.testing.assert_allclose(loss.detach().numpy(), hand_row_weights("sequence") * want, rtol=1e-12)
    after = [r.mean() for r in np.split(a, np.cumsum(LENGTHS)[:-1])]
    assert np.mean([after[0], after[2]]) - np.mean([after[1], after[3]]) == pytest.approx(delta)


def test_uni_opd_drops_far_tokens_and_clips_higher_by_hand():
    """At its defaults but a gap small enough to bite: tokens with |ℓref − ℓT| ≥ max_gap leave the
    loss, the rows' means and the rows' token counts; the clip is [1 − ε, 1 + 0.28]."""
    _, lq_y, old, teacher = step()
    rows = stored_step({"policy_logprobs": old.numpy(), "teacher_logprobs": teacher.numpy()})
    gap, delta = 1.2, 0.4
    objective = O.OBJECTIVES["uni-opd"](O.OBJECTIVES["uni-opd"].Params(clip_eps=EPS, max_gap=gap))
    assert objective.params.margin == delta and objective.params.clip_eps_high == 0.28
    prepared = {k: v[rows.mask.bool()] for k, v in objective.prepare(rows).items()}
    view = LogprobStats(lq_y, torch.zeros(len(lq_y)), torch.zeros(len(lq_y), dtype=torch.long))
    loss = objective.loss(O.Inputs(view, teacher_logprobs=teacher, policy_logprobs=old, prepared=prepared))
    a = teacher.numpy() - old.numpy()
    kept = np.abs(a) < gap
    assert 0 < kept.sum() < len(a), "the gap drops some tokens and keeps others"
    split = lambda x: np.split(x, np.cumsum(LENGTHS)[:-1])  # noqa: E731
    s = [r[k].mean() if k.any() else 0.0 for r, k in zip(split(a), split(kept), strict=True)]
    mean_c, mean_w = np.mean([s[0], s[2]]), np.mean([s[1], s[3]])
    shift = (mean_w - mean_c) + delta if mean_c - mean_w < delta else 0.0
    a = (a + np.repeat([shift / 2, -shift / 2, shift / 2, -shift / 2, 0, 0], LENGTHS)) * kept
    want, _ = hand_surrogate(lq_y.detach().numpy(), old.numpy(), a, high=0.28)
    counts = np.array([k.sum() for k in split(kept)])
    c = np.repeat(sum(LENGTHS) / (len(LENGTHS) * np.maximum(counts, 1)), LENGTHS)  # the row means over kept tokens
    np.testing.assert_allclose(loss.detach().numpy(), c * want * kept, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_rlad_against_its_formula(alpha):
    _, lq_y, old, teacher = step()
    rows = stored_step({})
    objective = O.OBJECTIVES["rlad"](O.OBJECTIVES["rlad"].Params(alpha=alpha, clip_eps=EPS))
    prepared = {k: v[rows.mask.bool()] for k, v in objective.prepare(rows).items()}
    view = LogprobStats(lq_y, torch.zeros(len(lq_y)), torch.zeros(len(lq_y), dtype=torch.long))
    loss = objective.loss(O.Inputs(view, teacher_logprobs=teacher, policy_logprobs=old, prepared=prepared))
    (grad,) = torch.autograd.grad(loss.sum(), lq_y)
    r, groups = np.array(REWARDS), np.array(GROUPS)
    a = np.zeros(6)
    for g in (0, 1):  # the population std, as the paper writes it
        member = groups == g
        a[member] = (r[member] - r[member].mean()) / (r[member].std(ddof=0) + STD_EPS)
    a = np.repeat(a, LENGTHS)
    x, o, t = lq_y.detach().numpy(), old.numpy(), teacher.numpy()
    log_r = alpha * (x - o) + (1 - alpha) * np.clip(x - t, -1, 1)
    rho = np.exp(log_r)
    clipped = np.clip(rho, 1 - EPS, 1 + EPS)
    c = hand_row_weights("sequence")
    np.testing.assert_allclose(loss.detach().numpy(), c * -np.minimum(rho * a, clipped * a), rtol=1e-12, atol=1e-15)
    live = (rho * a <= clipped * a) | ((rho >= 1 - EPS) & (rho <= 1 + EPS))
    slope = alpha + (1 - alpha) * (np.abs(x - t) < 1)
    np.testing.assert_allclose(grad.numpy(), np.where(live, c * -a * rho * slope, 0.0), rtol=1e-12, atol=1e-15)
