"""The rows of a teacher store: the rollout rows with the teacher's columns appended, in the
store's encoding (data/encoding.py: the top-k's dtype, bits and order, and the sampled support),
and the Parquet options it is written with."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from lightopd.data.encoding import StoreEncoding
from lightopd.data.store import teacher_schema
from lightopd.data.topk_layout import ENTROPY_BITS, FLOAT16_BITS, by_id, round_significand
from lightopd.errors import InputError

# Chosen by measurement on a 32k-vocabulary teacher at k = 32 (bytes per completion token, whole
# shard): zstd-3 defaults 108.8; byte-stream-split floats 95.9; and zstd level 6 90.3, which
# writes as fast as level 3 (higher levels gain < 1 byte and write slower).
PARQUET_OPTIONS = {
    "compression": "zstd",
    "compression_level": 6,
    "use_dictionary": ["prompt_id", "finish_reason", "answer"],
    "column_encoding": {
        "teacher_logprobs": "BYTE_STREAM_SPLIT",
        "topk_logprobs": "BYTE_STREAM_SPLIT",
        "support_ids": "DELTA_BINARY_PACKED",  # ascending within each position
        "support_logprobs": "BYTE_STREAM_SPLIT",
        "teacher_log_tail": "BYTE_STREAM_SPLIT",
        "teacher_entropy": "BYTE_STREAM_SPLIT",
        "behavior_logprobs": "BYTE_STREAM_SPLIT",
        "policy_logprobs": "BYTE_STREAM_SPLIT",
    },
}


def parquet_options(topk_order: str | None) -> dict:
    """The Parquet options of a teacher store with this top-k order."""
    if topk_order != "id":
        return PARQUET_OPTIONS
    return {**PARQUET_OPTIONS, "column_encoding": {**PARQUET_OPTIONS["column_encoding"],
                                                   "topk_ids": "DELTA_BINARY_PACKED"}}


def _list_array(values: np.ndarray, lengths: np.ndarray, value_type: pa.DataType) -> pa.Array:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=value_type))


def _rounded(values: np.ndarray, encoding: StoreEncoding) -> np.ndarray:
    """Log-probs as the store keeps them: float16 at --topk-bits, rounded once from float32, or float32."""
    if encoding.topk_dtype == "float16" and encoding.topk_bits < FLOAT16_BITS:
        values = round_significand(values.astype(np.float32), encoding.topk_bits, float(np.finfo(np.float16).max))
    return values.astype(encoding.topk_dtype)


def teacher_table(rollouts: pa.Table, stats: list, encoding: StoreEncoding,
                  unavailable: tuple[str, ...] = (), teacher_prompts: list[list[int]] | None = None,
                  reference: list | None = None) -> pa.Table:
    """The rollout rows with the teacher columns appended (top-k and sampled support flattened
    row-major by position); `unavailable` columns, and rollout columns the rows lack (policy_logprobs
    of an older store), are null in every row, as are `teacher_prompt_ids` without `teacher_prompts`,
    `reference_logprobs` without the `reference` model's statistics and the support without draws."""
    schema = teacher_schema(encoding.topk_dtype)
    lengths = np.array([len(s.sampled) for s in stats], dtype=np.int64)
    k = stats[0].topk_ids.shape[1] if stats else 0
    drawn = bool(stats) and stats[0].support_ids is not None
    cat = {f: torch.cat([getattr(s, f) for s in stats]).numpy() for f in
           ("sampled", "topk_ids", "topk_logprobs", "topk_rest", "entropy",
            *(("support_ids", "support_logprobs") if drawn else ()))}
    cat["topk_logprobs"] = _rounded(cat["topk_logprobs"], encoding)
    cat["entropy"] = round_significand(cat["entropy"].astype(np.float32), ENTROPY_BITS)
    if encoding.topk_order == "id":
        cat["topk_ids"], cat["topk_logprobs"] = by_id(cat["topk_ids"], cat["topk_logprobs"])
    columns = {
        "teacher_logprobs": _list_array(cat["sampled"].astype(np.float32), lengths, pa.float32()),
        "topk_ids": _list_array(cat["topk_ids"].astype(np.int32).reshape(-1), lengths * k, pa.int32()),
        "topk_logprobs": _list_array(cat["topk_logprobs"].reshape(-1), lengths * k,
                                     schema.field("topk_logprobs").type.value_type),
        "teacher_log_tail": _list_array(cat["topk_rest"].astype(np.float32), lengths, pa.float32()),
        "teacher_entropy": _list_array(cat["entropy"].astype(np.float32), lengths, pa.float32()),
    }
    if drawn:
        m = cat["support_ids"].shape[1]
        if int(lengths.sum()) * m >= 2**31:  # a list column's offsets are int32
            raise InputError(f"--support-samples {m}: a shard of {int(lengths.sum())} completion tokens would hold "
                             f"{int(lengths.sum()) * m} draws, past a Parquet list column's 2^31; draw fewer, or "
                             "sample the rollouts into smaller shards (rollout --prompts-per-shard)")
        columns["support_ids"] = _list_array(cat["support_ids"].astype(np.int32).reshape(-1), lengths * m, pa.int32())
        columns["support_logprobs"] = _list_array(_rounded(cat["support_logprobs"], encoding).reshape(-1),
                                                  lengths * m, schema.field("support_logprobs").type.value_type)
    if teacher_prompts is not None:
        columns["teacher_prompt_ids"] = pa.array(teacher_prompts, type=pa.list_(pa.int32()))
    if reference is not None:
        sampled = torch.cat([s.sampled for s in reference]).numpy().astype(np.float32)
        columns["reference_logprobs"] = _list_array(sampled, lengths, pa.float32())
    for name in unavailable:
        columns[name] = pa.nulls(len(stats), type=schema.field(name).type)
    arrays = [rollouts.column(f.name) if f.name in rollouts.schema.names
              else columns.get(f.name, pa.nulls(len(stats), type=f.type)) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)
