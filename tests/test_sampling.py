"""The sampling distribution and the random draws, against float64 references and statistics."""

import numpy as np
import pytest
import torch

from lightopd.engine import sampling
from lightopd.engine.sampling import choose, row_key, sampling_logprobs, uniforms
from lightopd.objectives import stats
from tests.reference import nucleus_logprobs


@pytest.mark.parametrize("candidates", [4, 1024], ids=["sort-fallback", "top-k-candidates"])
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.5, 1.0), (2.0, 1.0), (1.0, 0.7), (0.8, 0.3)])
def test_sampling_logprobs_match_reference(temperature, top_p, candidates, monkeypatch):
    monkeypatch.setattr(stats, "NUCLEUS_CANDIDATES", candidates)
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
    tokens, lps = choose(logits.expand(draws, 30), temperature, top_p, torch.from_numpy(uniforms(keys, 0)))
    want = np.exp(nucleus_logprobs(logits[0].numpy(), temperature, top_p))
    freq = np.bincount(tokens.numpy(), minlength=30) / draws
    np.testing.assert_allclose(freq, want, atol=0.01)
    assert (want[tokens.numpy()] > 0).all(), "never a token outside the nucleus"
    np.testing.assert_allclose(lps.numpy(), np.log(want[tokens.numpy()]), atol=1e-5)


def test_greedy_is_argmax_with_logprob_zero():
    logits = torch.tensor([[0.1, 3.0, 2.0], [5.0, 1.0, 0.0]])
    tokens, lps = choose(logits, 0.0, 1.0, torch.zeros(2, dtype=torch.float64))
    assert tokens.tolist() == [1, 0]
    assert lps.tolist() == [0.0, 0.0]
