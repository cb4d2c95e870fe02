"""Read and validate prompt files (JSONL or Parquet) and turn records into token ids.

A record has exactly one of `prompt` (a string) or `messages` (a chat list rendered with the
tokenizer's chat template and its generation prompt), an optional `id` (default: the record's
index) and an optional `answer`. Anything else is an error naming the file, record and field.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

from lightopd.data.store import sha256_file
from lightopd.errors import InputError

FIELDS = ("id", "prompt", "messages", "answer")


@dataclass(frozen=True)
class PromptRecord:
    id: str
    prompt: str | None
    messages: tuple[dict, ...] | None
    answer: str | None
    where: str  # "FILE line N" or "FILE row N", for error messages


def file_fingerprint(path: str | Path) -> str:
    return "sha256:" + sha256_file(Path(path))[:32]


def _raw_records(path: Path):
    """Yield (where, record) pairs from a JSONL or Parquet file."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                where = f"{path} line {lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise InputError(f"{where}: not UTF-8 text (byte {e.start + 1} of the line is "
                                     f"{raw[e.start:e.start + 1]!r})") from None
                if not line.strip():
                    continue
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except (OSError, pa.ArrowException) as e:
            raise InputError(f"{path}: not a readable Parquet file ({e})") from None
        row = 0
        for batch in pf.iter_batches(batch_size=4096):
            for record in batch.to_pylist():
                yield f"{path} row {row}", {k: v for k, v in record.items() if v is not None}
                row += 1
    else:
        raise InputError(f"{path}: unknown prompt file type {suffix!r} (use .jsonl or .parquet)")


def _check_messages(where: str, messages) -> tuple[dict, ...]:
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise InputError(f"{where}: field 'messages'[{i}] must be an object with string 'role' and 'content'")
    return tuple(messages)


def _validate(where: str, index: int, record) -> PromptRecord:
    if not isinstance(record, dict):
        raise InputError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - set(FIELDS))
    if unknown:
        raise InputError(f"{where}: unknown field {unknown[0]!r} (allowed: {', '.join(FIELDS)})")
    has_prompt, has_messages = "prompt" in record, "messages" in record
    if has_prompt == has_messages:
        which = "both" if has_prompt else "neither"
        raise InputError(f"{where}: record has {which} of 'prompt' and 'messages'; give exactly one")
    prompt = record.get("prompt")
    if has_prompt and not isinstance(prompt, str):
        raise InputError(f"{where}: field 'prompt' must be a string")
    messages = _check_messages(where, record["messages"]) if has_messages else None
    rid = record.get("id", index)
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise InputError(f"{where}: field 'id' must be a string or an integer")
    answer = record.get("answer")
    if answer is not None:
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise InputError(f"{where}: field 'answer' must be a string or a number")
        answer = str(answer)
    return PromptRecord(str(rid), prompt, messages, answer, where)


def read_prompts(path: str | Path, limit: int | None = None) -> list[PromptRecord]:
    """Every record of the file (the first `limit` if given), validated; ids must be unique."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--prompts {path}: no such file")
    records: list[PromptRecord] = []
    seen: dict[str, str] = {}
    for index, (where, raw) in enumerate(itertools.islice(_raw_records(path), limit)):
        rec = _validate(where, index, raw)
        if rec.id in seen:
            raise InputError(f"{where}: duplicate id {rec.id!r} (first at {seen[rec.id]})")
        seen[rec.id] = where
        records.append(rec)
    if not records:
        raise InputError(f"--prompts {path}: the file holds no records")
    return records


def encode(tokenizer, record: PromptRecord) -> list[int]:
    """Token ids fed to the model: the prompt as is, or the chat rendered for generation."""
    if record.prompt is not None:
        return list(tokenizer(record.prompt, add_special_tokens=True)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(
            f"{record.where}: field 'messages' needs a chat template, and this tokenizer has none "
            "(use 'prompt' records, or a tokenizer with a chat_template)"
        )
    ids = tokenizer.apply_chat_template(list(record.messages), add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def encode_all(tokenizer, records: list[PromptRecord], context: int | None) -> list[list[int]]:
    """Token ids of every record; a prompt that leaves no room to generate is an error."""
    encoded = []
    for record in records:
        ids = encode(tokenizer, record)
        if not ids:
            raise InputError(f"{record.where}: the prompt encodes to no tokens")
        if context is not None and len(ids) >= context:
            raise InputError(
                f"{record.where}: prompt is {len(ids)} tokens, which leaves no room to generate "
                f"within the model's context of {context} tokens"
            )
        encoded.append(ids)
    return encoded
