"""The sampled support (score-teacher --support-samples; fkl with objective.support=sampled):
draws that follow the teacher's distribution (a chi-square test), an estimate of the forward KL and
of its gradient that are unbiased against float64 full-vocabulary values, draws that do not depend
on batching, and a store that trains to the float64 divergence at a card's settings."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from lightopd.data.store import open_store
from lightopd.data.support_draws import row_uniforms
from lightopd.errors import InputError
from lightopd.objectives import Inputs, lookup
from lightopd.objectives.stats import draw_support, logprob_stats
from tests.helpers import do_score, do_train, metrics, read_rows
from tests.reference import completion_logits, log_softmax64


def _distributions(positions: int, vocab: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 logits of a confident teacher and a student that disagrees with it, [positions, vocab]."""
    rng = np.random.default_rng(seed)
    teacher = rng.normal(0, 1, (positions, vocab)) * 3
    teacher[:, 0] += 6  # most of the mass on one token, a long tail behind it
    return teacher, teacher * 0.5 + rng.normal(0, 1.5, (positions, vocab))


def test_draws_follow_the_distribution():
    """Pearson's chi-square of 20,000 draws per position against softmax(z / 0.6) in float64, over
    bins of expected count >= 5 (the rest pooled): each statistic within six standard deviations of
    its degrees of freedom; a sampler that drew from softmax(z) instead fails it."""
    logits, _ = _distributions(6, 40, seed=0)
    lp = log_softmax64(logits / 0.6)
    m = 20_000
    uniforms = torch.from_numpy(np.stack([row_uniforms(0, "p", 0, 6, m)[i] for i in range(6)]))
    ids = draw_support(torch.from_numpy(lp), uniforms).numpy()
    assert (np.diff(ids, axis=1) >= 0).all()  # ascending within each position

    def chi_square(counts, probs):
        expected = probs * m
        big = expected >= 5
        observed = np.append(counts[big], counts[~big].sum())
        expected = np.append(expected[big], expected[~big].sum())
        keep = expected > 0
        statistic = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
        return statistic, keep.sum() - 1

    for row, probs in zip(ids, np.exp(lp), strict=True):
        statistic, df = chi_square(np.bincount(row, minlength=40), probs)
        assert statistic < df + 6 * np.sqrt(2 * df), (statistic, df)
    hot = np.exp(log_softmax64(logits))  # the same draws judged against the wrong temperature
    assert any(chi_square(np.bincount(r, minlength=40), p)[0] > 100 for r, p in zip(ids, hot, strict=True))


def _sampled_inputs(student_logits: torch.Tensor, teacher_lp: np.ndarray, support: np.ndarray, tau: float):
    student = logprob_stats(student_logits, torch.zeros(len(support), dtype=torch.long), tau,
                            support=torch.from_numpy(support))
    return Inputs(student, support_ids=torch.from_numpy(support),
                  support_logprobs=torch.from_numpy(np.take_along_axis(teacher_lp, support, 1)))


def test_sampled_kl_is_the_hand_formula():
    teacher, student = _distributions(5, 30, seed=1)
    lp, lq = log_softmax64(teacher / 0.7), log_softmax64(student / 0.6)
    support = np.sort(np.random.default_rng(2).integers(0, 30, (5, 7)), axis=1)
    inputs = _sampled_inputs(torch.from_numpy(student), lp, support, 0.6)
    lt, ls = np.take_along_axis(lp, support, 1), np.take_along_axis(lq, support, 1)
    forward = lookup("fkl")(lookup("fkl").Params(support="sampled")).loss(inputs).numpy()
    np.testing.assert_allclose(forward, (lt - ls).mean(1), rtol=1e-12)


def test_the_sampled_estimate_and_its_gradient_are_unbiased():
    """4,000 independent supports of m = 4 draws at each of 4 positions (teacher at T = 0.7, student
    at τ = 0.6, V = 50 > m): the mean of the loss and of its gradient with respect to the student's
    logits equal the float64 full-vocabulary KL(p ‖ q) and its gradient (q − p)/τ (hand-written)
    within five standard errors (the gradient at the tokens expected to be drawn at least 30 times);
    the top-4 with its tail bucket is further off than that."""
    teacher, student = _distributions(4, 50, seed=3)
    lp, lq = log_softmax64(teacher / 0.7), log_softmax64(student / 0.6)
    p, q = np.exp(lp), np.exp(lq)
    value, grad = (p * (lp - lq)).sum(1), (q - p) / 0.6
    objective = lookup("fkl")(lookup("fkl").Params(support="sampled"))
    repeats, m = 4000, 4
    uniforms = torch.from_numpy(np.random.default_rng(4).random((4 * repeats, m)))
    support = draw_support(torch.from_numpy(np.repeat(lp, repeats, 0)), uniforms).numpy()
    logits = torch.from_numpy(np.repeat(student, repeats, 0)).requires_grad_()
    losses = objective.loss(_sampled_inputs(logits, np.repeat(lp, repeats, 0), support, 0.6))
    losses.sum().backward()
    losses = losses.detach().numpy().reshape(4, repeats)
    grads = logits.grad.numpy().reshape(4, repeats, 50)
    se = losses.std(1) / np.sqrt(repeats)
    assert (np.abs(losses.mean(1) - value) < 5 * se + 1e-12).all(), (losses.mean(1), value, se)
    gse = grads.std(1) / np.sqrt(repeats)
    seen = p * m * repeats >= 30  # tokens drawn often enough for their spread to show in the sample
    assert seen.sum() >= 8 and (np.abs(grads.mean(1) - grad) < 5 * gse + 1e-12)[seen].all()
    top_k = lookup("fkl")().loss(Inputs(logprob_stats(torch.from_numpy(student), torch.zeros(4, dtype=torch.long),
                                                     0.6, at=torch.from_numpy(np.argsort(-lp, 1)[:, :4].copy())),
                                       topk_ids=torch.from_numpy(np.argsort(-lp, 1)[:, :4].copy()),
                                       topk_logprobs=torch.from_numpy(-np.sort(-lp, 1)[:, :4]),
                                       teacher_log_tail=torch.from_numpy(np.log(np.sort(p, 1)[:, :-4].sum(1)))))
    assert (top_k.numpy() < value - 5 * se).any()  # the top-4 with its tail bucket is biased low; the draws are not


def test_a_store_keeps_the_draws_and_their_teacher_log_probs(teacher_model, card_rollouts, tmp_path):
    do_score(teacher_model, card_rollouts, tmp_path / "a", top_k=6, support_samples=12, support_seed=5)
    do_score(teacher_model, card_rollouts, tmp_path / "b", top_k=6, support_samples=12, support_seed=5,
             micro_batch_tokens=24)  # other batches: the same draws
    manifest = open_store(tmp_path / "a")
    assert manifest["scoring"]["support_samples"] == 12 and manifest["scoring"]["support_seed"] == 5
    rows, again = read_rows(tmp_path / "a"), read_rows(tmp_path / "b")
    for row, other in zip(rows, again, strict=True):
        ids = np.array(row["support_ids"]).reshape(-1, 12)
        assert len(ids) == len(row["completion_ids"]) and (np.diff(ids, axis=1) >= 0).all()
        assert row["support_ids"] == other["support_ids"]
        support = dict(zip(row["support_ids"], row["support_logprobs"], strict=True))  # (per position below)
        lps = np.array(row["support_logprobs"]).reshape(-1, 12)
        top_ids, top_lps = np.array(row["topk_ids"]).reshape(-1, 6), np.array(row["topk_logprobs"]).reshape(-1, 6)
        for t in range(len(ids)):
            at = dict(zip(ids[t].tolist(), lps[t].tolist(), strict=True))
            for i, v in zip(top_ids[t].tolist(), top_lps[t].tolist(), strict=True):
                if i in at:
                    assert at[i] == v  # the teacher's log-prob, rounded as the top-k's
        assert support
    raw = pq.read_table(tmp_path / "a" / manifest["shards"][0]["name"], columns=["support_ids"])
    assert raw.schema.field("support_ids").type.value_type.bit_width == 32
    do_score(teacher_model, card_rollouts, tmp_path / "c", top_k=6, support_samples=12, support_seed=6)
    assert [r["support_ids"] for r in read_rows(tmp_path / "c")] != [r["support_ids"] for r in rows]


def test_a_sampled_store_trains_to_the_float64_divergence(tiny_model, teacher_model, card_rollouts, tmp_path):
    """Step 1's loss on m = 256 draws per position (float32 log-probs) against the float64
    full-vocabulary KL(p ‖ q) of both models' logits over the same rows (teacher at T = 1, the
    student at the store's 0.6), within five standard errors of the estimate."""
    from transformers import AutoModelForCausalLM

    m = 256
    do_score(teacher_model, card_rollouts, tmp_path / "t", top_k=6, support_samples=m, topk_dtype="float32")
    do_train(tiny_model, tmp_path / "t", tmp_path / "run", sets=[("objective.support", "sampled")], objective="fkl",
             steps=1, batch_size=16, allow_off_policy=True, allow_teacher_mismatch=True)
    loss = metrics(tmp_path / "run")[0]["loss"]
    student = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_model).eval()
    values, variances = [], []
    for row in read_rows(tmp_path / "t"):
        lp = log_softmax64(completion_logits(teacher, row["prompt_ids"], row["completion_ids"]))
        lq = log_softmax64(completion_logits(student, row["prompt_ids"], row["completion_ids"]) / 0.6)
        per_token = lp - lq  # one draw's estimate
        mean = (np.exp(lp) * per_token).sum(1)
        values += mean.tolist()
        variances += ((np.exp(lp) * per_token ** 2).sum(1) - mean ** 2).tolist()
    value, se = np.mean(values), np.sqrt(np.sum(variances) / m) / len(values)
    assert abs(loss - value) < 5 * se + 1e-5, (loss, value, se)


def test_training_on_draws_needs_a_store_that_has_them(tiny_model, teacher_model, card_rollouts, tmp_path):
    do_score(teacher_model, card_rollouts, tmp_path / "t", top_k=6)
    with pytest.raises(InputError, match="--support-samples M"):
        do_train(tiny_model, tmp_path / "t", tmp_path / "run", sets=[("objective.support", "sampled")], objective="fkl",
                 steps=1, allow_off_policy=True, allow_teacher_mismatch=True)
    for name in ("rkl", "jsd", "taid"):
        with pytest.raises(InputError, match="serves fkl only"):
            do_train(tiny_model, tmp_path / "t", tmp_path / "run", sets=[("objective.support", "sampled")],
                     objective=name, steps=1, allow_off_policy=True, allow_teacher_mismatch=True)
