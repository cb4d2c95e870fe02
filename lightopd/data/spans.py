"""Each row's marked spans, for the token selection (`--token-select spans`) and the losses per span
kind (`--span-loss`): read from a field of the row's metadata, or from a JSONL file of annotations
keyed by (prompt_id, sample_index), in completion-token offsets or in character offsets into the
completion's text as the checkers read it (decoded without special tokens).

A span is `[start, end]` or `[start, end, kind]` (end excluded), or an object with those keys.
Character spans become the completion tokens they overlap: a token is inside when any of its
characters is.
"""

from __future__ import annotations

import json
from bisect import bisect_left, bisect_right
from pathlib import Path
from typing import TYPE_CHECKING

from lightopd.errors import InputError

if TYPE_CHECKING:
    from collections.abc import Callable

    import pyarrow as pa

Span = tuple[int, int, "str | None"]


def parse_spans(value, where: str, length: int, units: str = "tokens") -> list[Span]:
    """A row's spans as (start, end, kind) offsets, checked against its completion's `length` (in `units`)."""
    def bad(why: str) -> ValueError:
        return ValueError(f"{where}: {why}; spans are a list of [start, end] or [start, end, kind] {units[:-1]} "
                          "offsets into the completion (end excluded), or objects with those keys")
    if not isinstance(value, list):
        raise bad(f"not a list ({type(value).__name__})")
    out = []
    for span in value:
        if isinstance(span, dict):
            span = [span.get("start"), span.get("end"), span.get("kind")]
        if not isinstance(span, list) or len(span) not in (2, 3):
            raise bad(f"a span is {span!r}")
        start, end, kind = (*span, None)[:3]
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= length):
            raise bad(f"span {span!r} is not within the completion's {length} {units}")
        out.append((start, end, None if kind is None else str(kind)))
    return out


def character_spans_to_tokens(spans: list[Span], ids: list[int], decode: Callable[[list[int]], str]) -> list[Span]:
    """Character spans of decode(ids) as the token spans that overlap them. Uses the length of each
    decoded prefix, found by bisection (O(log n) decodes per boundary, not one per token)."""
    lengths: dict[int, int] = {}

    def prefix(i: int) -> int:  # characters of the first i tokens' text
        if i not in lengths:
            lengths[i] = len(decode(ids[:i]))
        return lengths[i]

    out = []
    positions = range(len(ids) + 1)
    for start, end, kind in spans:
        if start == end:
            continue
        first = max(0, bisect_right(positions, start, key=prefix) - 1)  # the token holding character `start`
        last = bisect_left(positions, end, key=prefix)  # tokens up to the one holding character end − 1
        out.append((first, max(first, min(last, len(ids))), kind))
    return out


def annotations(path: str, field: str) -> dict[tuple[str, int], object]:
    """{(prompt_id, sample_index): spans} from a JSONL file of {"prompt_id", "sample_index", FIELD}."""
    out = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"--token-spans-file {path}: cannot be read ({e})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"--token-spans-file {path} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(record, dict) or not {"prompt_id", "sample_index", field} <= set(record):
            raise InputError(f"{where}: needs the keys prompt_id, sample_index and {field!r} (--token-spans)")
        if not isinstance(record["sample_index"], int) or isinstance(record["sample_index"], bool):
            raise InputError(f"{where}: sample_index is {record['sample_index']!r}, not an integer")
        key = (str(record["prompt_id"]), record["sample_index"])
        if key in out:
            raise InputError(f"{where}: prompt {key[0]!r} sample {key[1]} is annotated twice")
        out[key] = record[field]
    return out


class Spans:
    """The spans of a step's rows: from the metadata `field` or the annotations in `file`, in `units`
    (`--token-spans`, `--token-spans-file`, `--token-span-units`)."""

    def __init__(self, field: str, units: str = "tokens", file: str | None = None,
                 decode: Callable[[list[int]], str] | None = None):
        self.field, self.units, self.decode = field, units, decode
        self.file = annotations(file, field) if file else None
        if self.units == "characters" and decode is None:
            raise ValueError("character spans need the student's tokenizer to decode completions")

    @property
    def columns(self) -> tuple[str, ...]:
        """The store columns it reads besides prompt_id and completion_ids."""
        return ("sample_index",) if self.file is not None else ("sample_index", "metadata")

    def of(self, table: pa.Table) -> list[list[Span]]:
        """Each row's spans as completion-token offsets."""
        out = []
        for row in table.select(["prompt_id", *self.columns, "completion_ids"]).to_pylist():
            ids = row["completion_ids"]
            where = f"prompt {row['prompt_id']!r} sample {row['sample_index']}"
            if self.file is not None:
                value = self.file.get((row["prompt_id"], row["sample_index"]), KeyError)
                if value is KeyError:
                    raise InputError(f"--token-spans-file: {where} is not annotated (list every trained row, "
                                     f"with {self.field!r}: [] for none)")
            else:
                metadata = json.loads(row["metadata"]) if row["metadata"] else {}
                where += f", metadata field {self.field!r}"
                if self.field not in metadata:
                    raise InputError(f"spans: {where} is missing (--token-spans names the field)")
                value = metadata[self.field]
            text = self.decode(ids) if self.units == "characters" else None
            try:
                spans = parse_spans(value, where, len(ids) if text is None else len(text), self.units)
            except ValueError as e:
                raise InputError(f"spans: {e}") from None
            out.append(spans if text is None else character_spans_to_tokens(spans, ids, self.decode))
        return out
