"""Sharded Parquet stores: schemas, the manifest, an atomic shard writer, a streaming reader.

A store is a directory holding `manifest.json` and shards `part-NNNNN.parquet`. A shard is
written under a temporary name, flushed, and renamed into place; only then is it listed in the
manifest (with rows, tokens, bytes and sha256), so a reader never sees a partial shard and a
re-run knows exactly which shards are done. The manifest is replaced atomically under a file
lock, so several processes may add shards to one store. It is the only place metadata lives.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import re
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lightopd import __version__
from lightopd.errors import InputError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
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
TEACHER_COLUMNS = ("teacher_logprobs", "topk_ids", "topk_logprobs", "teacher_entropy")


def teacher_schema(topk_dtype: str = "float16") -> pa.Schema:
    """Every rollout column, plus the teacher's per-token statistics."""
    values = pa.float16() if topk_dtype == "float16" else pa.float32()
    return pa.schema(list(ROLLOUT_SCHEMA) + [
        ("teacher_logprobs", pa.list_(pa.float32())),
        ("topk_ids", pa.list_(pa.int32())),
        ("topk_logprobs", pa.list_(values)),
        ("teacher_entropy", pa.list_(pa.float32())),
    ])


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


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _host() -> str:
    return socket.gethostname().replace(".", "_")


def _tmp_path(final: Path) -> Path:
    """A temporary name unique to this process, even across machines sharing the filesystem."""
    return final.with_name(f".{final.name}.{_host()}.{os.getpid()}.tmp")


def _remove_stale_tmp(directory: Path) -> None:
    """Delete temporary files left by dead processes of this host (a crash mid-write)."""
    host = _host()
    for path in directory.glob(".*.tmp"):
        parts = path.name.rsplit(".", 3)
        if len(parts) != 4 or parts[1] != host or not parts[2].isdigit():
            continue
        try:
            os.kill(int(parts[2]), 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
        except PermissionError:
            pass


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = _tmp_path(path)
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    with open(directory / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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


def _without_paths(obj: Any) -> Any:
    """Metadata minus every `path` key: locations may move, content identity may not."""
    if isinstance(obj, dict):
        return {k: _without_paths(v) for k, v in obj.items() if k != "path"}
    if isinstance(obj, list):
        return [_without_paths(v) for v in obj]
    return obj


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _differences(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: store has {a!r}, this run has {b!r}"]


class StoreWriter:
    """Creates a store, or reopens an unfinished one made with the same settings, and adds shards.

    `metadata` describes the content (models, fingerprints, parameters); on reopening it must
    match what the store recorded, paths aside, or the run is refused: mixing shards made with
    different settings would silently corrupt the store.
    """

    def __init__(self, directory: str | Path, fmt: str, metadata: dict, num_shards: int,
                 parquet_options: dict | None = None):
        self.directory = Path(directory)
        self.parquet_options = parquet_options or {"compression": "zstd"}
        self.format = fmt
        self.num_shards = num_shards
        manifest_path = self.directory / MANIFEST
        if self.directory.exists() and not self.directory.is_dir():
            raise InputError(f"{self.directory}: exists and is not a directory")
        self.directory.mkdir(parents=True, exist_ok=True)
        with _locked(self.directory):
            if manifest_path.exists():
                manifest = read_manifest(self.directory)
                self._check_compatible(manifest, metadata)
                _remove_stale_tmp(self.directory)
            else:
                strays = [p.name for p in self.directory.iterdir() if not p.name.startswith(".")]
                if strays:
                    raise InputError(
                        f"{self.directory}: directory is not empty and holds no lightopd store "
                        f"(found {', '.join(sorted(strays)[:3])}); choose another --out"
                    )
                manifest = {
                    "format": fmt,
                    "format_version": FORMAT_VERSION,
                    "lightopd_version": __version__,
                    "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    **metadata,
                    "num_shards": num_shards,
                    "complete": False,
                    "rows": 0,
                    "tokens": 0,
                    "shards": [],
                }
                _write_json_atomic(manifest_path, manifest)

    def _check_compatible(self, manifest: dict, metadata: dict) -> None:
        if manifest.get("format") != self.format:
            raise InputError(
                f"{self.directory}: holds a {manifest.get('format')!r} store, not {self.format!r}; "
                "choose another --out"
            )
        stored = {k: manifest.get(k) for k in metadata}
        diffs = _differences(_without_paths(stored), _without_paths(metadata))
        if manifest.get("num_shards") != self.num_shards:
            diffs.append(f"num_shards: store has {manifest.get('num_shards')}, this run has {self.num_shards}")
        if diffs:
            raise InputError(
                f"{self.directory}: already holds a store made with different settings "
                f"({'; '.join(diffs[:4])}); choose another --out, or re-run with the same settings to resume"
            )

    def manifest(self) -> dict:
        return read_manifest(self.directory)

    def completed(self) -> set[int]:
        """Indices of shards already listed in the manifest."""
        return {shard_index(s["name"]) for s in self.manifest()["shards"]}

    def write_shard(self, index: int, table: pa.Table, tokens: int, **extra: Any) -> dict:
        """Write shard `index` atomically, then list it in the manifest. Returns its entry."""
        if not 0 <= index < self.num_shards:
            raise ValueError(f"shard index {index} outside 0..{self.num_shards - 1}")
        name = shard_name(index)
        final = self.directory / name
        tmp = _tmp_path(final)
        with pa.OSFile(str(tmp), "wb") as sink:
            pq.write_table(table, sink, row_group_size=max(1, min(len(table), 4096)), **self.parquet_options)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        entry = {
            "name": name,
            "rows": table.num_rows,
            "tokens": int(tokens),
            "bytes": tmp.stat().st_size,
            "sha256": sha256_file(tmp),
            **extra,
        }
        os.replace(tmp, final)
        _fsync_dir(self.directory)

        def add(manifest: dict) -> None:
            shards = [s for s in manifest["shards"] if s["name"] != name] + [entry]
            manifest["shards"] = sorted(shards, key=lambda s: s["name"])
            manifest["rows"] = sum(s["rows"] for s in manifest["shards"])
            manifest["tokens"] = sum(s["tokens"] for s in manifest["shards"])
            manifest["complete"] = len(manifest["shards"]) == manifest["num_shards"]

        self._update(add)
        return entry

    def _update(self, change: Callable[[dict], None]) -> dict:
        with _locked(self.directory):
            manifest = read_manifest(self.directory)
            change(manifest)
            _write_json_atomic(self.directory / MANIFEST, manifest)
        return manifest


def manifest_fingerprint(directory: str | Path) -> str:
    """sha256 of a store's manifest: names the exact content a derived store was computed from."""
    return "sha256:" + sha256_file(Path(directory) / MANIFEST)[:32]


def open_store(directory: str | Path, formats: tuple[str, ...] | None = None) -> dict:
    """The manifest of a complete store, for reading; InputError if it is not one."""
    manifest = read_manifest(directory)
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
