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

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def sampling_logprobs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Float32 log-probs [..., V] of softmax(logits / temperature) restricted to the top-p nucleus.

    The nucleus is the smallest set of most likely tokens whose mass reaches `top_p`: a token is
    kept when the mass of the tokens ranked before it is below `top_p` (so the top token always
    is). Tokens outside it get -inf; the rest are renormalised. `temperature` must be > 0.
    """
    lp = torch.log_softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_lp, order = lp.sort(dim=-1, descending=True)
        probs = sorted_lp.exp()
        mass_before = probs.cumsum(dim=-1) - probs
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        lp = torch.log_softmax(lp.masked_fill(drop, float("-inf")), dim=-1)
    return lp


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
    cdf_dtype = torch.float32 if lp.device.type == "mps" else torch.float64
    cdf = lp.to(cdf_dtype).exp().cumsum(dim=-1)
    target = u.to(device=cdf.device, dtype=cdf_dtype) * cdf[:, -1]
    tokens = torch.searchsorted(cdf, target.unsqueeze(-1), right=True).squeeze(-1)
    last_possible = torch.searchsorted(cdf, cdf[:, -1:].contiguous()).squeeze(-1)  # guards u * total rounding up
    tokens = torch.minimum(tokens, last_possible)
    return tokens, lp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
