"""The sampling distribution (penalties, temperature, min-p, top-k, top-p, in vLLM's order) and
batch-independent random draws; pure math.

Each sample row draws its uniforms from a counter-based generator keyed by (seed, prompt id,
sample index), so a row's tokens do not depend on which other rows share its batch, on the batch
size, or on whether the run was interrupted and resumed. Tokens are drawn by inverting the CDF
of the exact distribution whose log-probs are recorded as `behavior_logprobs` (ℓμ); each token's
log-prob under the model's untruncated, unpenalised softmax at the temperature is recorded beside
it as `policy_logprobs` (ℓold), the policy the trainer differentiates.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


BLOCK = 256  # inverse-CDF sampling goes through block sums, then one block
NUCLEUS_CANDIDATES = 1024  # the nucleus is looked for among this many tokens before sorting all


def nucleus(lp: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, m] in descending probability, keep [B, m] bool): the smallest set of most likely
    tokens whose mass reaches `top_p` (a token is kept when the mass ranked before it is below
    top_p, so the top token always is). `lp` [B, V] log-probs; no gradient."""
    lp = lp.detach()
    k = min(lp.shape[-1], NUCLEUS_CANDIDATES)
    ranked, order = lp.topk(k, dim=-1)  # cheap, and holds the nucleus whenever it holds top_p mass
    if k < lp.shape[-1] and bool((ranked.exp().sum(-1) < top_p).any()):
        ranked, order = lp.sort(dim=-1, descending=True)
    probs = ranked.exp()
    keep = (probs.cumsum(dim=-1) - probs) < top_p
    keep[:, 0] = True
    return order, keep


def kept(lp: torch.Tensor, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0) -> torch.Tensor | None:
    """[B, V] bool: the tokens the sampler keeps from log-probs `lp` [B, V] (after temperature), or
    None when it keeps all. In vLLM's order: min-p keeps tokens with p ≥ min_p · max p; top-k the k
    most likely (ties at the k-th kept); top-p, over what is left renormalised, the smallest set of
    most likely tokens whose mass reaches top_p (a token is kept when the mass ranked before it is
    below top_p, so the top token always is)."""
    keep = None
    if min_p > 0:
        probs = lp.exp()
        keep = probs >= min_p * probs.amax(dim=-1, keepdim=True)
    if 0 < top_k < lp.shape[-1]:
        kth = lp.topk(top_k, dim=-1).values[:, -1:]
        keep = lp >= kth if keep is None else keep & (lp >= kth)
    if top_p < 1.0:
        rest = lp if keep is None else torch.log_softmax(lp.masked_fill(~keep, float("-inf")), dim=-1)
        order, keep_ranked = nucleus(rest, top_p)
        inside = torch.zeros_like(lp, dtype=torch.bool).scatter_(-1, order, keep_ranked)
        keep = inside if keep is None else keep & inside
    return keep


def sampling_logprobs(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0,
                      min_p: float = 0.0) -> torch.Tensor:
    """Float32 log-probs [B, V] of softmax(logits / temperature) cut to the tokens the sampler keeps
    (`kept`) and renormalised; the others get -inf. `temperature` must be > 0."""
    return truncated(tempered(logits, temperature), top_p, top_k, min_p)


def truncated(lp: torch.Tensor, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0) -> torch.Tensor:
    """Log-probs `lp` [B, V] cut to the tokens the sampler keeps and renormalised (`lp` itself when
    it keeps all)."""
    keep = kept(lp, top_p, top_k, min_p)
    return lp if keep is None else torch.log_softmax(lp.masked_fill(~keep, float("-inf")), dim=-1)


def tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(logits / temperature) in at least float32: the model's untruncated policy."""
    z = logits if logits.dtype == torch.float64 else logits.float()
    return torch.log_softmax(z / temperature if temperature != 1 else z, dim=-1)


def penalized(logits: torch.Tensor, seen: torch.Tensor | None, counts: torch.Tensor | None, repetition: float,
              presence: float, frequency: float) -> torch.Tensor:
    """`logits` [B, V] after the penalties, as vLLM applies them: the repetition penalty divides the
    positive logits (multiplies the negative ones) of tokens `seen` [B, V] in the prompt or the
    completion; then frequency × the token's count in the completion (`counts` [B, V]) and presence
    × (count > 0) are subtracted."""
    out = logits.float()
    if repetition != 1 and seen is not None:
        out = torch.where(seen, torch.where(out > 0, out / repetition, out * repetition), out)
    if counts is not None and (frequency or presence):
        out = out - frequency * counts - presence * (counts > 0).to(out.dtype)
    return out


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


def choose(logits: torch.Tensor, sampling, u: torch.Tensor, raw: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw one token per row of `logits` [B, V] (after any penalties) with uniforms `u` [B] from the
    distribution `sampling` (a SamplingSpec) describes.

    Returns (tokens [B] int64, their log-probs under that distribution [B] (ℓμ), their log-probs
    under the model's untruncated, unpenalised policy [B] (ℓold): softmax(raw / T) with `raw` the
    logits before penalties (default `logits`)). Temperature 0 is greedy decoding, a point mass
    (ℓμ = 0), whose policy log-prob is taken at temperature 1 (the τ a greedy store trains at).
    """
    raw = logits if raw is None else raw
    if sampling.temperature == 0:
        tokens = logits.argmax(dim=-1)
        policy = tempered(raw, 1.0).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        return tokens, torch.zeros(tokens.shape, dtype=torch.float32, device=logits.device), policy.float()
    full = tempered(logits, sampling.temperature)
    lp = truncated(full, sampling.top_p, sampling.top_k, sampling.min_p)
    tokens = _inverse_cdf(lp.exp(), u)
    if raw is not logits:  # penalised: the policy is the model's own logits at T
        full = tempered(raw, sampling.temperature)
    pick = tokens.unsqueeze(-1)
    return tokens, lp.gather(-1, pick).squeeze(-1), full.gather(-1, pick).squeeze(-1).float()
