"""Rows to batches and tensors: grouping longest first (by padded or packed tokens for forwards, by
rows and KV-cache tokens for sampling), right-padded or packed id tensors, Arrow list columns as
flat or padded tensors, and `TokenBatches`, the micro-batches of a table of stored rows that
training and eval both run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch


def pack_by_tokens(lengths: Sequence[int], max_tokens: int, packed: bool = False) -> list[list[int]]:
    """Row indices grouped into batches within a budget of `max_tokens`, longest rows first; a row
    longer than the budget gets a batch of its own.

    Padded (default): rows × longest row ≤ budget, so each batch holds rows of similar length.
    Packed (the rows concatenated, no padding): the rows' own tokens ≤ budget, filled first-fit.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    if packed:
        used: list[int] = []
        for i in order:
            slot = next((b for b, u in enumerate(used) if u + lengths[i] <= max_tokens), None)
            if slot is None:
                batches.append([i])
                used.append(lengths[i])
            else:
                batches[slot].append(i)
                used[slot] += lengths[i]
        return batches
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def plan_generation(lengths: list[int], n: int, batch_size: int, kv_tokens: int | None = None,
                    max_new: int = 0) -> list[list[tuple[int, range]]]:
    """Group (prompt, sample range) pieces into batches of at most `batch_size` rows whose KV cache,
    rows × (longest prompt + `max_new`), holds at most `kv_tokens` tokens (None: no such bound; a
    single row over it still gets a batch).

    Longest prompts first, so similar lengths share a batch (little padding) and a batch too
    large for memory fails at the start rather than at the end.
    """
    def fits(length: int) -> int:  # rows of this prompt length the KV budget holds (at least 1)
        return batch_size if kv_tokens is None else max(1, min(batch_size, kv_tokens // (length + max_new)))

    pieces = [(i, range(s, min(s + fits(lengths[i]), n))) for i in range(len(lengths))
              for s in range(0, n, fits(lengths[i]))]
    pieces.sort(key=lambda piece: -lengths[piece[0]])
    batches, current, rows = [], [], 0
    for piece in pieces:
        if current and rows + len(piece[1]) > fits(lengths[current[0][0]]):
            batches.append(current)
            current, rows = [], 0
        current.append(piece)
        rows += len(piece[1])
    if current:
        batches.append(current)
    return batches


@dataclass
class Layout:
    """Rows laid out for one forward, and where their completion tokens are in it."""

    inputs: dict[str, torch.Tensor]  # the model's keyword arguments: input_ids, and attention_mask or position_ids
    rows: torch.Tensor  # [N] for every completion token (row-major): the row of the logits that predict it
    cols: torch.Tensor  # [N] ... and their column
    targets: torch.Tensor  # [N] the completion tokens


def pack_rows(prompts, completions, device, packed: bool = False) -> Layout:
    """Rows of prompt + completion ids for one forward: right-padded [B, L] with an attention mask,
    or packed (`packed`): concatenated into one [1, T] row whose position ids restart at 0 for each
    sequence, which transformers reads as separate sequences (no attention across them)."""
    seqs = [list(p) + list(c) for p, c in zip(prompts, completions, strict=True)]
    rows, cols, targets = [], [], []
    offset = 0
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        start = offset + len(p) - 1 if packed else len(p) - 1
        rows += [0 if packed else i] * len(c)
        cols += range(start, start + len(c))
        targets += c
        offset += len(seqs[i])
    as_tensor = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    if packed:
        inputs = {"input_ids": as_tensor([t for s in seqs for t in s]).unsqueeze(0),
                  "position_ids": as_tensor([j for s in seqs for j in range(len(s))]).unsqueeze(0)}
    else:
        ids = torch.zeros((len(seqs), max(map(len, seqs))), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    return Layout(inputs, as_tensor(rows), as_tensor(cols), as_tensor(targets))


def flat_column(table: pa.Table, name: str, dtype) -> torch.Tensor:
    """A list column's values, concatenated over rows, as a CPU tensor (no Python objects)."""
    values = pc.list_flatten(table.column(name)).to_numpy(zero_copy_only=False)
    return torch.from_numpy(np.array(values, dtype=dtype))  # a writable copy, converted once


STORED_COLUMNS = ("teacher_logprobs", "behavior_logprobs", "policy_logprobs", "topk_ids", "topk_logprobs",
                  "teacher_log_tail", "reference_logprobs", "support_ids", "support_logprobs")


def stored_tensors(table: pa.Table, names, k: int | None, device) -> dict[str, torch.Tensor]:
    """The per-token stored columns among `names` as flat tensors on `device`: log-probs float32 [N],
    top-k ids int64 and log-probs float32 reshaped to [N, k], the sampled support's to [N, m] (m: its
    values per completion token)."""
    out = {}
    tokens = None
    for name in STORED_COLUMNS:
        if name in names:
            values = flat_column(table, name, np.int64 if name.endswith("_ids") else np.float32).to(device)
            if name.startswith("support_"):
                if tokens is None:
                    tokens = int(pc.sum(pc.list_value_length(table.column("completion_ids"))).as_py() or 0)
                values = values.view(tokens, -1) if tokens else values.view(0, 1)
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


def row_column(table: pa.Table, name: str, device) -> torch.Tensor:
    """A per-row number column (a reward) as float64 [rows], NaN where null."""
    values = table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
    return torch.from_numpy(values).to(device)


@dataclass
class MicroBatch:
    """One forward's worth of rows as tensors (see pack_rows), with their stored columns."""

    rows: list[int]  # indices into the table
    layout: Layout
    stored: dict[str, torch.Tensor]  # the stored per-token columns asked for, flat [N] or [N, k]

    @property
    def targets(self) -> torch.Tensor:
        return self.layout.targets

    def only(self, index: torch.Tensor) -> MicroBatch:
        """The micro-batch with its completion positions `index` alone: the decoder still reads every
        token, the output layer and the loss run on these."""
        layout = Layout(self.layout.inputs, self.layout.rows[index], self.layout.cols[index],
                        self.layout.targets[index])
        return MicroBatch(self.rows, layout, {name: values[index] for name, values in self.stored.items()})


class TokenBatches:
    """A table of rows (prompt_ids, completion_ids and stored columns) in micro-batches within a
    budget of `max_tokens` (padded, or packed: see pack_by_tokens); `plan` leaves out micro-batches
    with no completion token."""

    def __init__(self, table: pa.Table, max_tokens: int, packed: bool = False):
        self.table, self.packed = table, packed
        self.prompts = table.column("prompt_ids").to_pylist()
        self.completions = table.column("completion_ids").to_pylist()
        lengths = [len(p) + len(c) for p, c in zip(self.prompts, self.completions, strict=True)]
        self.packs = pack_by_tokens(lengths, max_tokens, packed)
        self.plan = [m for m in self.packs if any(self.completions[i] for i in m)]

    @property
    def tokens(self) -> int:
        """Completion tokens of the table."""
        return sum(len(c) for c in self.completions)

    def tensors(self, rows: list[int], columns, k: int | None, device) -> MicroBatch:
        layout = pack_rows([self.prompts[i] for i in rows], [self.completions[i] for i in rows], device,
                           self.packed)
        stored = stored_tensors(self.table.take(pa.array(rows)), columns, k, device)
        return MicroBatch(rows, layout, stored)
