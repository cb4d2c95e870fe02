"""The store: atomic shards listed in the manifest, streaming reads, verification of damage."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from lightopd.data.reader import iter_batches, verify
from lightopd.data.store import FORMAT_VERSION, ROLLOUT_FORMAT, ROLLOUT_SCHEMA, open_store
from lightopd.data.writer import StoreWriter
from lightopd.errors import InputError
from tests.helpers import last_json, run_cli


def _table(prompt: str, rows: int) -> pa.Table:
    return pa.Table.from_pydict({
        "prompt_id": [f"{prompt}-{i}" for i in range(rows)], "sample_index": [0] * rows,
        "prompt_ids": [[1, 2]] * rows, "completion_ids": [[3, 4, 2]] * rows,
        "behavior_logprobs": [[-0.5, -0.25, -1.0]] * rows, "policy_logprobs": [None] * rows,
        "finish_reason": ["stop"] * rows,
        "answer": [None] * rows, "metadata": [None] * rows, "reward": [None] * rows, "prompt": ["p"] * rows,
    }, schema=ROLLOUT_SCHEMA)


META = {"model": {"path": "/m", "fingerprint": "sha256:1"},
        "tokenizer": {"fingerprint": "sha256:2", "vocab_size": 8, "eos_token_ids": [2]},
        "sampling": {"n": 1, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 4, "seed": 0}}


@pytest.fixture
def store(tmp_path):
    writer = StoreWriter(tmp_path / "s", ROLLOUT_FORMAT, META, num_shards=3)
    for i in range(3):
        writer.write_shard(i, _table(f"s{i}", 100 + i), tokens=3 * (100 + i))
    return tmp_path / "s"


def test_manifest_lists_every_shard_with_counts(store):
    manifest = open_store(store)
    assert manifest["complete"] and manifest["rows"] == 303 and manifest["tokens"] == 909
    assert [s["name"] for s in manifest["shards"]] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert all(len(s["sha256"]) == 64 and s["bytes"] > 0 for s in manifest["shards"])
    assert verify(store) == []


def test_incomplete_store_is_not_opened_for_reading(tmp_path):
    writer = StoreWriter(tmp_path / "s", ROLLOUT_FORMAT, META, num_shards=2)
    writer.write_shard(1, _table("x", 5), tokens=15)
    with pytest.raises(InputError, match="incomplete .1 of 2 shards"):
        open_store(tmp_path / "s")
    assert verify(tmp_path / "s") == ["store incomplete: 1 of 2 shards not written (part-00000.parquet)"]


def test_streaming_reads_batches_and_projects_columns(store):
    batches = list(iter_batches(store, columns=["prompt_id", "completion_ids"], batch_size=32))
    assert all(b.num_rows <= 32 for b in batches) and len(batches) >= 10
    assert batches[0].schema.names == ["prompt_id", "completion_ids"]
    assert sum(b.num_rows for b in batches) == 303


def test_verify_names_corrupt_missing_and_partial_shards(store):
    data = bytearray((store / "part-00001.parquet").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (store / "part-00001.parquet").write_bytes(bytes(data))
    (store / "part-00002.parquet").unlink()
    (store / "part-00007.parquet").write_bytes(b"half a shard")
    (store / ".part-00003.parquet.otherhost.1.tmp").write_bytes(b"interrupted")
    problems = verify(store)
    assert "part-00001.parquet: corrupt (sha256 differs from the manifest)" in problems
    assert "part-00002.parquet: missing" in problems
    assert any(p.startswith("part-00007.parquet: partial") for p in problems)
    assert any(p.startswith(".part-00003.parquet.otherhost.1.tmp: partial") for p in problems)
    assert len(problems) == 4

    proc = run_cli("inspect", str(store), "--verify", check=False)
    assert proc.returncode == 2
    result = last_json(proc)
    assert result["verified"] is False and len(result["problems"]) == 4
    assert "part-00001.parquet" in proc.stderr and "part-00002.parquet" in proc.stderr


def test_truncated_shard_is_corrupt(store):
    path = store / "part-00000.parquet"
    path.write_bytes(path.read_bytes()[:-10])
    assert verify(store)[0].startswith("part-00000.parquet: corrupt (")


def test_reopening_with_other_settings_is_refused(store):
    other = {**META, "model": {"path": "/elsewhere", "fingerprint": "sha256:2"}}
    with pytest.raises(InputError, match="model.fingerprint: store has 'sha256:1', this run has 'sha256:2'"):
        StoreWriter(store, ROLLOUT_FORMAT, other, num_shards=3)
    moved = {**META, "model": {"path": "/elsewhere", "fingerprint": "sha256:1"}}
    assert StoreWriter(store, ROLLOUT_FORMAT, moved, num_shards=3).completed() == {0, 1, 2}


def test_rewriting_a_shard_lists_it_once(tmp_path):
    writer = StoreWriter(tmp_path / "s", ROLLOUT_FORMAT, META, num_shards=2)
    writer.write_shard(0, _table("a", 4), tokens=12)
    writer.write_shard(0, _table("a", 4), tokens=12)  # a crash between rename and manifest update
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert [s["name"] for s in manifest["shards"]] == ["part-00000.parquet"] and manifest["rows"] == 4


def test_inspect_reports_sizes(store):
    result = last_json(run_cli("inspect", str(store)))
    assert result["rows"] == 303 and result["tokens"] == 909 and result["shards_written"] == 3
    assert result["bytes_per_token"] == pytest.approx(result["bytes"] / 909, abs=0.01)
    assert result["model"]["fingerprint"] == "sha256:1"


def test_a_store_of_an_older_format_is_refused_for_reading_and_writing(store):
    manifest = json.loads((store / "manifest.json").read_text())
    (store / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    with pytest.raises(InputError, match=f"format version 1, and this lightopd reads version {FORMAT_VERSION}"):
        open_store(store)
    with pytest.raises(InputError, match="re-run the command that wrote it"):
        StoreWriter(store, ROLLOUT_FORMAT, META, num_shards=3)
