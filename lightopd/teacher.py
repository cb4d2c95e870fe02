"""A teacher model reduced to per-token statistics: sampled-token log-prob, top-k, entropy.

The decoder runs once per batch; its hidden states at completion positions go through the
output layer a chunk of positions at a time, so the float32 logits in memory never exceed
`chunk_elements` entries (a [tokens × vocab] array never exists). Every statistic is of
softmax(logits / temperature) over the full vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class PositionStats:
    """Statistics of N positions (flattened over rows)."""

    logprobs: torch.Tensor  # [N] float32, log-prob of the sampled (next) token
    topk_logprobs: torch.Tensor  # [N, k] float32, descending
    topk_ids: torch.Tensor  # [N, k] int64
    entropy: torch.Tensor  # [N] float32


def position_stats(logits: torch.Tensor, targets: torch.Tensor, k: int, temperature: float) -> PositionStats:
    """Statistics of softmax(logits / temperature) [N, V] for the tokens `targets` [N].

    Uses PyTorch's fused log_softmax (about 5x faster on CPU than logsumexp plus a separate exp)
    and at most two more float32 [N, V] buffers: the log-probs and their exponent.
    """
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    lp = torch.log_softmax(z, dim=-1)
    del z
    top_lp, top_ids = lp.topk(k, dim=-1, sorted=True)
    sampled = lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -torch.bmm(lp.exp().unsqueeze(1), lp.unsqueeze(2)).view(-1)  # -sum p log p, no [N, V] product
    return PositionStats(sampled, top_lp, top_ids, entropy)


def _head_transform(config):
    """The model's own post-processing of head outputs, if its config declares one."""
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    divide = getattr(config, "logits_scaling", None)

    def apply(logits: torch.Tensor) -> torch.Tensor:
        if isinstance(scale, (int, float)) and not isinstance(scale, bool):
            logits = logits * scale
        if isinstance(divide, (int, float)) and not isinstance(divide, bool) and divide != 1:
            logits = logits / divide
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return apply


class Scorer:
    """Per-token teacher statistics for batches of (prompt ids, completion ids) rows."""

    def __init__(self, model, k: int, temperature: float, chunk_elements: int):
        self.model = model
        self.k = k
        self.temperature = temperature
        self.vocab = model.get_output_embeddings().weight.shape[0]
        self.chunk_positions = max(1, chunk_elements // self.vocab)
        self.device = next(model.parameters()).device
        self._base = model.base_model
        self._head = model.get_output_embeddings()
        self._transform = _head_transform(model.config)
        self.split_head = self._split_head_matches()

    @torch.inference_mode()
    def _split_head_matches(self) -> bool:
        """Whether decoder + output layer reproduce the model's own logits (else use full forwards)."""
        ids = torch.arange(1, 9, device=self.device).clamp(max=self.vocab - 1).unsqueeze(0)
        try:
            hidden = self._base(input_ids=ids).last_hidden_state
            split = self._transform(self._head(hidden)).float()
        except (AttributeError, TypeError):
            return False
        full = self.model(input_ids=ids).logits.float()
        return split.shape == full.shape and torch.allclose(split, full, rtol=1e-3, atol=1e-3)

    @torch.inference_mode()
    def score(self, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]) -> list[PositionStats]:
        """Statistics at each completion position of each row (right-padded batch)."""
        if not any(completions):
            none = torch.zeros(0)
            return [PositionStats(none, none.view(0, self.k), none.long().view(0, self.k), none) for _ in completions]
        lengths = [len(p) + len(c) for p, c in zip(prompts, completions, strict=True)]
        width = max(lengths)
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        rows, cols, targets = [], [], []
        for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
            ids[i, : lengths[i]] = torch.tensor(list(p) + list(c))
            mask[i, : lengths[i]] = 1
            rows += [i] * len(c)
            cols += range(len(p) - 1, len(p) - 1 + len(c))  # position predicting each completion token
            targets += c
        ids, mask = ids.to(self.device), mask.to(self.device)
        rows_t = torch.tensor(rows, device=self.device)
        cols_t = torch.tensor(cols, device=self.device)
        targets_t = torch.tensor(targets, device=self.device)
        if self.split_head:
            hidden = self._base(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state[rows_t, cols_t]

            def logits_of(lo: int, hi: int) -> torch.Tensor:
                return self._transform(self._head(hidden[lo:hi]))
        else:
            full = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits

            def logits_of(lo: int, hi: int) -> torch.Tensor:
                return full[rows_t[lo:hi], cols_t[lo:hi]]

        parts = []
        for lo in range(0, len(targets), self.chunk_positions):
            hi = min(lo + self.chunk_positions, len(targets))
            parts.append(position_stats(logits_of(lo, hi), targets_t[lo:hi], self.k, self.temperature))
        stats = PositionStats(*(torch.cat([getattr(s, f) for s in parts]).cpu() for f in
                                ("logprobs", "topk_logprobs", "topk_ids", "entropy")))
        out, start = [], 0
        for c in completions:
            end = start + len(c)
            out.append(PositionStats(stats.logprobs[start:end], stats.topk_logprobs[start:end],
                                     stats.topk_ids[start:end], stats.entropy[start:end]))
            start = end
        return out
