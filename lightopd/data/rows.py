"""Every shard checked against the layout it declares, and every row against its shape, as it is read.

A verified shard (reader.py: size, sha256, store id) is still only bytes that a manifest tells
readers how to interpret. So before any of its rows is used:
- the shard's own layout (`lightopd.layout` in its Parquet metadata: format, k, the top-k dtype)
  must be the one the manifest states; a manifest edited to another k names the shard that says
  otherwise. Shards written before shards carried a layout are read by the manifest's, and the row
  checks below catch any disagreement all the same;
- each column read has the type of the store's schema;
- each row has the shape its layout implies: ids and prompt id present, a non-empty prompt, every
  per-token column as long as the completion, k top-k entries and m sampled-support entries per
  completion token, and token ids
  within the vocabulary.
Failures are InputErrors naming the shard, the row and the column. The checks are Arrow kernels
over whole record batches: no Python loop over rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from lightopd.data.store import LAYOUT_KEY, ROLLOUT_FORMAT, ROLLOUT_SCHEMA, shard_layout, teacher_schema, unavailable
from lightopd.errors import InputError

PER_TOKEN = ("behavior_logprobs", "policy_logprobs", "teacher_logprobs", "teacher_log_tail", "teacher_entropy",
             "reference_logprobs")
PER_TOP_K = ("topk_ids", "topk_logprobs")
PER_DRAW = ("support_ids", "support_logprobs")  # m per completion token (the sampled support)
TOKEN_IDS = ("prompt_ids", "completion_ids", "topk_ids", "support_ids")
REQUIRED = ("prompt_id", "prompt_ids", "completion_ids")  # never null


class ShardLayout:
    """How one shard is read: the columns and types it must have, k, and the vocabulary its ids index."""

    def __init__(self, path: Path, schema: pa.Schema, manifest: dict):
        self.path = path
        declared = (schema.metadata or {}).get(LAYOUT_KEY)
        expected = shard_layout(manifest)
        if declared is not None:
            try:
                layout = json.loads(declared)
            except ValueError:
                layout = None
            if not isinstance(layout, dict):
                raise self.error(f"its layout metadata is unreadable ({declared[:80]!r})")
            differs = [f"{key} {layout.get(key)!r} (the manifest says {expected[key]!r})" for key in expected
                       if layout.get(key) != expected[key]]
            if differs:
                raise self.error(f"it was written with {'; '.join(differs)}: the manifest was edited or belongs to "
                                 "another store; re-run the command that wrote the store")
        self.k = expected["top_k"]
        self.m = expected.get("support_samples") or 0
        self.by_id = expected.get("topk_order") == "id"  # read back in descending order (topk_layout.py)
        self.empty = set(unavailable(manifest))  # columns its scorer left null
        self.vocab = manifest["tokenizer"].get("vocab_size")
        full = ROLLOUT_SCHEMA if manifest["format"] == ROLLOUT_FORMAT else teacher_schema(
            expected["topk_logprobs_dtype"] or "float16")
        for field in full:
            if field.name not in schema.names:
                if field.name not in self.empty:
                    raise self.error(f"it has no column {field.name!r}")
            elif schema.field(field.name).type != field.type:
                raise self.error(f"its column {field.name!r} is {schema.field(field.name).type}, not {field.type}")

    def error(self, what: str, row: int | None = None, column: str | None = None) -> InputError:
        where = "" if row is None else f" row {row}" + (f", column {column!r}," if column else ",")
        return InputError(f"{self.path}:{where} {what}")

    def columns_to_read(self, columns: list[str] | None, names: list[str]) -> list[str]:
        """`columns` (None: all) and whatever their checks need (completion_ids for per-token lengths)."""
        wanted = list(names if columns is None else columns)
        if any(c in PER_TOKEN + PER_TOP_K + PER_DRAW for c in wanted) and "completion_ids" not in wanted:
            wanted.append("completion_ids")
        if self.by_id and any(c in PER_TOP_K for c in wanted):  # the order is restored from both
            wanted += [c for c in PER_TOP_K if c not in wanted]
        return wanted

    def check(self, batch: pa.RecordBatch, first_row: int) -> None:
        """InputError naming the first row (counted in the shard) whose shape its layout does not allow."""
        names = batch.schema.names
        for name in REQUIRED:
            if name in names and batch.column(name).null_count:
                self._first(pc.is_null(batch.column(name)), first_row, name, "is null")
        if "prompt_ids" in names:
            self._first(pc.equal(pc.list_value_length(batch.column("prompt_ids")), 0), first_row, "prompt_ids",
                        "is empty (a completion needs a prompt)")
        lengths = pc.list_value_length(batch.column("completion_ids")) if "completion_ids" in names else None
        for name in PER_TOKEN + PER_TOP_K + PER_DRAW:
            if name not in names or name in self.empty or lengths is None:
                continue
            values = batch.column(name)
            per = self.k if name in PER_TOP_K else self.m if name in PER_DRAW else 1
            expected = pc.multiply(lengths, per)
            got = pc.list_value_length(values)
            bad = pc.or_kleene(pc.is_null(values), pc.not_equal(got, expected))
            if pc.any(bad).as_py():
                i = pc.index(bad, True).as_py()
                raise self.error(f"holds {got[i].as_py()} values for {lengths[i].as_py()} completion tokens"
                                 + (f" at {'m' if name in PER_DRAW else 'k'} = {per}" if per > 1 else "")
                                 + f", not {expected[i].as_py()}",
                                 first_row + i, name)
        for name in TOKEN_IDS:
            if name in names and name not in self.empty:
                column = batch.column(name)
                ids = pc.list_flatten(column)
                bad = pc.less(ids, 0)
                if self.vocab is not None:
                    bad = pc.or_(bad, pc.greater_equal(ids, self.vocab))
                bad = pc.fill_null(bad, True)
                if len(ids) and pc.any(bad).as_py():
                    i = pc.index(bad, True).as_py()
                    row = pc.list_parent_indices(column)[i].as_py()
                    raise self.error(f"holds token id {ids[i].as_py()}, outside the vocabulary of {self.vocab} ids",
                                     first_row + row, name)

    def _first(self, bad: pa.Array, first_row: int, column: str, what: str) -> None:
        if pc.any(bad).as_py():
            raise self.error(what, first_row + pc.index(bad, True).as_py(), column)
