"""A seeded, resumable, endless stream of prompt groups read shard by shard from a store.

A group is every row of one prompt (its samples are written together, in one shard), so
objectives that compare a prompt's samples see them in the same step. Each epoch visits the
shards in a seeded order and passes the groups through a seeded shuffle buffer; the stream is a
pure function of (shards, seed, buffer size), so `skip(n)` puts a fresh stream exactly where an
earlier one stood after n groups.

Groups are held as compact Arrow record batches (copied out of the Parquet batch they came
from, so a buffered group never pins a whole batch); rows become Python objects only for the
step that uses them. Memory is one Parquet batch plus the buffer.

For data parallelism the store's shards are split once into `parts` disjoint parts (balanced by
rows); each part is its own stream and each rank reads only the parts it owns, so no row is read
by two ranks. A step takes batch_size / parts rows from every part, so a run's steps depend on
(seed, parts) and not on how many ranks share the parts: one process owning two parts trains on
exactly the rows two ranks owning one part each would.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lightopd.data.reader import shard_path
from lightopd.errors import InputError

Group = pa.RecordBatch  # the rows of one prompt
READ_BATCH_ROWS = 1024


def _groups_of_shard(path: Path, columns: list[str]) -> Iterator[Group]:
    pending: list[pa.RecordBatch] = []  # the current prompt's rows, possibly across Parquet batches
    with pq.ParquetFile(path) as pf:
        for batch in pf.iter_batches(batch_size=READ_BATCH_ROWS, columns=columns):
            ids = batch.column("prompt_id").to_pylist()
            start = 0
            for i in range(1, len(ids) + 1):
                if i == len(ids) or ids[i] != ids[start]:
                    piece = batch.take(pa.array(range(start, i)))  # a copy: compact, pins nothing
                    if pending and ids[start] != pending[0].column("prompt_id")[0].as_py():
                        yield _concat(pending)
                        pending = []
                    pending.append(piece)
                    start = i
    if pending:
        yield _concat(pending)


def _concat(pieces: list[pa.RecordBatch]) -> Group:
    if len(pieces) == 1:
        return pieces[0]
    return pa.Table.from_batches(pieces).combine_chunks().to_batches()[0]


class GroupStream:
    def __init__(self, directory: str | Path, manifest: dict, shards: list[str], columns: list[str],
                 seed: int | str, buffer_size: int):
        """The groups of `shards` (names listed in `manifest`), each shard verified as it is opened."""
        self.directory = Path(directory)
        self.manifest = manifest
        self.entries = {s["name"]: s for s in manifest["shards"]}
        self.shards = list(shards)
        self.columns = sorted(set(columns) | {"prompt_id"})
        self.seed = seed
        self.buffer_size = buffer_size
        self.consumed = 0  # groups yielded so far: the data cursor saved in checkpoints
        self._iter = self._endless()

    def _epoch(self, epoch: int) -> Iterator[Group]:
        rng = random.Random(f"{self.seed}:{epoch}")
        order = list(self.shards)
        rng.shuffle(order)
        buffer: list[Group] = []
        for name in order:
            path = shard_path(self.directory, self.manifest, self.entries[name])
            for group in _groups_of_shard(path, self.columns):
                buffer.append(group)
                if len(buffer) >= self.buffer_size:
                    i = rng.randrange(len(buffer))
                    buffer[i], buffer[-1] = buffer[-1], buffer[i]
                    yield buffer.pop()
        rng.shuffle(buffer)
        yield from buffer

    def _endless(self) -> Iterator[Group]:
        epoch = 0
        while True:
            yield from self._epoch(epoch)
            epoch += 1

    def __iter__(self) -> GroupStream:
        return self

    def __next__(self) -> Group:
        self.consumed += 1
        return next(self._iter)

    def skip(self, n: int) -> None:
        for _ in range(n):
            next(self)

    def take_rows(self, rows: int) -> list[Group]:
        """Whole groups until at least `rows` rows are taken (one optimizer step)."""
        taken: list[Group] = []
        count = 0
        while count < rows:
            group = next(self)
            taken.append(group)
            count += group.num_rows
        return taken


def split_shards(manifest: dict, parts: int) -> list[list[str]]:
    """The store's shards in `parts` disjoint lists of nearly equal rows (largest shard first to
    the part with the fewest rows; ties by name), a pure function of the manifest."""
    shards = sorted(manifest["shards"], key=lambda s: (-s["rows"], s["name"]))
    split: list[list[str]] = [[] for _ in range(parts)]
    rows = [0] * parts
    for shard in shards:
        i = min(range(parts), key=lambda p: (rows[p], p))
        split[i].append(shard["name"])
        rows[i] += shard["rows"]
    return [sorted(names) for names in split]


def data_parts_for(batch_size: int, requested: int | None, manifest: dict, world_size: int, data: str) -> int:
    """How many disjoint parts the store is read in (default: one per rank), after checking it fits."""
    parts = requested or world_size
    launch = "the world size (torchrun's --nnodes x --nproc-per-node)"
    if parts % world_size:
        raise InputError(f"data_parts {parts} is not a multiple of {launch}, {world_size}: every rank must own "
                         "the same number of parts")
    if batch_size % parts:
        what = f"data_parts {parts}" if requested else launch + f", {world_size}"
        raise InputError(f"--batch-size {batch_size} is not divisible by {what}: each part gives a step "
                         f"batch_size / {parts} rows. Choose a multiple of {parts}")
    if len(manifest["shards"]) < parts:
        raise InputError(f"--data {data}: {len(manifest['shards'])} shard(s) cannot be split into {parts} "
                         "disjoint parts (one or more shards per part); write the store with smaller shards "
                         "(rollout --prompts-per-shard) or train with fewer ranks")
    return parts


class StepStream:
    """The parts of the store one rank owns (part p belongs to rank p % world), each a GroupStream;
    a step is whole groups of at least `rows_per_part` rows from each owned part, in part order."""

    def __init__(self, directory: str | Path, manifest: dict, columns: list[str], seed: int, buffer_size: int,
                 parts: int = 1, rank: int = 0, world: int = 1):
        split = split_shards(manifest, parts)
        self.parts = {p: GroupStream(directory, manifest, split[p], columns,
                                     seed if parts == 1 else f"{seed}:part{p}", buffer_size)
                      for p in range(rank, parts, world)}

    def take_step(self, rows_per_part: int) -> list[Group]:
        return [group for stream in self.parts.values() for group in stream.take_rows(rows_per_part)]

    def cursors(self) -> dict[int, int]:
        """Groups consumed from each owned part: the data cursor saved in checkpoints."""
        return {p: stream.consumed for p, stream in self.parts.items()}

    def skip(self, cursors: dict[int, int]) -> None:
        for p, stream in self.parts.items():
            stream.skip(cursors[p])
