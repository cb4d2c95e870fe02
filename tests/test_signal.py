"""The training signal at the settings users run, each against an independent float64 reference:
k < V on a confident teacher (tail ≤ 1e-6) with the stored exact tail, float16 and float32
storage; the policy-gradient objectives against hand-written formulas; the student's sampling
policy under temperature and top-p; the tail's custom backward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightopd import objectives as O
from lightopd.objectives.divergences import DivergenceParams, JSDParams, SkewParams
from lightopd.objectives.policy_gradient import GOPDParams, ImportanceSamplingParams
from lightopd.objectives.stats import log_mass_outside, logprob_stats
from lightopd.objectives.taid import TAIDParams
from tests.reference import log_softmax64, nucleus_logprobs

V, K, N = 40, 6, 10


def confident_case(seed: int = 0, tail: float = 1e-6):
    """Student logits (float64, with gradient) and a teacher sharpened until its mass outside its
    top-K is at most `tail` at every position; targets drawn from the student."""
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(N, V, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    teacher = torch.randn(N, V, generator=g, dtype=torch.float64) * 2
    scale = 1.0
    while True:
        lp = log_softmax64(teacher.numpy() * scale)
        outside = np.sort(lp, -1)[:, : V - K]
        if np.exp(outside).sum(-1).max() <= tail:
            break
        scale *= 1.25
    targets = torch.multinomial(torch.softmax(student.detach(), -1), 1, generator=g).squeeze(-1)
    return student, teacher * scale, targets


def stored_inputs(student, teacher, targets, topk_dtype=torch.float32, temperature=1.0) -> O.Inputs:
    """The objectives' inputs as a teacher store and the trainer would make them: the teacher's
    statistics from float32 logits through score-teacher's own function, the top-k log-probs cast
    to their storage dtype."""
    t = logprob_stats(teacher.float(), targets, k=K)
    view = logprob_stats(student, targets, temperature, at=t.topk_ids)
    return O.Inputs(view, teacher_logprobs=t.sampled.double(), topk_ids=t.topk_ids,
                    topk_logprobs=t.topk_logprobs.to(topk_dtype).double(), teacher_log_tail=t.topk_rest.double())


def bucket_reference(student, teacher, temperature=1.0, support="tail"):
    """float64 log q̂ and log p̂ on the teacher's top-K plus the exact mass of every other token."""
    lq = log_softmax64(student.detach().numpy() / temperature)
    lp = log_softmax64(teacher.numpy())
    ids = np.argsort(-lp, -1, kind="stable")[:, :K]
    rest = np.ones_like(lp, dtype=bool)
    np.put_along_axis(rest, ids, False, -1)

    def bucket(logp):
        top = np.take_along_axis(logp, ids, -1)
        if support == "renormalized":
            return top - np.log(np.exp(top).sum(-1, keepdims=True))
        tail = np.log(np.where(rest, np.exp(logp), 0.0).sum(-1, keepdims=True))
        return np.concatenate([top, np.maximum(tail, np.log(1e-8))], -1)

    return bucket(lq), bucket(lp)


def kl(a, b):
    return (np.exp(a) * (a - b)).sum(-1)


def mix(a, b, w):
    return np.log(w * np.exp(a) + (1 - w) * np.exp(b))


def taid_reference(q, p, t=0.6):
    r = (1 - t) * q + t * p
    r = r - np.log(np.exp(r).sum(-1, keepdims=True))
    return kl(r, q)


CASES = [
    ("rkl", DivergenceParams(), lambda q, p: kl(q, p)),
    ("fkl", DivergenceParams(), lambda q, p: kl(p, q)),
    ("jsd", JSDParams(beta=0.0), lambda q, p: kl(p, q)),
    ("jsd", JSDParams(beta=0.3), lambda q, p: 0.3 * kl(p, mix(p, q, 0.3)) + 0.7 * kl(q, mix(p, q, 0.3))),
    ("jsd", JSDParams(beta=1.0), lambda q, p: kl(q, p)),
    ("skew-fkl", SkewParams(alpha=0.1), lambda q, p: kl(p, mix(p, q, 0.1))),
    ("skew-rkl", SkewParams(alpha=0.1), lambda q, p: kl(q, mix(p, q, 0.9))),
    ("taid", TAIDParams(), taid_reference),
    ("rkl", DivergenceParams(support="renormalized"), lambda q, p: kl(q, p)),
    ("fkl", DivergenceParams(support="renormalized"), lambda q, p: kl(p, q)),
]


@pytest.mark.parametrize("topk_dtype,rtol", [(torch.float32, 1e-4), (torch.float16, 1e-2)], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name,params,reference", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_divergences_at_k_below_v_on_a_confident_teacher(name, params, reference, topk_dtype, rtol):
    student, teacher, targets = confident_case()
    objective = O.OBJECTIVES[name](params)
    if name == "taid":
        objective.schedule.t = 0.6
    got = objective.loss(stored_inputs(student, teacher, targets, topk_dtype)).detach().numpy()
    q, p = bucket_reference(student, teacher, support=params.support)
    want = reference(q, p)
    assert (want > 1e-3).all(), "a student far from the teacher: divergences well above rounding"
    np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-7)


def test_stored_tail_is_exact_where_rebuilding_it_from_the_top_k_is_not():
    _, teacher, targets = confident_case(seed=1, tail=1e-7)
    t = logprob_stats(teacher.float(), targets, k=K)
    lp = log_softmax64(teacher.numpy())
    want = np.log(np.sort(np.exp(lp), -1)[:, : V - K].sum(-1))
    np.testing.assert_allclose(t.topk_rest.numpy(), want, rtol=1e-5)
    rebuilt = np.log(np.maximum(1 - np.exp(t.topk_logprobs.half().double().numpy()).sum(-1), 1e-8))
    assert np.abs(rebuilt - want).max() > 1.0, "the old reconstruction is off by whole nats here"


def test_log_mass_outside_has_the_gradient_of_the_plain_formula():
    g = torch.Generator().manual_seed(3)
    lq = torch.log_softmax(torch.randn(5, V, generator=g, dtype=torch.float64) * 3, -1).requires_grad_(True)
    ids = torch.randint(0, V, (5, K), generator=g)
    torch.autograd.gradcheck(lambda x: log_mass_outside(x, ids), (lq,))
    mask = torch.ones_like(lq, dtype=torch.bool).scatter_(-1, ids, False)
    plain = torch.where(mask, lq, torch.full_like(lq, float("-inf"))).logsumexp(-1)
    torch.testing.assert_close(log_mass_outside(lq, ids), plain)


def hand_grad_lq_y(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> np.ndarray:
    """∂ log softmax(s / τ)[y] / ∂ s = (onehot(y) − softmax(s / τ)) / τ, row by row."""
    q = np.exp(log_softmax64(logits.detach().numpy() / temperature))
    onehot = np.eye(V)[targets.numpy()]
    return (onehot - q) / temperature


def reference_inputs(inputs, behavior: str, reference: np.ndarray) -> None:
    """ℓref in the column `behavior` names, and something else in the other (which must not be read)."""
    chosen, other = ("policy_logprobs", "behavior_logprobs")[:: 1 if behavior == "policy" else -1]
    setattr(inputs, chosen, torch.tensor(reference))
    setattr(inputs, other, torch.tensor(reference - 3.0))


@pytest.mark.parametrize("temperature,behavior", [(1.0, "policy"), (0.6, "policy"), (0.6, "sampler")])
def test_opd_is_against_its_formula(temperature, behavior):
    student, teacher, targets = confident_case(seed=4)
    inputs = stored_inputs(student, teacher, targets, temperature=temperature)
    lq_y = log_softmax64(student.detach().numpy() / temperature)[np.arange(N), targets.numpy()]
    mu = lq_y - np.linspace(-1.5, 1.5, N)  # ratios e^-1.5 .. e^1.5, some above the cap
    reference_inputs(inputs, behavior, mu)
    params = ImportanceSamplingParams(is_cap=2.0, behavior=behavior)
    got = O.OBJECTIVES["opd-is"](params).loss(inputs)
    (grad,) = torch.autograd.grad(got.sum(), student)
    ratio, advantage = np.exp(lq_y - mu), inputs.teacher_logprobs.numpy() - mu
    np.testing.assert_allclose(got.detach().numpy(), -np.minimum(ratio, 2.0) * advantage, rtol=1e-6)
    live = (ratio < 2.0)[:, None]  # the capped ratio carries no gradient
    want = -(advantage * ratio)[:, None] * hand_grad_lq_y(student, targets, temperature) * live
    np.testing.assert_allclose(grad.numpy(), want, rtol=1e-5, atol=1e-6)  # the student side is float32
    assert (ratio > 2.0).any() and (ratio < 2.0).any()


@pytest.mark.parametrize("behavior", ["policy", "sampler"])
def test_g_opd_with_lambda_not_one_against_its_formula(behavior):
    student, teacher, targets = confident_case(seed=5)
    inputs = stored_inputs(student, teacher, targets)
    lq_y = log_softmax64(student.detach().numpy())[np.arange(N), targets.numpy()]
    mu = lq_y - 0.3
    reference_inputs(inputs, behavior, mu)
    got = O.OBJECTIVES["g-opd"](GOPDParams(lambda_=1.5, behavior=behavior)).loss(inputs)
    (grad,) = torch.autograd.grad(got.sum(), student)
    advantage = 1.5 * (inputs.teacher_logprobs.numpy() - mu) - (lq_y - mu)
    np.testing.assert_allclose(got.detach().numpy(), -advantage * lq_y, rtol=1e-6)
    np.testing.assert_allclose(grad.numpy(), -advantage[:, None] * hand_grad_lq_y(student, targets, 1.0),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_the_students_policy_is_its_full_softmax(temperature):
    """lq_y is the log-prob under softmax(s / τ) over the whole vocabulary, never cut to a nucleus: at a
    position where top-p 0.95 keeps one token, lightning-opd still has the teacher's gradient."""
    logits = torch.tensor([[9.0, 1.0, 0.0, -1.0], [0.5, 0.4, 0.3, 0.2]], dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 2])
    want = [log_softmax64(logits[i].detach().numpy() / temperature)[y] for i, y in enumerate(targets.tolist())]
    assert np.isfinite(nucleus_logprobs(logits[0].detach().numpy(), temperature, 0.95)).sum() == 1, "one token kept"
    stats = logprob_stats(logits, targets, temperature)
    inputs = O.Inputs(stats, teacher_logprobs=torch.tensor([-5.0, -1.0], dtype=torch.float64))
    np.testing.assert_allclose(inputs.lq_y.detach().numpy(), want, atol=1e-12)
    O.OBJECTIVES["lightning-opd"]().loss(inputs).sum().backward()
    assert (logits.grad.abs().sum(-1) > 1e-6).all(), "every position has a gradient"
