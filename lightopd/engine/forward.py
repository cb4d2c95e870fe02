"""Logits of a causal LM at chosen positions only, without a [batch × length × vocab] tensor.

The decoder runs over the whole padded batch; the output layer (and the model's own logit
post-processing: soft-capping, scaling) runs only on the hidden states of the positions asked
for. A start-up self-check compares this split with the model's own forward on a short input;
models for which it differs fall back to the full forward.

Logits cover the tokenizer's ids only. Checkpoints often pad their output layer beyond the
tokenizer (Qwen2.5-0.5B has 151,936 rows for one tokenizer, Qwen2.5-7B 152,064); those rows are
cut off here, so no distribution anywhere (sampling, the teacher's top-k, the student's
normaliser) gives them mass, and a student and a teacher that share a tokenizer work together
whatever their padded sizes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _head_transform(config) -> Callable[[torch.Tensor], torch.Tensor]:
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


def output_rows(model) -> int:
    """Rows of the model's output layer (its vocabulary as built, padding included)."""
    return model.get_output_embeddings().weight.shape[0]


class PositionLogits:
    """`logits_at(ids, mask, rows, cols)` returns a function (lo, hi) -> logits of positions lo:hi,
    over the first `vocab` ids (the tokenizer's)."""

    def __init__(self, model, vocab: int):
        rows = output_rows(model)
        if vocab > rows:
            raise ValueError(f"the tokenizer has {vocab} ids but the model's output layer only {rows} rows")
        self.model = model
        self.vocab = vocab
        self.device = next(model.parameters()).device
        self._base = model.base_model
        self._head = model.get_output_embeddings()
        self._transform = _head_transform(model.config)
        self.split_head = self._split_head_matches()

    @torch.no_grad()
    def _split_head_matches(self) -> bool:
        was_training = self.model.training
        self.model.eval()
        try:
            ids = torch.arange(1, 9, device=self.device).clamp(max=self.vocab - 1).unsqueeze(0)
            try:
                split = self._transform(self._head(self._base(input_ids=ids).last_hidden_state)).float()
            except (AttributeError, TypeError):
                return False
            full = self.model(input_ids=ids).logits.float()
            return split.shape == full.shape and torch.allclose(split, full, rtol=1e-3, atol=1e-3)
        finally:
            self.model.train(was_training)

    def logits_at(self, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
                  ) -> Callable[[int, int], torch.Tensor]:
        vocab = self.vocab
        if self.split_head:
            hidden = self._base(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state[rows, cols]
            return lambda lo, hi: self._transform(self._head(hidden[lo:hi]))[:, :vocab]
        full = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return lambda lo, hi: full[rows[lo:hi], cols[lo:hi], :vocab]


class CompletionLogits(torch.nn.Module):
    """The model's logits at the given (row, column) positions as a single module call, so that
    DistributedDataParallel can wrap it (DDP synchronises gradients of what runs in its forward)."""

    def __init__(self, model, vocab: int):
        super().__init__()
        self.model = model
        self.positions = PositionLogits(model, vocab)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return self.positions.logits_at(ids, mask, rows, cols)(0, rows.numel())
