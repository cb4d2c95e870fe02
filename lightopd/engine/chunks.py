"""Work on a model's logits a chunk of positions at a time, so that [positions × vocab] never exists.

Without gradients (scoring, eval), `over_chunks` runs the output layer and a per-chunk function
on `chunk` positions at a time. In training, `chunked_loss` does the same for a per-position
loss and differentiates each chunk as soon as it is computed: the chunk's logits, float32
log-softmax and statistics are built, their gradients with respect to the chunk's hidden
states and the output layer's weights are taken, and all of it is freed before the next chunk.
What it keeps for backward is one [positions × hidden] gradient and one gradient of the output
layer, which backward scales by the incoming gradient of the summed loss. The loss therefore
never holds more than one chunk's [chunk × vocab] blocks, whatever the sequence length, and the
output layer runs once forward and once backward, as without chunks. The gradients are those of
the unchunked loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def over_chunks(logits_of: Callable[[int, int], torch.Tensor], n: int, chunk: int,
                per_chunk: Callable[[torch.Tensor, int, int], T]) -> list[T]:
    """[per_chunk(logits_of(lo, hi), lo, hi) for each chunk lo:hi of n positions]."""
    return [per_chunk(logits_of(lo, min(lo + chunk, n)), lo, min(lo + chunk, n)) for lo in range(0, n, chunk)]


class _ChunkedLoss(torch.autograd.Function):
    """Σ over positions of `loss_of(hidden[lo:hi], lo, hi)[0]`, differentiated chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, loss_of, n: int, chunk: int, sink: list, hidden: torch.Tensor, *weights: torch.Tensor):
        grad_hidden = torch.zeros_like(hidden)
        grad_weights = [torch.zeros_like(w) for w in weights]
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        with torch.enable_grad():
            for lo in range(0, n, chunk):
                hi = min(lo + chunk, n)
                h = hidden[lo:hi].detach().requires_grad_(True)
                per_position, extras = loss_of(h, lo, hi)
                summed = per_position.sum()
                grads = torch.autograd.grad(summed, [h, *weights], allow_unused=True)
                grad_hidden[lo:hi] = grads[0]
                for acc, g in zip(grad_weights, grads[1:], strict=True):
                    if g is not None:
                        acc += g
                total += summed.detach().double()
                sink.append((per_position.detach(), extras))
        ctx.save_for_backward(grad_hidden, *grad_weights)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_hidden, *grad_weights = ctx.saved_tensors
        return (None, None, None, None, grad_hidden * grad.to(grad_hidden.dtype),
                *(g * grad.to(g.dtype) for g in grad_weights))


def chunked_loss(head: Callable[[torch.Tensor], torch.Tensor], weights: list[torch.Tensor], hidden: torch.Tensor,
                 chunk: int, per_chunk: Callable[[torch.Tensor, int, int], tuple[torch.Tensor, Any]]
                 ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, Any]]]:
    """(Σ of the per-position losses, with gradient to `hidden` [n, H] and the output layer's
    `weights`; [(per-position losses, extras) per chunk], without gradient), where
    `per_chunk(head(hidden[lo:hi]), lo, hi)` returns a chunk's (per-position loss, extras)."""
    sink: list = []
    total = _ChunkedLoss.apply(lambda h, lo, hi: per_chunk(head(h), lo, hi), hidden.shape[0], chunk, sink, hidden,
                               *weights)
    return total, sink
