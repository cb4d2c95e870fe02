"""The group stream: whole prompt groups, each once per epoch, seeded, resumable by skipping."""

from __future__ import annotations

import pytest

from lightopd.data import stream as S
from lightopd.data.store import open_store


def names(manifest: dict) -> list[str]:
    return [s["name"] for s in manifest["shards"]]


@pytest.mark.parametrize("read_rows", [3, 1024])  # 3: groups of 2 rows straddle Parquet batches
def test_each_group_whole_and_once_per_epoch(rollout_store, monkeypatch, read_rows):
    monkeypatch.setattr(S, "READ_BATCH_ROWS", read_rows)
    manifest = open_store(rollout_store)
    stream = S.GroupStream(rollout_store, manifest, names(manifest), ["sample_index"], seed=1, buffer_size=3)
    first = [next(stream) for _ in range(10)]
    second = [next(stream) for _ in range(10)]
    for epoch in (first, second):
        ids = [g.column("prompt_id")[0].as_py() for g in epoch]
        assert sorted(ids) == sorted(f"p{i}" for i in range(10))
        for g in epoch:
            assert g.column("sample_index").to_pylist() == [0, 1]
            assert len(set(g.column("prompt_id").to_pylist())) == 1
    assert [g.column("prompt_id")[0].as_py() for g in first] != [g.column("prompt_id")[0].as_py() for g in second]
    assert stream.consumed == 20


def test_seeded_and_resumable(rollout_store):
    manifest = open_store(rollout_store)
    make = lambda seed: S.GroupStream(rollout_store, manifest, names(manifest), [], seed=seed, buffer_size=4)  # noqa: E731
    ids = lambda s, n: [next(s).column("prompt_id")[0].as_py() for _ in range(n)]  # noqa: E731
    full = ids(make(0), 25)
    assert full == ids(make(0), 25)
    assert full != ids(make(1), 25)
    resumed = make(0)
    resumed.skip(13)
    assert ids(resumed, 12) == full[13:]


def test_take_rows_takes_whole_groups(rollout_store):
    manifest = open_store(rollout_store)
    stream = S.GroupStream(rollout_store, manifest, names(manifest), [], seed=0, buffer_size=4)
    step = stream.take_rows(5)
    assert [g.num_rows for g in step] == [2, 2, 2] and stream.consumed == 3
