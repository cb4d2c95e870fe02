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


def completion_logits(model, prompt_ids: list[int], completion_ids: list[int]) -> np.ndarray:
    """Logits predicting each completion token, from one unpadded forward with no cache."""
    full = torch.tensor([list(prompt_ids) + list(completion_ids)])
    with torch.no_grad():
        logits = model(input_ids=full).logits[0].double().numpy()
    start = len(prompt_ids) - 1
    return logits[start: start + len(completion_ids)]
