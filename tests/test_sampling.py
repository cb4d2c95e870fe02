"""The sampling distribution and the random draws, against float64 references and statistics."""

import numpy as np
import pytest
import torch

from lightopd.engine import sampling
from lightopd.engine.sampling import choose, penalized, row_key, sampling_logprobs, uniforms
from lightopd.specs import SamplingSpec
from tests.reference import log_softmax64, nucleus_logprobs, penalized_logits, sampler_logprobs


@pytest.mark.parametrize("candidates", [4, 1024], ids=["sort-fallback", "top-k-candidates"])
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.5, 1.0), (2.0, 1.0), (1.0, 0.7), (0.8, 0.3)])
def test_sampling_logprobs_match_reference(temperature, top_p, candidates, monkeypatch):
    monkeypatch.setattr(sampling, "NUCLEUS_CANDIDATES", candidates)
    torch.manual_seed(0)
    logits = torch.randn(5, 50) * 3
    got = sampling_logprobs(logits, temperature, top_p).double().numpy()
    for row in range(5):
        want = nucleus_logprobs(logits[row].numpy(), temperature, top_p)
        assert np.array_equal(np.isinf(got[row]), np.isinf(want))
        finite = np.isfinite(want)
        np.testing.assert_allclose(got[row][finite], want[finite], atol=1e-5)
    if top_p < 1:
        assert np.isinf(got).any(), "top-p should have removed some tokens"


def test_top_p_always_keeps_the_top_token():
    logits = torch.tensor([[10.0, 0.0, 0.0, 0.0]])
    lp = sampling_logprobs(logits, 1.0, 0.01)
    assert lp[0, 0].item() == pytest.approx(0.0)
    assert torch.isinf(lp[0, 1:]).all()


def test_uniforms_are_uniform_and_keyed():
    keys = np.array([row_key(0, f"p{i}", 0) for i in range(20000)], dtype=np.uint64)
    u = uniforms(keys, 0)
    assert u.min() >= 0 and u.max() < 1
    counts, _ = np.histogram(u, bins=10, range=(0, 1))
    chi2 = ((counts - 2000) ** 2 / 2000).sum()
    assert chi2 < 30  # 9 degrees of freedom; p ~ 0.0004
    assert not np.array_equal(uniforms(keys, 1), u)
    assert np.array_equal(uniforms(keys[5:10], 0), u[5:10]), "a row's draw must not depend on its batch"
    assert row_key(0, "a", 0) != row_key(1, "a", 0) != row_key(0, "a", 1)


@pytest.mark.parametrize("block", [4, 256])
def test_choose_samples_the_stated_distribution(block, monkeypatch):
    monkeypatch.setattr(sampling, "BLOCK", block)  # 4: eight blocks, the last one padded
    torch.manual_seed(1)
    logits = torch.randn(1, 30) * 1.5
    temperature, top_p, draws = 0.9, 0.8, 40000
    keys = np.array([row_key(3, "x", i) for i in range(draws)], dtype=np.uint64)
    spec = SamplingSpec(temperature=temperature, top_p=top_p)
    tokens, lps, policy = choose(logits.expand(draws, 30), spec, torch.from_numpy(uniforms(keys, 0)))
    want = np.exp(nucleus_logprobs(logits[0].numpy(), temperature, top_p))
    freq = np.bincount(tokens.numpy(), minlength=30) / draws
    np.testing.assert_allclose(freq, want, atol=0.01)
    assert (want[tokens.numpy()] > 0).all(), "never a token outside the nucleus"
    np.testing.assert_allclose(lps.numpy(), np.log(want[tokens.numpy()]), atol=1e-5)
    untruncated = log_softmax64(logits[0].numpy() / temperature)
    np.testing.assert_allclose(policy.numpy(), untruncated[tokens.numpy()], atol=1e-5)
    assert (policy < lps - 1e-3).all(), "the nucleus renormalisation shows: ℓold < ℓμ on every drawn token"


def test_greedy_is_argmax_with_logprob_zero():
    logits = torch.tensor([[0.1, 3.0, 2.0], [5.0, 1.0, 0.0]])
    tokens, lps, policy = choose(logits, SamplingSpec(temperature=0.0), torch.zeros(2, dtype=torch.float64))
    assert tokens.tolist() == [1, 0]
    assert lps.tolist() == [0.0, 0.0]
    want = [log_softmax64(logits[i].numpy())[t] for i, t in enumerate(tokens.tolist())]
    np.testing.assert_allclose(policy.numpy(), want, atol=1e-6)  # at temperature 1, what a greedy store trains at


CARD = [dict(temperature=0.6, top_p=0.95, top_k=20), dict(temperature=0.6, top_k=5), dict(temperature=0.6, min_p=0.1),
        dict(temperature=1.3, top_p=0.9, top_k=8, min_p=0.05), dict(temperature=0.7, min_p=0.3, top_p=0.5)]


@pytest.mark.parametrize("settings", CARD, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_top_k_and_min_p_logprobs_match_the_float64_sampler(settings):
    torch.manual_seed(2)
    logits = torch.randn(6, 64) * 4
    args = (settings["temperature"], settings.get("top_p", 1.0), settings.get("top_k", 0), settings.get("min_p", 0.0))
    got = sampling_logprobs(logits, *args).double().numpy()
    for row in range(len(logits)):
        want = sampler_logprobs(logits[row].numpy(), *args)
        assert np.array_equal(np.isinf(got[row]), np.isinf(want)), "the same tokens are kept"
        finite = np.isfinite(want)
        np.testing.assert_allclose(got[row][finite], want[finite], atol=1e-5)
    assert np.isinf(got).any() and np.isfinite(got).sum(-1).min() >= 1


def test_top_k_keeps_ties_at_the_kth_token():
    logits = torch.tensor([[3.0, 2.0, 2.0, 2.0, 0.0]])
    lp = sampling_logprobs(logits, 1.0, top_k=2)
    assert torch.isfinite(lp[0, :4]).all() and torch.isinf(lp[0, 4])


def test_penalties_match_their_definition():
    torch.manual_seed(3)
    logits = torch.randn(1, 12) * 2
    prompt, output = [1, 2, 5], [5, 7, 7, 9]
    seen = torch.zeros(1, 12, dtype=torch.bool)
    seen[0, prompt + output] = True
    counts = torch.zeros(1, 12)
    for t in output:
        counts[0, t] += 1
    got = penalized(logits, seen, counts, 1.3, 0.4, 0.2).double().numpy()[0]
    want = penalized_logits(logits[0].numpy(), prompt, output, repetition=1.3, presence=0.4, frequency=0.2)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert not np.allclose(got, logits[0].numpy())
