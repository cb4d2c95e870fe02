"""Rows to batches and tensors: grouping longest first (by padded tokens for forwards, by rows for
sampling), right-padded id tensors, Arrow list columns as flat or padded tensors, and
`TokenBatches`, the micro-batches of a table of stored rows that training and eval both run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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


STORED_COLUMNS = ("teacher_logprobs", "behavior_logprobs", "topk_ids", "topk_logprobs", "teacher_log_tail")


def stored_tensors(table: pa.Table, names, k: int | None, device) -> dict[str, torch.Tensor]:
    """The per-token stored columns among `names` as flat tensors on `device`: log-probs float32 [N],
    top-k ids int64 and log-probs float32 reshaped to [N, k]."""
    out = {}
    for name in STORED_COLUMNS:
        if name in names:
            values = flat_column(table, name, np.int64 if name == "topk_ids" else np.float32).to(device)
            out[name] = values.view(-1, k) if name.startswith("topk_") else values
    return out


def list_mask(table: pa.Table, name: str) -> torch.Tensor:
    """[rows, longest] bool: True where a list column's row has a value."""
    lengths = pc.list_value_length(table.column(name)).to_numpy(zero_copy_only=False)
    width = int(lengths.max()) if len(lengths) else 0
    return torch.from_numpy(np.arange(width)[None, :] < lengths[:, None])


def padded_column(table: pa.Table, name: str, device) -> torch.Tensor:
    """A per-token list column as float64 [rows, longest], zero past each row's end."""
    mask = list_mask(table, name)
    values = torch.zeros(mask.shape, dtype=torch.float64)
    values[mask] = flat_column(table, name, np.float64)
    return values.to(device)


@dataclass
class MicroBatch:
    """One forward's worth of rows as tensors (see pack_rows), with their stored columns."""

    rows: list[int]  # indices into the table
    ids: torch.Tensor
    mask: torch.Tensor
    positions: tuple[torch.Tensor, torch.Tensor]  # (row, column) of the logits predicting each completion token
    targets: torch.Tensor  # [N] the completion tokens, row-major
    stored: dict[str, torch.Tensor]  # the stored per-token columns asked for, flat [N] or [N, k]


class TokenBatches:
    """A table of rows (prompt_ids, completion_ids and stored columns) packed into micro-batches of
    at most `max_tokens` padded tokens; `plan` leaves out micro-batches with no completion token."""

    def __init__(self, table: pa.Table, max_tokens: int):
        self.table = table
        self.prompts = table.column("prompt_ids").to_pylist()
        self.completions = table.column("completion_ids").to_pylist()
        lengths = [len(p) + len(c) for p, c in zip(self.prompts, self.completions, strict=True)]
        self.packs = pack_by_tokens(lengths, max_tokens)
        self.plan = [m for m in self.packs if any(self.completions[i] for i in m)]

    @property
    def tokens(self) -> int:
        """Completion tokens of the table."""
        return sum(len(c) for c in self.completions)

    def tensors(self, rows: list[int], columns, k: int | None, device) -> MicroBatch:
        ids, mask, prow, pcol, targets = pack_rows([self.prompts[i] for i in rows],
                                                   [self.completions[i] for i in rows], device)
        stored = stored_tensors(self.table.take(pa.array(rows)), columns, k, device)
        return MicroBatch(rows, ids, mask, (prow, pcol), targets, stored)
