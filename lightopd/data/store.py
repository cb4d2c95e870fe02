"""Sharded Parquet stores, read side: schemas, the manifest, a streaming reader, verification.

A store is a directory holding `manifest.json` and shards `part-NNNNN.parquet`; the manifest
lists every complete shard with its rows, tokens, bytes and sha256, and is the only place
metadata lives. Writing is writer.py's job.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lightopd.errors import InputError

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: teacher_log_tail column; tokenizer fingerprints cover the vocabulary alone
ROLLOUT_FORMAT = "lightopd.rollouts"
SHARD_RE = re.compile(r"^part-(\d{5})\.parquet$")

ROLLOUT_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("sample_index", pa.int32()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("completion_ids", pa.list_(pa.int32())),
        ("behavior_logprobs", pa.list_(pa.float32())),
        ("finish_reason", pa.string()),
        ("answer", pa.string()),
    ]
)


TEACHER_FORMAT = "lightopd.teacher"
TEACHER_COLUMNS = ("teacher_logprobs", "topk_ids", "topk_logprobs", "teacher_log_tail", "teacher_entropy")


def teacher_schema(topk_dtype: str = "float16") -> pa.Schema:
    """Every rollout column, plus the teacher's per-token statistics."""
    values = pa.float16() if topk_dtype == "float16" else pa.float32()
    return pa.schema(list(ROLLOUT_SCHEMA) + [
        ("teacher_logprobs", pa.list_(pa.float32())),
        ("topk_ids", pa.list_(pa.int32())),
        ("topk_logprobs", pa.list_(values)),
        ("teacher_log_tail", pa.list_(pa.float32())),
        ("teacher_entropy", pa.list_(pa.float32())),
    ])


def store_columns(manifest: dict) -> tuple[str, ...]:
    """The columns every row of the store has."""
    schema = ROLLOUT_SCHEMA if manifest["format"] == ROLLOUT_FORMAT else teacher_schema()
    return tuple(schema.names)


def sampling_of(manifest: dict) -> dict:
    """The sampling settings of the rollouts in a store (n, temperature, top_p, max_new_tokens, seed)."""
    return manifest["sampling"] if manifest["format"] == ROLLOUT_FORMAT else manifest["rollouts"]["sampling"]


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def shard_index(name: str) -> int:
    return int(SHARD_RE.match(name).group(1))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()

def read_manifest(directory: str | Path) -> dict:
    """The manifest of the store at `directory`; InputError if there is none or it is unreadable."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise InputError(f"{directory}: no such store directory")
    if not path.is_file():
        raise InputError(f"{directory}: not a lightopd store (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or "format" not in manifest or "shards" not in manifest:
        raise InputError(f"{path}: not a lightopd manifest (no 'format' or 'shards')")
    return manifest


def check_version(directory: str | Path, manifest: dict) -> None:
    """InputError unless the store is of the format this lightopd reads and writes."""
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise InputError(f"{directory}: a store of format version {version}, and this lightopd reads version "
                         f"{FORMAT_VERSION} (version 2 added the teacher's exact tail mass and fingerprints "
                         "tokenizers by their vocabulary alone); re-run the command that wrote it")

def manifest_fingerprint(directory: str | Path) -> str:
    """sha256 of a store's manifest: names the exact content a derived store was computed from."""
    return "sha256:" + sha256_file(Path(directory) / MANIFEST)[:32]


def open_store(directory: str | Path, formats: tuple[str, ...] | None = None) -> dict:
    """The manifest of a complete store, for reading; InputError if it is not one."""
    manifest = read_manifest(directory)
    check_version(directory, manifest)
    if formats is not None and manifest["format"] not in formats:
        raise InputError(f"{directory}: is a {manifest['format']!r} store; expected {' or '.join(formats)}")
    if not manifest.get("complete"):
        raise InputError(
            f"{directory}: store is incomplete ({len(manifest['shards'])} of "
            f"{manifest.get('num_shards')} shards); re-run the command that writes it to finish it"
        )
    return manifest


def iter_batches(
    directory: str | Path,
    columns: list[str] | None = None,
    batch_size: int = 1024,
    manifest: dict | None = None,
) -> Iterator[pa.RecordBatch]:
    """Stream record batches from the listed shards in order, reading only `columns`."""
    directory = Path(directory)
    manifest = manifest if manifest is not None else open_store(directory)
    for shard in manifest["shards"]:
        with pq.ParquetFile(directory / shard["name"]) as pf:
            yield from pf.iter_batches(batch_size=batch_size, columns=columns)


def verify(directory: str | Path) -> list[str]:
    """Every problem found in the store: missing, partial, unlisted or corrupt shards."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    problems = []
    listed = {s["name"] for s in manifest["shards"]}
    for shard in manifest["shards"]:
        path = directory / shard["name"]
        if not path.is_file():
            problems.append(f"{shard['name']}: missing")
            continue
        if path.stat().st_size != shard["bytes"]:
            problems.append(f"{shard['name']}: corrupt ({path.stat().st_size} bytes, manifest says {shard['bytes']})")
            continue
        if sha256_file(path) != shard["sha256"]:
            problems.append(f"{shard['name']}: corrupt (sha256 differs from the manifest)")
            continue
        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except (OSError, pa.ArrowException) as e:
            problems.append(f"{shard['name']}: corrupt (unreadable Parquet: {e})")
            continue
        if rows != shard["rows"]:
            problems.append(f"{shard['name']}: corrupt ({rows} rows, manifest says {shard['rows']})")
    for path in sorted(directory.iterdir()):
        if SHARD_RE.match(path.name) and path.name not in listed:
            problems.append(f"{path.name}: partial (on disk but not listed in the manifest)")
        elif path.name.startswith(".part-") and path.name.endswith(".tmp"):
            problems.append(f"{path.name}: partial (temporary file of an interrupted write)")
    planned = manifest.get("num_shards")
    if planned is not None:
        missing = [shard_name(i) for i in range(planned) if shard_name(i) not in listed]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            problems.append(f"store incomplete: {len(missing)} of {planned} shards not written "
                            f"({', '.join(missing[:3])}{more})")
    return problems


def describe(directory: str | Path) -> dict:
    """A summary of the store for `inspect`: its metadata, sizes and bytes per token."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    total_bytes = sum(s["bytes"] for s in manifest["shards"])
    tokens = manifest.get("tokens", 0)
    summary = {k: v for k, v in manifest.items() if k != "shards"}
    summary.update(
        path=str(directory),
        shards_written=len(manifest["shards"]),
        bytes=total_bytes,
        bytes_per_token=round(total_bytes / tokens, 2) if tokens else None,
    )
    return summary
