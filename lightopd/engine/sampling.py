"""The sampling distribution (temperature, top-p) and batch-independent random draws; pure math.

Each sample row draws its uniforms from a counter-based generator keyed by (seed, prompt id,
sample index), so a row's tokens do not depend on which other rows share its batch, on the batch
size, or on whether the run was interrupted and resumed. Tokens are drawn by inverting the CDF
of the exact distribution whose log-probs are recorded as `behavior_logprobs`.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from lightopd.objectives.stats import nucleus

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


BLOCK = 256  # inverse-CDF sampling goes through block sums, then one block


def sampling_logprobs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Float32 log-probs [B, V] of softmax(logits / temperature) restricted to the top-p nucleus.

    The nucleus is the smallest set of most likely tokens whose mass reaches `top_p`: a token is
    kept when the mass of the tokens ranked before it is below `top_p` (so the top token always
    is). Tokens outside it get -inf; the rest are renormalised. `temperature` must be > 0.
    """
    lp = torch.log_softmax(logits.float() / temperature if temperature != 1 else logits.float(), dim=-1)
    if top_p >= 1.0:
        return lp
    order, keep_ranked = nucleus(lp, top_p)  # the same choice the trainer makes for the student's policy
    keep = torch.zeros_like(lp, dtype=torch.bool).scatter_(-1, order, keep_ranked)
    return torch.log_softmax(lp.masked_fill(~keep, float("-inf")), dim=-1)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Token i of each row with CDF(i-1) <= u·total < CDF(i): exact sampling by inversion.

    Goes through block sums, then a cumulative sum inside one block, so the float64 work is
    O(V / BLOCK + BLOCK) per row instead of a float64 cumulative sum over the whole vocabulary.
    """
    rows, vocab = probs.shape
    wide = torch.float32 if probs.device.type == "mps" else torch.float64
    padded = torch.nn.functional.pad(probs, (0, (-vocab) % BLOCK)).view(rows, -1, BLOCK)
    block_cdf = padded.sum(-1).to(wide).cumsum(-1)
    target = u.to(device=probs.device, dtype=wide) * block_cdf[:, -1]
    block = torch.searchsorted(block_cdf, target.unsqueeze(-1), right=True)
    block = torch.minimum(block, torch.searchsorted(block_cdf, block_cdf[:, -1:].contiguous()))
    before = torch.where(block > 0, block_cdf.gather(-1, (block - 1).clamp(min=0)), 0.0)
    inner_cdf = padded.gather(1, block.unsqueeze(-1).expand(-1, -1, BLOCK)).squeeze(1).to(wide).cumsum(-1)
    inner = torch.searchsorted(inner_cdf, (target.unsqueeze(-1) - before), right=True)
    inner = torch.minimum(inner, torch.searchsorted(inner_cdf, inner_cdf[:, -1:].contiguous()))  # rounding guard
    return (block * BLOCK + inner).squeeze(-1)


def row_key(seed: int, prompt_id: str, sample_index: int) -> int:
    """A 64-bit key naming one sample row's random stream."""
    digest = hashlib.sha256(f"{seed}\x00{prompt_id}\x00{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def uniforms(keys: np.ndarray, step: int) -> np.ndarray:
    """Uniform [0, 1) draws, one per key, for decoding step `step` (SplitMix64 of key + step)."""
    with np.errstate(over="ignore"):
        z = keys.astype(np.uint64) + _GAMMA * np.uint64(step + 1)
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def choose(
    logits: torch.Tensor, temperature: float, top_p: float, u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row of `logits` [B, V] with uniforms `u` [B].

    Returns (tokens [B] int64, their log-probs [B] float32 under the sampling distribution).
    Temperature 0 is greedy decoding, whose distribution is a point mass (log-prob 0).
    """
    if temperature == 0:
        tokens = logits.argmax(dim=-1)
        return tokens, torch.zeros(tokens.shape, dtype=torch.float32, device=logits.device)
    lp = sampling_logprobs(logits, temperature, top_p)
    tokens = _inverse_cdf(lp.exp(), u)
    return tokens, lp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
