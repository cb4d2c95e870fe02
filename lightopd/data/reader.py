"""Reading a store's shards, each verified against the manifest before any of it is used.

Every reader (train's stream, eval, score-teacher reading rollouts, inspect) goes through
`shard_path`, which checks a listed shard right before it is opened: it exists, has the listed
size, carries this store's id in its Parquet metadata (a shard copied in from another store is
named as such), and hashes to the listed sha256, in one sequential read that leaves the file in
the page cache for the Parquet reader. `read_shard` then checks the shard's layout and every row
it yields (rows.py), and hands out the top-k in descending order whatever the store's layout
(topk_layout.py). `verify` audits a whole store for `inspect --verify`, rows included.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lightopd.data.rows import ShardLayout
from lightopd.data.store import (
    FORMAT_VERSION,
    SHARD_RE,
    STORE_ID_KEY,
    open_store,
    read_manifest,
    sha256_file,
    shard_name,
)
from lightopd.data.topk_layout import restore
from lightopd.errors import InputError

READ_CHUNK = 8 << 20


def shard_id(path: Path) -> str | None:
    """The store id a shard's Parquet metadata names (None if it names none)."""
    metadata = pq.read_metadata(path).metadata or {}
    value = metadata.get(STORE_ID_KEY)
    return None if value is None else value.decode()


def shard_problem(directory: Path, entry: dict, store_id: str | None) -> str | None:
    """What is wrong with a listed shard, or None if it is the one the manifest lists: its size and
    sha256 as listed, and this store's id in its Parquet metadata (a shard copied in from another
    store is called foreign, also when its manifest entry was patched to match it)."""
    path = directory / entry["name"]
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    damage = None
    if size != entry["bytes"]:
        damage = f"corrupt ({size} bytes, manifest says {entry['bytes']})"
    elif sha256_file(path, READ_CHUNK) != entry["sha256"]:
        damage = "corrupt (sha256 differs from the manifest)"
    try:
        owner = shard_id(path)
    except (OSError, pa.ArrowException) as e:
        return damage or "corrupt (unreadable Parquet: " + " ".join(str(e).split()) + ")"
    if owner != store_id:
        return (f"foreign: it belongs to store {owner}, not to this store ({store_id}); a shard copied in "
                "from another store")
    return damage


def shard_path(directory: str | Path, manifest: dict, entry: dict) -> Path:
    """The path of a listed shard, after checking it (see module doc); InputError naming it otherwise."""
    directory = Path(directory)
    problem = shard_problem(directory, entry, manifest["store_id"])
    if problem is not None:
        raise InputError(f"{directory}: shard {entry['name']} is {problem}; `lightopd inspect --verify` lists every "
                         "problem of the store, and re-running the command that wrote it rewrites what is damaged")
    return directory / entry["name"]


def read_shard(directory: str | Path, manifest: dict, entry: dict, columns: list[str] | None = None,
               batch_size: int = 1024, as_stored: bool = False) -> Iterator[pa.RecordBatch]:
    """The record batches of one listed shard, reading only `columns` (None: all): the shard verified
    (shard_path), its layout checked against the manifest and every row against its shape (rows.py).
    `as_stored`: the top-k in the store's own layout, for a stage that writes the rows back as they are."""
    path = shard_path(directory, manifest, entry)
    with pq.ParquetFile(path) as pf:
        yield from _checked_batches(path, pf, manifest, columns, batch_size, as_stored)


def _checked_batches(path: Path, pf: pq.ParquetFile, manifest: dict, columns: list[str] | None,
                     batch_size: int, as_stored: bool = False) -> Iterator[pa.RecordBatch]:
    """`pf`'s batches of `columns` (None: all), its layout and every row checked (rows.py)."""
    layout = ShardLayout(path, pf.schema_arrow, manifest)
    wanted = columns if columns is not None else pf.schema_arrow.names
    read = layout.columns_to_read(wanted, pf.schema_arrow.names)
    first = 0
    for batch in pf.iter_batches(batch_size=batch_size, columns=read):
        layout.check(batch, first)
        first += batch.num_rows
        if layout.by_id and "topk_ids" in read and not as_stored:
            batch = restore(batch, layout.k)
        yield batch if read == list(wanted) else batch.select(wanted)


def iter_batches(
    directory: str | Path,
    columns: list[str] | None = None,
    batch_size: int = 1024,
    manifest: dict | None = None,
) -> Iterator[pa.RecordBatch]:
    """Stream record batches from the listed shards in order, each checked (read_shard), reading only `columns`."""
    directory = Path(directory)
    manifest = manifest if manifest is not None else open_store(directory)
    for entry in manifest["shards"]:
        yield from read_shard(directory, manifest, entry, columns, batch_size)


def _layout_problem(path: Path, manifest: dict, entry: dict) -> str | None:
    """What read_shard would refuse in a shard: a layout or a row the manifest does not describe; and
    completion tokens other than the manifest entry counts."""
    tokens = 0
    try:
        with pq.ParquetFile(path) as pf:
            for batch in _checked_batches(path, pf, manifest, None, 1024):
                tokens += pc.sum(pc.list_value_length(batch.column("completion_ids"))).as_py() or 0
    except InputError as e:
        return "inconsistent with the manifest (" + str(e).removeprefix(f"{path}:").strip() + ")"
    if tokens != entry["tokens"]:
        return f"inconsistent with the manifest ({tokens} completion tokens, the manifest says {entry['tokens']})"
    return None


def verify(directory: str | Path) -> list[str]:
    """Every problem found in the store: missing, partial, unlisted, foreign or corrupt shards."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    problems = []
    listed = {s["name"] for s in manifest["shards"]}
    for entry in manifest["shards"]:
        problem = shard_problem(directory, entry, manifest.get("store_id"))
        if problem is None:
            rows = pq.ParquetFile(directory / entry["name"]).metadata.num_rows
            if rows != entry["rows"]:
                problem = f"corrupt ({rows} rows, manifest says {entry['rows']})"
            elif manifest.get("format_version") == FORMAT_VERSION:
                problem = _layout_problem(directory / entry["name"], manifest, entry)
        if problem is not None:
            problems.append(f"{entry['name']}: {problem}")
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
