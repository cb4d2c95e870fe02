"""Stop texts (`--stop`): whether a row's newest token completes one of them.

A sample ends at the token that completes a stop text, and that token is kept: the row's tokens
are exactly what was sampled, so its log-probs stay those of the sampling distribution. Only the
last tokens of each row are decoded, enough to hold the longest text even when every token is a
single byte of it; the text cannot have appeared earlier, or the row would have ended then.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class StopTexts:
    """The stop texts of a sampling, checked against rows being decoded."""

    def __init__(self, tokenizer, texts: Sequence[str]):
        self.tokenizer, self.texts = tokenizer, tuple(texts)
        self.window = 4 * max(len(t.encode()) for t in self.texts) + 4  # tokens, a byte each at worst

    def ended(self, ids: Sequence[int]) -> bool:
        """Whether the text of `ids` (a row's last tokens) holds a stop text."""
        text = self.tokenizer.decode(list(ids), skip_special_tokens=False)
        return any(t in text for t in self.texts)

    def hit(self, tokens: torch.Tensor, rows: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """[B] bool on `tokens`' device: whether batch slot b's row (`rows` [B] into `tokens` [R, T],
        with `lengths` [R] tokens so far) ends with a completed stop text."""
        n = lengths[rows]
        width = min(self.window, tokens.shape[1])
        index = (n.unsqueeze(-1) - width + torch.arange(width, device=tokens.device)).clamp(min=0)
        tails = tokens[rows.unsqueeze(-1), index].cpu().tolist()
        counts = n.cpu().tolist()
        out = [self.ended(tail[max(0, width - c):]) if c else False for tail, c in zip(tails, counts, strict=True)]
        return torch.tensor(out, dtype=torch.bool, device=tokens.device)
