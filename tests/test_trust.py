"""Nothing on disk trusted before it is checked, and no write that can clobber or linger: locks and
temporaries never written through a symbolic link, shards read by the layout they carry and every
row checked against its shape, manifest fields checked, a full disk that leaves nothing behind."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from lightopd.data.lock import exclusive
from lightopd.data.rows import ShardLayout
from lightopd.data.store import (
    LAYOUT_KEY,
    ROLLOUT_FORMAT,
    ROLLOUT_SCHEMA,
    read_manifest,
    shard_layout,
    teacher_schema,
)
from lightopd.data.writer import StoreWriter, _tmp_path
from lightopd.errors import InputError
from tests.helpers import last_json, run_cli

TOKENIZER = {"fingerprint": "sha256:2", "vocab_size": 8, "eos_token_ids": [2]}
SAMPLING = {"n": 1, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 4, "seed": 0}
META = {"model": {"path": "/m", "fingerprint": "sha256:1"}, "tokenizer": TOKENIZER, "sampling": SAMPLING}


def _rollouts(**change) -> pa.Table:
    columns = {"prompt_id": ["a", "b"], "sample_index": [0, 0], "prompt_ids": [[1, 2], [1]],
               "completion_ids": [[3, 4, 2], [5]], "behavior_logprobs": [[-0.5, -0.25, -1.0], [-0.1]],
               "policy_logprobs": [None, None], "finish_reason": ["stop", "length"], "answer": [None, None],
               "metadata": [None, None], "reward": [None, None], "prompt": ["p a", "p b"]}
    return pa.Table.from_pydict({**columns, **change}, schema=ROLLOUT_SCHEMA)


def _teacher_manifest(k: int) -> dict:
    return {"format": "lightopd.teacher", "tokenizer": TOKENIZER, "rollouts": {"sampling": SAMPLING},
            "scoring": {"top_k": k, "temperature": 1.0, "topk_logprobs_dtype": "float16", "unavailable": []}}


def _teacher_rows(k: int, topk_per_row: list[int]) -> pa.Table:
    rollouts = _rollouts()
    lengths = [3, 1]
    extra = {
        "teacher_logprobs": pa.array([[-1.0] * n for n in lengths], pa.list_(pa.float32())),
        "topk_ids": pa.array([[1] * m for m in topk_per_row], pa.list_(pa.int32())),
        "topk_logprobs": pa.array([[-1.0] * m for m in topk_per_row], pa.list_(pa.float16())),
        "teacher_log_tail": pa.array([[-5.0] * n for n in lengths], pa.list_(pa.float32())),
        "teacher_entropy": pa.array([[0.5] * n for n in lengths], pa.list_(pa.float32())),
        "teacher_prompt_ids": pa.nulls(2, pa.list_(pa.int32())),
        "reference_logprobs": pa.nulls(2, pa.list_(pa.float32())),
        "support_ids": pa.nulls(2, pa.list_(pa.int32())),
        "support_logprobs": pa.nulls(2, pa.list_(pa.float16())),
    }
    return pa.Table.from_arrays([*rollouts.columns, *extra.values()], schema=teacher_schema())


# ---- locks and temporaries ----

def test_a_lock_planted_as_a_symlink_is_refused_and_its_target_kept(tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("the user's file")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".lightopd.lock").symlink_to(precious)
    with pytest.raises(InputError, match="is a symbolic link"):
        with exclusive(out, "--out out"):
            pass
    assert precious.read_text() == "the user's file"
    (out / ".lightopd.lock").unlink()
    with exclusive(out, "--out out"):  # without the link, the run goes on
        assert json.loads((out / ".lightopd.lock").read_text())["pid"] == os.getpid()


def test_a_store_lock_planted_as_a_symlink_is_refused(tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep")
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / ".lock").symlink_to(precious)
    with pytest.raises(InputError, match="is a symbolic link"):
        StoreWriter(tmp_path / "s", ROLLOUT_FORMAT, META, num_shards=1)
    assert precious.read_text() == "keep"


def test_a_symlink_at_a_temporary_name_is_replaced_not_followed(tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep")
    writer = StoreWriter(tmp_path / "s", ROLLOUT_FORMAT, META, num_shards=1)
    _tmp_path(tmp_path / "s" / "part-00000.parquet").symlink_to(precious)
    _tmp_path(tmp_path / "s" / "manifest.json").symlink_to(precious)
    writer.write_shard(0, _rollouts(), 4)
    assert precious.read_text() == "keep"
    assert read_manifest(tmp_path / "s")["complete"]
    assert not list((tmp_path / "s").glob(".*.tmp"))


def test_temporaries_of_dead_runs_do_not_outlive_a_later_run(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    store = tmp_path / "s"
    store.mkdir()
    stale = _tmp_path(store / "part-00000.parquet").with_name(
        _tmp_path(store / "part-00000.parquet").name.replace(f".{os.getpid()}.", f".{pid}."))
    stale.write_bytes(b"half a shard")
    StoreWriter(store, ROLLOUT_FORMAT, META, num_shards=1).write_shard(0, _rollouts(), 4)
    assert not stale.exists(), "a new store removes what a dead run of this host left"


# ---- shard layouts and row shapes ----

def test_a_shard_states_its_layout_and_the_manifest_must_agree(tmp_path):
    written = _teacher_manifest(8)
    schema = teacher_schema().with_metadata({LAYOUT_KEY: json.dumps(shard_layout(written)).encode()})
    ShardLayout(Path("s.parquet"), schema, written)
    with pytest.raises(InputError, match=r"s.parquet: it was written with top_k 8 \(the manifest says 4\)"):
        ShardLayout(Path("s.parquet"), schema, _teacher_manifest(4))
    hotter = {**written, "rollouts": {"sampling": {**SAMPLING, "temperature": 2.0}}}
    with pytest.raises(InputError, match=r"written with temperature 1.0 \(the manifest says 2.0\)"):
        ShardLayout(Path("s.parquet"), schema, hotter)


@pytest.mark.parametrize("k, topk_per_row, word", [
    (2, [6, 2], None),
    (2, [6, 1], "row 1, column 'topk_ids', holds 1 values for 1 completion tokens at k = 2, not 2"),
    (3, [6, 2], "row 0, column 'topk_ids', holds 6 values for 3 completion tokens at k = 3, not 9"),
])
def test_every_row_holds_k_top_k_entries_per_completion_token(k, topk_per_row, word):
    table = _teacher_rows(k, topk_per_row)
    layout = ShardLayout(Path("s.parquet"), table.schema, _teacher_manifest(k))
    batch = table.to_batches()[0]
    if word is None:
        layout.check(batch, 0)
    else:
        with pytest.raises(InputError, match=word.replace("(", r"\(")):
            layout.check(batch, 0)


@pytest.mark.parametrize("change, word", [
    ({"behavior_logprobs": [[-0.5, -0.25], [-0.1]]}, "row 0, column 'behavior_logprobs', holds 2 values for 3"),
    ({"behavior_logprobs": [[-0.5, -0.25, -1.0], None]}, "row 1, column 'behavior_logprobs', holds None"),
    ({"prompt_id": ["a", None]}, "row 1, column 'prompt_id', is null"),
    ({"prompt_ids": [[1, 2], []]}, "row 1, column 'prompt_ids', is empty"),
    ({"completion_ids": [[3, 4, 9], [5]]}, "column 'completion_ids', holds token id 9, outside the vocabulary of 8"),
    ({"prompt_ids": [[1, -2], [1]]}, "column 'prompt_ids', holds token id -2"),
])
def test_rows_of_a_shape_their_layout_does_not_allow_are_named(change, word):
    manifest = {"format": ROLLOUT_FORMAT, "tokenizer": TOKENIZER}
    table = _rollouts(**change)
    layout = ShardLayout(Path("s.parquet"), table.schema, manifest)
    with pytest.raises(InputError, match=word.replace("(", r"\(")):
        layout.check(table.to_batches()[0], 0)


def test_a_column_of_another_type_is_refused():
    schema = ROLLOUT_SCHEMA.set(ROLLOUT_SCHEMA.get_field_index("behavior_logprobs"),
                                pa.field("behavior_logprobs", pa.list_(pa.float64())))
    with pytest.raises(InputError, match="column 'behavior_logprobs' is list<item: double>"):
        ShardLayout(Path("s.parquet"), schema, {"format": ROLLOUT_FORMAT, "tokenizer": TOKENIZER})


def test_manifest_k_edits_are_caught_by_inspect_verify_and_train(teacher_store, tmp_path):
    """The reported case: k edited from 6 to 4 in the manifest was 'verified' and trained on."""
    import shutil

    store = tmp_path / "edited"
    shutil.copytree(teacher_store, store)
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["scoring"]["top_k"] = 4
    (store / "manifest.json").write_text(json.dumps(manifest))
    proc = run_cli("inspect", "--verify", str(store), check=False)
    assert proc.returncode == 2 and "inconsistent with the manifest" in proc.stderr, proc.stderr
    assert "top_k 6 (the manifest says 4)" in proc.stderr


# ---- a full disk ----

def _limit(size: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


@pytest.mark.slow
def test_a_full_disk_while_scoring_is_one_line_and_leaves_no_temporary(teacher_model, rollout_store, tmp_path):
    out = tmp_path / "t"
    args = [sys.executable, "-m", "lightopd", "score-teacher", "--teacher", str(teacher_model), "--data",
            str(rollout_store), "--out", str(out), "--top-k", "6"]
    proc = subprocess.run(args, capture_output=True, text=True, preexec_fn=_limit(4500))
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: a file-size limit was reached"), proc.stderr
    assert not [p.name for p in out.glob(".*.tmp")], "the failed write removed its temporary file"
    again = run_cli("score-teacher", "--teacher", str(teacher_model), "--data", str(rollout_store), "--out", str(out),
                    "--top-k", "6")
    assert last_json(again)["complete"]
    assert run_cli("inspect", "--verify", str(out), check=False).returncode == 0


@pytest.mark.slow
def test_eval_out_replaces_a_symlink_and_leaves_its_target(tiny_model, tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "w1", "answer": "w2"}) + "\n")
    (tmp_path / "r.json").symlink_to(precious)
    run_cli("eval", "--model", str(tiny_model), "--prompts", str(prompts), "--max-new-tokens", "2", "--out",
            str(tmp_path / "r.json"))
    assert precious.read_text() == "keep"
    assert not (tmp_path / "r.json").is_symlink() and json.loads((tmp_path / "r.json").read_text())["command"] == "eval"


@pytest.mark.slow
def test_a_checkpoint_that_is_a_symlink_is_skipped_and_only_the_link_removed(tiny_model, teacher_store, tmp_path):
    out = tmp_path / "run"
    common = ["train", "--student", str(tiny_model), "--data", str(teacher_store), "--out", str(out), "--batch-size",
              "4", "--save-every", "1", "--allow-teacher-mismatch"]
    run_cli(*common, "--steps", "2")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep")
    (out / "checkpoints" / "step-99").symlink_to(elsewhere)
    proc = run_cli(*common, "--steps", "3", "--resume")
    assert "checkpoint step-99" in proc.stderr and "resuming from step-2" in " ".join(proc.stderr.split())
    assert not (out / "checkpoints" / "step-99").exists() and (elsewhere / "keep.txt").read_text() == "keep"
