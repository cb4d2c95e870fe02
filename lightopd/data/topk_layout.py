"""How a teacher store lays out each position's top-k on disk, and how readers get back the
descending order every objective reads.

Two choices, recorded in the manifest's `scoring` and in every shard's layout:
- `topk_order`: `logprob` (descending, as scored) or `id` (the argmax first, then the other k − 1
  by ascending token id). Both hold the same (id, log-prob) pairs, so nothing is lost; ascending ids
  differ by small steps, which Parquet's DELTA_BINARY_PACKED encoding stores in a few bits each.
  Readers (reader.py) restore the descending order: the argmax first, the rest by descending
  log-prob, ties by id.
- `topk_bits`: significand bits kept of each float16 log-prob (11, float16's own; 8, bfloat16's),
  rounded to nearest: the relative error of a log-prob is at most 2^-bits, and fewer distinct
  values compress to fewer bytes.
The teacher's entropy is kept to ENTROPY_BITS significand bits (`entropy_bits` in the manifest)
the same way; the sampled token's log-prob and the tail mass stay float32 as computed.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ORDERS = ("id", "logprob")
FLOAT16_BITS = 11  # float16's significand, its implicit bit included
FLOAT32_BITS = 24
ENTROPY_BITS = 11  # the teacher's entropy, a diagnostic and a weight: float16's precision in a float32 column


def round_significand(values: np.ndarray, bits: int, limit: float | None = None) -> np.ndarray:
    """float16 or float32 `values` rounded to nearest (ties away from zero) at `bits` significand
    bits; toward zero where nearest would leave the dtype's range, or pass `limit` (float16's
    largest value, for float32 values stored as float16)."""
    values = np.asarray(values)
    width, unsigned = (FLOAT16_BITS, np.uint16) if values.dtype == np.float16 else (FLOAT32_BITS, np.uint32)
    values = values.astype(np.float16 if width == FLOAT16_BITS else np.float32)
    drop = width - bits
    if drop <= 0:
        return values
    raw = values.view(unsigned).astype(np.uint64)
    rounded = ((raw + (1 << (drop - 1))) >> drop << drop).astype(unsigned)
    truncated = (raw >> drop << drop).astype(unsigned)  # where rounding up would overflow to infinity
    overflow = ~np.isfinite(rounded.view(values.dtype))
    if limit is not None:
        overflow |= np.abs(rounded.view(values.dtype)) > limit
    kept = np.where(overflow, truncated, rounded)
    return np.where(np.isfinite(values), kept, raw.astype(unsigned)).view(values.dtype)


def _argmax_first(ids: np.ndarray, logprobs: np.ndarray, key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N, k] top-k with position 0 (the argmax) kept first and the rest sorted by `key` [N, k − 1]
    (stable)."""
    if ids.shape[1] <= 2:
        return ids, logprobs
    order = np.concatenate([np.zeros((len(ids), 1), dtype=np.int64),
                            1 + np.argsort(key, axis=1, kind="stable")], axis=1)
    return np.take_along_axis(ids, order, 1), np.take_along_axis(logprobs, order, 1)


def by_id(ids: np.ndarray, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N, k] top-k in descending order → the argmax first, the rest by ascending id."""
    return _argmax_first(ids, logprobs, ids[:, 1:])


def descending(ids: np.ndarray, logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`by_id`'s layout → the argmax first, the rest by descending log-prob (ties by ascending id)."""
    return _argmax_first(ids, logprobs, -logprobs[:, 1:].astype(np.float32))


def restore(batch: pa.RecordBatch, k: int) -> pa.RecordBatch:
    """A batch of an id-ordered store with each position's top-k in descending order (rows whose
    top-k is null stay null); both top-k columns must be in the batch."""
    ids_col, lps_col = batch.column("topk_ids"), batch.column("topk_logprobs")
    flat_ids = pc.list_flatten(ids_col).to_numpy(zero_copy_only=False).reshape(-1, k)
    flat_lps = pc.list_flatten(lps_col).to_numpy(zero_copy_only=False).reshape(-1, k)
    ids, lps = descending(flat_ids, flat_lps)
    lengths = pc.fill_null(pc.list_value_length(ids_col), 0).to_numpy(zero_copy_only=False)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    mask = ids_col.is_null() if ids_col.null_count else None
    columns = dict(zip(batch.schema.names, batch.columns, strict=True))
    columns["topk_ids"] = pa.ListArray.from_arrays(offsets, pa.array(ids.reshape(-1), ids_col.type.value_type),
                                                   mask=mask)
    columns["topk_logprobs"] = pa.ListArray.from_arrays(offsets, pa.array(lps.reshape(-1), lps_col.type.value_type),
                                                        mask=mask)
    return pa.RecordBatch.from_arrays(list(columns.values()), schema=batch.schema)
