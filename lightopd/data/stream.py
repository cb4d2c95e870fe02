"""A seeded, resumable, endless stream of prompt groups read shard by shard from a store (or from
several, one seeded order over all their shards).

A group is every row of one prompt (its samples are written together, in one shard), so
objectives that compare a prompt's samples see them in the same step. Each epoch visits the
shards in a seeded order and passes the groups through a seeded shuffle buffer; the stream is a
pure function of (shards, seed, buffer size), so `skip(n)` puts a fresh stream exactly where an
earlier one stood after n groups.

Groups are held as compact Arrow record batches (copied out of the Parquet batch they came
from, so a buffered group never pins a whole batch); rows become Python objects only for the
step that uses them. Memory is one Parquet batch plus the buffer.

For data parallelism every rank runs the same stream over the whole store (reading is cheap next
to training: about 94 bytes per token of a teacher store at k = 32) and a step's groups are
shared out among the ranks by tokens, so each group is trained on by exactly one rank and a
run's steps depend on the seed alone: not on the shard count, and not on the world size. One
process trains on exactly the groups any number of ranks would, and a store of one shard trains
on any number of ranks.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from lightopd.data.reader import read_shard
from lightopd.errors import InputError

Group = pa.RecordBatch  # the rows of one prompt
READ_BATCH_ROWS = 1024


def _groups_of_shard(batches: Iterator[pa.RecordBatch]) -> Iterator[Group]:
    pending: list[pa.RecordBatch] = []  # the current prompt's rows, possibly across Parquet batches
    for batch in batches:
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


def labelled(group: Group, label: str) -> Group:
    """The group with a `teacher` column naming the store it came from."""
    return pa.RecordBatch.from_arrays([*group.columns, pa.array([label] * group.num_rows, pa.string())],
                                      names=[*group.schema.names, "teacher"])


def _concat(pieces: list[pa.RecordBatch]) -> Group:
    if len(pieces) == 1:
        return pieces[0]
    return pa.Table.from_batches(pieces).combine_chunks().to_batches()[0]


class GroupStream:
    def __init__(self, directory: str | Path, manifest: dict, shards: list[str], columns: list[str],
                 seed: int | str, buffer_size: int, label: str | None = None):
        """The groups of `shards` (names listed in `manifest`), each shard verified as it is opened;
        with a `label`, each group gains a `teacher` column holding it."""
        self._parts = [(Path(directory), manifest, label)]
        self.shards = [(0, name) for name in shards]
        self.columns = sorted(set(columns) | {"prompt_id"})
        self.seed = seed
        self.buffer_size = buffer_size
        self.consumed = 0  # groups yielded so far: the data cursor saved in checkpoints
        self._iter = self._endless()

    @classmethod
    def over(cls, stores: list[tuple[str | Path, dict, str | None]], columns: list[str], seed: int | str,
             buffer_size: int) -> GroupStream:
        """The groups of every shard of several stores ((directory, manifest, label) each), one
        seeded order over all their shards; one store reads exactly as the constructor's."""
        stream = cls(stores[0][0], stores[0][1], [], columns, seed, buffer_size)
        stream._parts = [(Path(d), m, label) for d, m, label in stores]
        stream.shards = [(j, s["name"]) for j, (_, m, _) in enumerate(stores) for s in m["shards"]]
        return stream

    def _epoch(self, epoch: int) -> Iterator[Group]:
        rng = random.Random(f"{self.seed}:{epoch}")
        order = list(self.shards)
        rng.shuffle(order)
        buffer: list[Group] = []
        for part, name in order:
            directory, manifest, label = self._parts[part]
            entry = next(s for s in manifest["shards"] if s["name"] == name)
            batches = read_shard(directory, manifest, entry, self.columns, READ_BATCH_ROWS)
            for group in _groups_of_shard(batches):
                buffer.append(group if label is None else labelled(group, label))
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


def group_tokens(group: Group) -> int:
    """Tokens of a group's forward passes: its rows' prompt and completion ids."""
    return sum(int(pc.sum(pc.list_value_length(group.column(name))).as_py() or 0)
               for name in ("prompt_ids", "completion_ids"))


def share(groups: list[Group], rank: int, world: int) -> list[Group]:
    """Rank `rank`'s groups of a step shared out among `world` ranks: largest first, each to the
    rank with the fewest tokens so far (ties to the lower rank), kept in step order. The union
    over ranks is the step, whatever `world`."""
    if world == 1:
        return groups
    tokens = [group_tokens(g) for g in groups]
    load, mine = [0] * world, []
    for i in sorted(range(len(groups)), key=lambda i: (-tokens[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        load[r] += tokens[i]
        if r == rank:
            mine.append(i)
    return [groups[i] for i in sorted(mine)]


def check_batch(batch_size: int, samples: int, world_size: int, rows: int | None = None) -> None:
    """Every rank must get a prompt group in every step (DDP and FSDP synchronise each one), and a
    step holds no more rows than the store (`rows`): more would repeat rows within one step."""
    if rows is not None and batch_size > rows:
        raise InputError(f"--batch-size {batch_size} is more rows than the store holds ({rows}); a step would repeat "
                         f"rows within itself: use --batch-size {rows} or less")
    if batch_size < world_size * samples:
        raise InputError(f"--batch-size {batch_size} is less than one prompt group ({samples} sample(s)) per "
                         f"rank for {world_size} ranks; use --batch-size {world_size * samples} or more")


class StepStream:
    """The stores' stream of groups, the same on every rank; a step is whole groups until it holds
    `batch_size` rows, and each rank keeps its share (see `share`). With `names` (one per store,
    several teacher stores), each row carries its store's name in a `teacher` column."""

    def __init__(self, stores: list[tuple[str | Path, dict]], columns: list[str], seed: int, buffer_size: int,
                 rank: int = 0, world: int = 1, names: tuple[str, ...] = ()):
        labels = list(names) or [None] * len(stores)
        self.stream = GroupStream.over([(d, m, label) for (d, m), label in zip(stores, labels, strict=True)],
                                       sorted({*columns, "prompt_ids", "completion_ids"}), seed, buffer_size)
        self.rank, self.world = rank, world

    def take_step(self, batch_size: int) -> list[Group]:
        return share(self.stream.take_rows(batch_size), self.rank, self.world)

    def cursor(self) -> int:
        """Groups consumed from the stream (the same on every rank): the data cursor of checkpoints."""
        return self.stream.consumed

    def skip(self, groups: int) -> None:
        self.stream.skip(groups)
