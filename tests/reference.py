"""Independent float64 references, written without lightopd's code, for the tests to compare to."""

from __future__ import annotations

import numpy as np
import torch


def log_softmax64(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    m = z.max(axis=-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


def nucleus_logprobs(logits: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    """Log-probs of temperature + top-p sampling for one position, in float64, token by token."""
    lp = log_softmax64(np.asarray(logits, dtype=np.float64) / temperature)
    if top_p >= 1:
        return lp
    order = np.argsort(-lp, kind="stable")
    keep = np.zeros(lp.shape, dtype=bool)
    mass = 0.0
    for tok in order:
        if mass >= top_p:
            break
        keep[tok] = True
        mass += np.exp(lp[tok])
    out = np.full(lp.shape, -np.inf)
    out[keep] = lp[keep] - np.log(np.exp(lp[keep]).sum())
    return out


def sampler_logprobs(logits: np.ndarray, temperature: float, top_p: float = 1.0, top_k: int = 0,
                     min_p: float = 0.0) -> np.ndarray:
    """Log-probs of one position under temperature, then min-p, top-k and top-p (in that order, each
    on what the one before left, renormalised), in float64, token by token."""
    lp = log_softmax64(np.asarray(logits, dtype=np.float64) / temperature)
    keep = np.ones(lp.shape, dtype=bool)
    probs = np.exp(lp)
    if min_p > 0:
        keep &= probs >= min_p * probs.max()
    if 0 < top_k < lp.shape[-1]:
        kth = np.sort(lp)[::-1][top_k - 1]
        keep &= lp >= kth
    if top_p < 1:
        left = np.where(keep, probs, 0.0)
        left = left / left.sum()
        mass, inside = 0.0, np.zeros(lp.shape, dtype=bool)
        for tok in np.argsort(-left, kind="stable"):
            if mass >= top_p or left[tok] == 0:
                break
            inside[tok] = True
            mass += left[tok]
        keep &= inside
    out = np.full(lp.shape, -np.inf)
    out[keep] = lp[keep] - np.log(np.exp(lp[keep]).sum())
    return out


def penalized_logits(logits: np.ndarray, prompt_ids, output_ids, repetition: float = 1.0, presence: float = 0.0,
                     frequency: float = 0.0) -> np.ndarray:
    """One position's logits after the penalties, as in the OpenAI/vLLM definition, in float64."""
    z = np.asarray(logits, dtype=np.float64).copy()
    seen = set(prompt_ids) | set(output_ids)
    for tok in seen:
        if tok < len(z):
            z[tok] = z[tok] / repetition if z[tok] > 0 else z[tok] * repetition
    for tok in set(output_ids):
        count = list(output_ids).count(tok)
        z[tok] -= frequency * count + presence
    return z


def completion_logits(model, prompt_ids: list[int], completion_ids: list[int]) -> np.ndarray:
    """Logits predicting each completion token, from one unpadded forward with no cache."""
    full = torch.tensor([list(prompt_ids) + list(completion_ids)])
    with torch.no_grad():
        logits = model(input_ids=full).logits[0].double().numpy()
    start = len(prompt_ids) - 1
    return logits[start: start + len(completion_ids)]
