"""Objectives against independent float64 full-vocabulary references and hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightopd import objectives as O
from lightopd.objectives.diagnostics import diagnostics
from lightopd.objectives.divergences import DivergenceParams, JSDParams, SkewParams
from lightopd.objectives.opd_seq import OPDSeqParams, advantages, discounted_returns
from lightopd.objectives.policy_gradient import GOPDParams, PolicyGradientParams
from lightopd.objectives.stats import LogprobStats, logprob_stats
from lightopd.objectives.taid import TAIDParams, TaidSchedule
from tests.reference import log_softmax64

V = 12


def make_case(n=6, k=V, seed=0, temperature=1.0):
    """Random student and teacher logits; the teacher's top-k as a teacher store would hold it."""
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(n, V, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    teacher = torch.randn(n, V, generator=g, dtype=torch.float64) * 2
    targets = torch.randint(0, V, (n,), generator=g)
    lp = torch.log_softmax(teacher, -1)
    top_lp, top_ids = lp.topk(k, -1)
    behavior = torch.log_softmax(student.detach() / temperature, -1).gather(-1, targets[:, None]).squeeze(-1) - 0.1
    return student, teacher, targets, top_lp, top_ids, lp.gather(-1, targets[:, None]).squeeze(-1), behavior


def inputs_for(student, targets, top_lp, top_ids, teacher_lp, behavior, temperature=1.0, teacher=None,
               **extra) -> O.Inputs:
    """The objectives' inputs; the teacher's tail log-mass from its full logits when given."""
    view = logprob_stats(student, targets, temperature or 1.0, at=top_ids)
    tail = None
    if teacher is not None:
        lp = torch.log_softmax(teacher, -1)
        tail = lp.scatter(-1, top_ids, float("-inf")).logsumexp(-1)
    return O.Inputs(view, teacher_logprobs=teacher_lp, behavior_logprobs=behavior, policy_logprobs=behavior,
                    topk_ids=top_ids,
                    topk_logprobs=top_lp, teacher_log_tail=tail, **extra)


def loss(name, params, inputs, t=None):
    """The per-position loss of objective `name` (for taid, at interpolation `t`)."""
    objective = O.OBJECTIVES[name](params)
    if t is not None:
        objective.schedule.t = t
    return objective.loss(inputs)


def full_reference(student, teacher, temperature=1.0):
    """float64 numpy full-vocabulary log q and log p."""
    return log_softmax64(student.detach().numpy() / temperature), log_softmax64(teacher.numpy())


def kl_np(la, lb):
    return (np.exp(la) * (la - lb)).sum(-1)


def mix_np(la, lb, w):
    return np.log(w * np.exp(la) + (1 - w) * np.exp(lb))


@pytest.mark.parametrize("name,params,reference", [
    ("rkl", DivergenceParams(), lambda q, p: kl_np(q, p)),
    ("fkl", DivergenceParams(), lambda q, p: kl_np(p, q)),
    ("jsd", JSDParams(beta=0.0), lambda q, p: kl_np(p, q)),
    ("jsd", JSDParams(beta=0.5), lambda q, p: 0.5 * kl_np(p, mix_np(p, q, 0.5)) + 0.5 * kl_np(q, mix_np(p, q, 0.5))),
    ("jsd", JSDParams(beta=0.3), lambda q, p: 0.3 * kl_np(p, mix_np(p, q, 0.3)) + 0.7 * kl_np(q, mix_np(p, q, 0.3))),
    ("jsd", JSDParams(beta=1.0), lambda q, p: kl_np(q, p)),
    ("skew-fkl", SkewParams(alpha=0.1), lambda q, p: kl_np(p, mix_np(p, q, 0.1))),
    ("skew-rkl", SkewParams(alpha=0.1), lambda q, p: kl_np(q, mix_np(p, q, 0.9))),
    ("rkl", DivergenceParams(support="renormalized"), lambda q, p: kl_np(q, p)),
    ("rkl", DivergenceParams(temperature=2.0), lambda q, p: kl_np(q, p)),
])
def test_divergences_with_full_vocabulary_equal_exact_values(name, params, reference):
    temperature = params.temperature or 1.0
    student, teacher, targets, top_lp, top_ids, teacher_lp, behavior = make_case(temperature=temperature)
    inputs = inputs_for(student, targets, top_lp, top_ids, teacher_lp, behavior, temperature, teacher=teacher)
    got = loss(name, params, inputs).detach().numpy()
    q, p = full_reference(student, teacher, temperature)
    np.testing.assert_allclose(got, reference(q, p), atol=1e-6, rtol=1e-6)


def test_taid_with_full_vocabulary_equals_exact_value():
    student, teacher, targets, top_lp, top_ids, teacher_lp, behavior = make_case()
    t = 0.6
    inputs = inputs_for(student, targets, top_lp, top_ids, teacher_lp, behavior, teacher=teacher)
    got = loss("taid", TAIDParams(), inputs, t=t).detach().numpy()
    q, p = full_reference(student, teacher)
    r = log_softmax64((1 - t) * q + t * p)
    np.testing.assert_allclose(got, kl_np(r, q), atol=1e-6)


def test_tail_bucket_is_a_lower_bound_of_the_full_divergence():
    student, teacher, targets, top_lp, top_ids, teacher_lp, behavior = make_case(k=3, seed=1)
    inputs = inputs_for(student, targets, top_lp, top_ids, teacher_lp, behavior, teacher=teacher)
    q, p = full_reference(student, teacher)
    for name, full in (("rkl", kl_np(q, p)), ("fkl", kl_np(p, q))):
        got = loss(name, DivergenceParams(), inputs).detach().numpy()
        assert (got <= full + 1e-9).all() and (got < full - 1e-6).any()


def test_lightning_opd_gradient_is_that_of_half_squared_error():
    student, _, targets, top_lp, top_ids, teacher_lp, behavior = make_case(seed=2)
    total = loss("lightning-opd", PolicyGradientParams(),
                 inputs_for(student, targets, top_lp, top_ids, teacher_lp, behavior)).sum()
    (grad,) = torch.autograd.grad(total, student)
    lq_y = torch.log_softmax(student, -1).gather(-1, targets[:, None]).squeeze(-1)
    (want,) = torch.autograd.grad((0.5 * (lq_y - teacher_lp) ** 2).sum(), student)
    torch.testing.assert_close(grad, want, atol=1e-6, rtol=1e-5)  # the student side is float32 by design


def test_g_opd_with_lambda_one_is_lightning_opd():
    student, _, targets, top_lp, top_ids, teacher_lp, behavior = make_case(seed=3)
    inputs = inputs_for(student, targets, top_lp, top_ids, teacher_lp, behavior)
    (g1,) = torch.autograd.grad(loss("g-opd", GOPDParams(lambda_=1.0), inputs).sum(), student, retain_graph=True)
    (g2,) = torch.autograd.grad(loss("lightning-opd", PolicyGradientParams(), inputs).sum(), student)
    torch.testing.assert_close(g1, g2)


def test_truncated_importance_weights():
    student, _, targets, top_lp, top_ids, teacher_lp, _ = make_case(seed=4)
    lq_y = torch.log_softmax(student.detach(), -1).gather(-1, targets[:, None]).squeeze(-1)
    behavior = lq_y - torch.tensor([2.0, 0.5, -0.5, 0.0, 1.0, -3.0], dtype=torch.float64)  # ratios e^2 ... e^-3
    inputs = inputs_for(student, targets, top_lp, top_ids, teacher_lp, behavior)
    plain = loss("lightning-opd", PolicyGradientParams(), inputs)
    tis = loss("lightning-opd", PolicyGradientParams(importance="tis", is_cap=2.0), inputs)
    weights = torch.exp(lq_y - behavior).clamp(max=2.0)
    torch.testing.assert_close(tis, plain * weights)
    assert weights[0] == 2.0 and weights[5] == pytest.approx(math.exp(-3))


def test_opd_seq_reduces_to_lightning_opd_on_policy():
    student, _, targets, top_lp, top_ids, teacher_lp, _ = make_case(seed=5)
    on_policy = torch.log_softmax(student.detach(), -1).gather(-1, targets[:, None]).squeeze(-1)
    params = OPDSeqParams(discount=0.0, baseline="none", normalize=False)
    rows = teacher_lp.view(1, -1)
    adv = advantages(rows, on_policy.view(1, -1), torch.ones_like(rows), torch.tensor([0]), params)
    inputs = inputs_for(student, targets, top_lp, top_ids, teacher_lp, on_policy, prepared={"advantages": adv.view(-1)})
    (g_seq,) = torch.autograd.grad(loss("opd-seq", params, inputs).sum(), student, retain_graph=True)
    (g_light,) = torch.autograd.grad(loss("lightning-opd", PolicyGradientParams(), inputs).sum(), student)
    torch.testing.assert_close(g_seq, g_light, atol=1e-6, rtol=1e-6)


def test_opd_seq_returns_baselines_and_clipping_by_hand():
    # group 0: rows 0 and 1; group 1: row 2. Rewards r = ℓT − ℓμ.
    rewards = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0], [2.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]], dtype=torch.float64)
    returns = discounted_returns(rewards, mask, 0.5)
    torch.testing.assert_close(returns, torch.tensor([[2.75, 3.5, 3.0], [0.0, -1.0, 0.0], [2.0, 0.0, 0.0]],
                                                     dtype=torch.float64))
    params = OPDSeqParams(discount=0.5, normalize=False)
    adv = advantages(rewards, torch.zeros_like(rewards), mask, torch.tensor([0, 0, 1]), params)
    torch.testing.assert_close(adv, torch.tensor([[2.75, 4.5, 3.0], [-2.75, -4.5, 0.0], [2.0, 0.0, 0.0]],
                                                 dtype=torch.float64))
    normalized = advantages(rewards, torch.zeros_like(rewards), mask, torch.tensor([0, 0, 1]),
                            OPDSeqParams(discount=0.5))
    valid = adv[mask.bool()]
    torch.testing.assert_close(normalized[mask.bool()], valid / valid.std(unbiased=False))

    # clipping: ratio 1.5 or 0.5, advantage +1 or −1, ε = 0.2
    lq_y = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    behavior = -torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5], dtype=torch.float64))
    advantage = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    view = LogprobStats(lq_y, torch.zeros(4), torch.zeros(4, dtype=torch.long))
    clipped = loss("opd-seq", OPDSeqParams(),
                   O.Inputs(view, policy_logprobs=behavior, prepared={"advantages": advantage}))
    torch.testing.assert_close(clipped.detach(), torch.tensor([-1.2, 1.5, -0.5, 0.8], dtype=torch.float64))
    (grad,) = torch.autograd.grad(clipped.sum(), lq_y)
    torch.testing.assert_close(grad, torch.tensor([0.0, 1.5, -0.5, 0.0], dtype=torch.float64))


def test_vopd_baseline_leaves_the_expected_gradient_unchanged():
    """On-policy samples y ~ q: the Monte-Carlo gradients of vopd and lightning-opd both match the
    exact expected gradient Σ_y q(y) ∇L(y) (the control variate has zero mean) and vopd's varies less."""
    g = torch.Generator().manual_seed(11)
    z = (torch.randn(1, V, generator=g, dtype=torch.float64) * 1.5).requires_grad_(True)
    teacher = torch.log_softmax(torch.randn(1, V, generator=g, dtype=torch.float64) * 1.5, -1)
    q = torch.softmax(z.detach(), -1)[0]
    top_lp, top_ids = teacher.topk(4, -1)

    def per_sample_grads(name, targets):
        n = len(targets)
        logits = z.expand(n, V)
        inputs = inputs_for(logits, targets, top_lp.expand(n, 4), top_ids.expand(n, 4),
                            teacher[0, targets], torch.log(q[targets]), teacher=teacher.expand(n, V))
        losses = loss(name, PolicyGradientParams(), inputs)
        return torch.stack([torch.autograd.grad(losses[i], z, retain_graph=True)[0][0] for i in range(n)])

    every = torch.arange(V)
    exact = (q[:, None] * per_sample_grads("lightning-opd", every)).sum(0)
    exact_v = (q[:, None] * per_sample_grads("vopd", every)).sum(0)
    torch.testing.assert_close(exact_v, exact, atol=1e-7, rtol=0)  # unbiased up to float32 rounding

    samples = torch.multinomial(q, 4000, replacement=True, generator=g)
    light, vo = per_sample_grads("lightning-opd", samples), per_sample_grads("vopd", samples)
    for mc in (light, vo):
        stderr = mc.std(0) / math.sqrt(len(samples))
        assert ((mc.mean(0) - exact).abs() <= 4 * stderr + 1e-9).all()
    assert vo.var(0).sum() < light.var(0).sum()


def test_taid_schedule_follows_its_rule():
    params = TAIDParams(t_start=0.4, t_end=1.0, alpha=0.2, momentum=0.5)
    schedule = TaidSchedule(params, total_steps=10)
    assert schedule.t == 0.4
    losses = [2.0, 1.0, 0.9, 1.5]
    t, m, prev, ts = 0.4, 0.0, None, []
    for step, loss in enumerate(losses, 1):
        if prev is not None:
            m = 0.5 * m + 0.5 * (prev - loss) / prev
        prev = loss
        linear = 0.4 + 0.6 * step / 10
        t = min(1.0, max(linear, t + 0.2 / (1 + math.exp(-m)) * (1 - t)))
        assert schedule.update(step, loss) == pytest.approx(t)
        ts.append(t)
    assert ts[1] > 0.4 + 0.6 * 2 / 10, "a falling loss moves t ahead of the linear schedule"
    late = TaidSchedule(TAIDParams(alpha=0.0), total_steps=4)
    assert [late.update(s, 1.0) for s in range(1, 6)] == pytest.approx([0.55, 0.7, 0.85, 1.0, 1.0])


def test_diagnostics():
    student, teacher, targets, top_lp, top_ids, teacher_lp, behavior = make_case(k=4, seed=6)
    d = diagnostics(inputs_for(student, targets, top_lp, top_ids, teacher_lp, behavior))
    q, p = full_reference(student, teacher)
    np.testing.assert_allclose(d["student_entropy"].numpy(), -(np.exp(q) * q).sum(-1), atol=1e-6)
    np.testing.assert_allclose(d["k1"].numpy(), q[np.arange(6), targets] - p[np.arange(6), targets], atol=1e-6)
    np.testing.assert_allclose(d["is_ratio"].numpy(), np.exp(0.1), rtol=1e-6)
    top4 = np.argsort(-p, -1)[:, :4]
    np.testing.assert_allclose(d["teacher_topk_mass"].numpy(), np.exp(np.take_along_axis(p, top4, -1)).sum(-1))
    np.testing.assert_allclose(d["student_topk_mass"].numpy(), np.exp(np.take_along_axis(q, top4, -1)).sum(-1),
                               rtol=1e-6)
    np.testing.assert_array_equal(d["top1_agree"].numpy(), (q.argmax(-1) == top4[:, 0]).astype(float))


def test_sft_is_cross_entropy():
    student, _, targets, *_ = make_case()
    view = logprob_stats(student, targets)
    torch.testing.assert_close(loss("sft", O.ObjectiveParams(), O.Inputs(view)).double(),
                               torch.nn.functional.cross_entropy(student, targets, reduction="none"),
                               atol=1e-6, rtol=1e-6)
