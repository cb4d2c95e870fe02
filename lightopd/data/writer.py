"""Writing stores: an atomic shard writer, the manifest under a file lock, and a worker's share.

A shard is written under a temporary name unique to the process, flushed, and renamed into
place; only then is it listed in the manifest (with rows, tokens, bytes and sha256), so a reader
never sees a partial shard and a re-run knows exactly which shards are done. The manifest is
replaced atomically under a file lock, so several processes (`--worker I/N`) may add shards to
one store. `ShardWork` is the work list those writers share: this worker's shards, the ones still
to write, and the summary a command prints. `write_json_atomic` also writes eval's `--out`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lightopd import __version__
from lightopd.data.lock import LOCK, SymlinkRefused, exclusive, open_nofollow
from lightopd.data.store import (
    FORMAT_VERSION,
    LAYOUT_KEY,
    MANIFEST,
    STORE_ID_KEY,
    check_version,
    read_manifest,
    sha256_file,
    shard_index,
    shard_layout,
    shard_name,
)
from lightopd.errors import InputError
from lightopd.options import parse_worker
from lightopd.progress import console


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


def _create_tmp(final: Path):
    """A new binary file at this process's temporary name for `final`, opened for writing: created
    exclusively and never through a symbolic link (one planted at the predictable name is removed,
    not followed)."""
    tmp = _tmp_path(final)
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    return tmp, os.fdopen(fd, "wb")


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


def write_json_atomic(path: Path, obj: dict) -> None:
    """`obj` as standard JSON (NaN or inf is an error, never written) at `path`, atomically."""
    text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n"
    tmp, f = _create_tmp(path)
    try:
        with f:
            f.write(text.encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    try:
        f = open_nofollow(directory / ".lock")
    except SymlinkRefused as e:
        raise InputError(f"{directory}: {e.strerror}") from None
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)

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
        self.created = False  # this writer made the store: `discard` may remove it
        self.layout = {LAYOUT_KEY: json.dumps(shard_layout({"format": fmt, **metadata}), allow_nan=False).encode()}
        manifest_path = self.directory / MANIFEST
        if self.directory.exists() and not self.directory.is_dir():
            raise InputError(f"{self.directory}: exists and is not a directory")
        made_directory = not self.directory.exists()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"{self.directory}: cannot create the store directory ({e.strerror})") from None
        if not os.access(self.directory, os.W_OK):
            raise InputError(f"{self.directory}: not writable")
        self._made_directory = made_directory
        with _locked(self.directory):
            if manifest_path.exists():
                manifest = read_manifest(self.directory)
                self._check_compatible(manifest, metadata)
                _remove_stale_tmp(self.directory)
            else:
                _remove_stale_tmp(self.directory)
                strays = [p.name for p in self.directory.iterdir() if not p.name.startswith(".")]
                if strays:
                    raise InputError(
                        f"{self.directory}: directory is not empty and holds no lightopd store "
                        f"(found {', '.join(sorted(strays)[:3])}); choose another --out"
                    )
                manifest = {
                    "format": fmt,
                    "format_version": FORMAT_VERSION,
                    "store_id": uuid.uuid4().hex,
                    "lightopd_version": __version__,
                    "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    **metadata,
                    "num_shards": num_shards,
                    "complete": False,
                    "rows": 0,
                    "tokens": 0,
                    "shards": [],
                }
                write_json_atomic(manifest_path, manifest)
                self.created = True
        self.store_id = manifest["store_id"]

    def discard(self) -> None:
        """Remove the store this writer created if no shard was written to it yet: a run that fails
        before its first row leaves nothing behind."""
        if not self.created or self.manifest()["shards"]:
            return
        for path in (self.directory / MANIFEST, self.directory / ".lock"):
            path.unlink(missing_ok=True)
        if self._made_directory and not any(self.directory.iterdir()):
            self.directory.rmdir()

    def _check_compatible(self, manifest: dict, metadata: dict) -> None:
        if manifest.get("format") != self.format:
            raise InputError(
                f"{self.directory}: holds a {manifest.get('format')!r} store, not {self.format!r}; "
                "choose another --out"
            )
        check_version(self.directory, manifest)
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
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), STORE_ID_KEY: self.store_id.encode(),
                                               **self.layout})
        tmp, sink = _create_tmp(final)
        try:
            with sink:
                pq.write_table(table, sink, row_group_size=max(1, min(len(table), 4096)), **self.parquet_options)
                sink.flush()
                os.fsync(sink.fileno())
            entry = {
                "name": name,
                "rows": table.num_rows,
                "tokens": int(tokens),
                "bytes": tmp.stat().st_size,
                "sha256": sha256_file(tmp),
                **extra,
            }
            os.replace(tmp, final)
        except BaseException:  # a full disk or a kill: no temporary file outlives the write that made it
            tmp.unlink(missing_ok=True)
            raise
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
            write_json_atomic(self.directory / MANIFEST, manifest)
        return manifest


@contextlib.contextmanager
def shard_work(directory: str | Path, fmt: str, metadata: dict, num_shards: int, worker: str,
               parquet_options: dict | None = None) -> Iterator[ShardWork]:
    """This worker's share of a store, for the duration of a run: the worker's lock on the store (a
    second process with the same --out and --worker stops, naming the first), the writer, and, if
    the run fails before any row is written, no store left behind (one worker only: with several,
    another may be writing)."""
    index, count = parse_worker(worker)
    what = f"--out {directory}" + (f" --worker {worker}" if count > 1 else "")
    with exclusive(directory, what, LOCK if count == 1 else f".worker-{index}-of-{count}.lock"):
        writer = StoreWriter(directory, fmt, metadata, num_shards, parquet_options)
        try:
            yield ShardWork(writer, worker)
        except BaseException:
            if count == 1:
                writer.discard()
            raise


class ShardWork:
    """One worker's share of a store's shards (i % N == I): those still to write, and the summary
    the command prints when it is done. Shared by the commands that write stores with `--worker`."""

    def __init__(self, writer: StoreWriter, worker: str):
        index, count = parse_worker(worker)
        self.writer, self.worker = writer, worker
        self.mine = [i for i in range(writer.num_shards) if i % count == index]
        done = writer.completed()
        self.todo = [i for i in self.mine if i not in done]
        self.started = time.perf_counter()
        self.new_tokens, self.work_seconds = 0, 0.0
        if self.todo and len(self.todo) < len(self.mine):
            console.print(f"resuming {writer.directory}: {len(self.mine) - len(self.todo)} of this worker's "
                          f"{len(self.mine)} shards already complete")

    def summary(self, command: str) -> dict:
        manifest = self.writer.manifest()
        return {
            "command": command,
            "store": str(self.writer.directory),
            "format": manifest["format"],
            "worker": self.worker,
            "complete": manifest["complete"],
            "shards": len(manifest["shards"]),
            "shards_written": len(self.todo),
            "rows": manifest["rows"],
            "tokens": manifest["tokens"],
            "seconds": round(time.perf_counter() - self.started, 3),
            "tokens_per_s": round(self.new_tokens / self.work_seconds, 1) if self.new_tokens else None,
        }
