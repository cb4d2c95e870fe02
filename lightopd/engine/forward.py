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

from lightopd.engine.chunks import chunked_loss, over_chunks


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
    """`logits_at(layout)` returns a function (lo, hi) -> logits of completion positions lo:hi of a
    `data.batching.Layout`, over the first `vocab` ids (the tokenizer's).

    `packs`: whether the model reads packed rows (position ids restarting per sequence) as separate
    sequences; checked once against separate forwards, since it depends on the architecture and
    the attention implementation.
    """

    def __init__(self, model, vocab: int, check: bool = True):
        """`check`: run the self-checks now; False for a model without weights yet (on the meta
        device), whose owner calls `check()` once they are in place."""
        rows = output_rows(model)
        if vocab > rows:
            raise ValueError(f"the tokenizer has {vocab} ids but the model's output layer only {rows} rows")
        self.model = model
        self.vocab = vocab
        self._base = model.base_model
        self._head = model.get_output_embeddings()
        self._transform = _head_transform(model.config)
        self.split_head: bool | None = self._split_head_matches() if check else None
        self._packs: bool | None = None

    def check(self) -> None:
        """Both self-checks, now (see `__init__`)."""
        self.split_head = self._split_head_matches()
        self._packs = None
        _ = self.packs

    @property
    def device(self) -> torch.device:
        """Where the model's weights are (this rank's shard of them under FSDP)."""
        return next(self.model.parameters()).device

    def _probe(self) -> torch.Tensor:
        return torch.arange(1, 9, device=self.device).clamp(max=self.vocab - 1).unsqueeze(0)

    @torch.no_grad()
    def _split_head_matches(self) -> bool:
        with _eval_mode(self.model):
            ids = self._probe()
            try:
                split = self._transform(self._head(self._base(input_ids=ids).last_hidden_state)).float()
            except (AttributeError, TypeError):
                return False
            full = self.model(input_ids=ids).logits.float()
            return split.shape == full.shape and torch.allclose(split, full, rtol=1e-3, atol=1e-3)

    @property
    @torch.no_grad()
    def packs(self) -> bool:
        if self._packs is None:
            with _eval_mode(self.model):
                a, b = self._probe()[:, :5], self._probe()[:, 2:]
                apart = torch.cat([self.model(input_ids=x, use_cache=False).logits for x in (a, b)], dim=1).float()
                positions = torch.cat([torch.arange(a.shape[1]), torch.arange(b.shape[1])]).to(self.device)
                try:
                    packed = self.model(input_ids=torch.cat([a, b], dim=1), position_ids=positions.unsqueeze(0),
                                        use_cache=False).logits.float()
                except (TypeError, ValueError, RuntimeError):
                    packed = None
                self._packs = packed is not None and torch.allclose(packed, apart, rtol=1e-3, atol=1e-3)
        return self._packs

    def hidden_at(self, layout) -> torch.Tensor | None:
        """The decoder's last hidden states at the completion positions [N, H] (None: the model's own
        forward is needed, see `logits_at`)."""
        if not self.split_head:
            return None
        return self._base(**layout.inputs, use_cache=False).last_hidden_state[layout.rows, layout.cols]

    def head_weights(self) -> list[torch.Tensor]:
        """The output layer's trainable weights (what `head` differentiates besides its input)."""
        return [w for w in self._head.parameters() if w.requires_grad]

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the tokenizer's ids from hidden states [n, H]."""
        return self._transform(self._head(hidden))[:, :self.vocab]

    def logits_at(self, layout) -> Callable[[int, int], torch.Tensor]:
        hidden = self.hidden_at(layout)
        if hidden is not None:
            return lambda lo, hi: self.head(hidden[lo:hi])
        full = self.model(**layout.inputs, use_cache=False).logits
        rows, cols, vocab = layout.rows, layout.cols, self.vocab
        return lambda lo, hi: full[rows[lo:hi], cols[lo:hi], :vocab]


class _eval_mode:
    """Within: the model in eval mode (no dropout); after: as it was."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


class CompletionChunks(torch.nn.Module):
    """A model's summed loss over the completion positions of a layout, computed a chunk of positions
    at a time by engine.chunks, all inside one module call so that DistributedDataParallel and FSDP
    see the output layer run in their forward."""

    def __init__(self, model, vocab: int, check: bool = True):
        super().__init__()
        self.model = model
        self.positions = PositionLogits(model, vocab, check)

    def forward(self, layout, per_chunk=None, chunk: int = 0, statistics: bool = False
                ) -> tuple[torch.Tensor, list] | list | None:
        """(Σ of per-position losses, with gradient; [(per-position losses, extras) per chunk]), for
        `per_chunk(logits, lo, hi)` returning (per-position loss, extras) of positions lo:hi; with
        `statistics`, [per_chunk(logits, lo, hi) per chunk] alone, for a pass without gradients.

        With `layout` None it runs PositionLogits' self-checks instead: called through this module,
        they see a sharded model's weights gathered like any forward."""
        if layout is None:
            self.positions.check()
            return None
        if statistics:
            return over_chunks(self.positions.logits_at(layout), len(layout.targets), chunk, per_chunk)
        hidden = self.positions.hidden_at(layout)
        if hidden is None:  # the model's own forward: its full logits exist anyway
            logits = self.positions.logits_at(layout)(0, len(layout.targets))
            per_position, extras = per_chunk(logits, 0, len(layout.targets))
            return per_position.sum(), [(per_position.detach(), extras)]
        return chunked_loss(self.positions.head, self.positions.head_weights(), hidden, chunk, per_chunk)
