"""Rows to batches and tensors: grouping longest first (by padded tokens for forwards, by rows for
sampling), right-padded id tensors, and Arrow list columns as flat tensors."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch


def pack_by_tokens(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Row indices grouped so that rows × longest row ≤ `max_tokens` in every batch.

    Rows are taken longest first, so each batch holds rows of similar length (little padding);
    a row longer than the budget gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def plan_generation(lengths: list[int], n: int, batch_size: int) -> list[list[tuple[int, range]]]:
    """Group (prompt, sample range) pieces into batches of at most `batch_size` rows.

    Longest prompts first, so similar lengths share a batch (little padding) and a batch too
    large for memory fails at the start rather than at the end.
    """
    pieces = [(i, range(s, min(s + batch_size, n))) for i in range(len(lengths)) for s in range(0, n, batch_size)]
    pieces.sort(key=lambda piece: -lengths[piece[0]])
    batches, current, rows = [], [], 0
    for piece in pieces:
        if rows + len(piece[1]) > batch_size:
            batches.append(current)
            current, rows = [], 0
        current.append(piece)
        rows += len(piece[1])
    if current:
        batches.append(current)
    return batches


def pack_rows(prompts, completions, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                     torch.Tensor]:
    """Right-padded ids and mask [B, L], and for every completion token (row-major) its row, the
    position whose logits predict it, and the token itself."""
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions, strict=True)]
    ids = torch.zeros((len(prompts), max(lengths)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    rows, cols, targets = [], [], []
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        ids[i, : lengths[i]] = torch.tensor(list(p) + list(c))
        mask[i, : lengths[i]] = 1
        rows += [i] * len(c)
        cols += range(len(p) - 1, len(p) - 1 + len(c))
        targets += c
    as_tensor = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    return ids.to(device), mask.to(device), as_tensor(rows), as_tensor(cols), as_tensor(targets)


def flat_column(table: pa.Table, name: str, dtype) -> torch.Tensor:
    """A list column's values, concatenated over rows, as a CPU tensor (no Python objects)."""
    values = pc.list_flatten(table.column(name)).to_numpy(zero_copy_only=False)
    return torch.from_numpy(np.array(values, dtype=dtype))  # a writable copy, converted once


STORED_COLUMNS = ("teacher_logprobs", "behavior_logprobs", "topk_ids", "topk_logprobs")


def stored_tensors(table: pa.Table, names, k: int | None, device) -> dict[str, torch.Tensor]:
    """The per-token stored columns among `names` as flat tensors on `device`: log-probs float32 [N],
    top-k ids int64 and log-probs float32 reshaped to [N, k]."""
    out = {}
    for name in STORED_COLUMNS:
        if name in names:
            values = flat_column(table, name, np.int64 if name == "topk_ids" else np.float32).to(device)
            out[name] = values.view(-1, k) if name.startswith("topk_") else values
    return out
