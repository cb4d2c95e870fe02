"""A killed rollout resumes to the same store, every row exactly once; a complete store is kept."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lightopd.data.reader import verify
from tests.helpers import do_rollout, last_json, read_rows, run_cli, write_jsonl

pytestmark = pytest.mark.slow  # end-to-end runs of real processes: `make test-fast` leaves them out


def _args(model, prompts, out):
    return ["rollout", "--model", str(model), "--prompts", str(prompts), "--out", str(out),
            "--n", "2", "--max-new-tokens", "48", "--prompts-per-shard", "1", "--generation-batch-size", "2"]


def test_kill_mid_run_then_resume(tiny_model, tmp_path):
    words = " ".join(f"w{i}" for i in range(10))
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": f"q{i}", "prompt": words[: 3 + i % 20]} for i in range(60)])
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "lightopd", *_args(tiny_model, prompts, out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = out / "manifest.json"
    deadline = time.time() + 120
    written = 0
    while time.time() < deadline and proc.poll() is None:
        if manifest.exists():
            written = len(json.loads(manifest.read_text())["shards"])
            if written >= 3:
                break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    state = json.loads(manifest.read_text())
    assert not state["complete"] and 3 <= len(state["shards"]) < 60, "the kill must land mid-run"

    resumed = last_json(run_cli(*_args(tiny_model, prompts, out)))
    assert resumed["complete"] and resumed["shards_written"] == 60 - len(state["shards"])
    assert verify(out) == []

    reference = tmp_path / "uninterrupted"
    do_rollout(tiny_model, prompts, reference, n=2, max_new_tokens=48, prompts_per_shard=1, generation_batch_size=2)
    got, want = read_rows(out), read_rows(reference)
    keys = [(r["prompt_id"], r["sample_index"]) for r in got]
    assert len(keys) == len(set(keys)) == 120
    assert keys == [(r["prompt_id"], r["sample_index"]) for r in want]
    assert [r["completion_ids"] for r in got] == [r["completion_ids"] for r in want]
    assert not list(out.glob(".*.tmp")), "temporary files of the killed run are cleaned up"


def test_complete_store_is_not_redone(tiny_model, prompts_file, tmp_path):
    out = tmp_path / "store"
    do_rollout(tiny_model, prompts_file, out, max_new_tokens=4, prompts_per_shard=4)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    again = do_rollout(tiny_model, prompts_file, out, max_new_tokens=4, prompts_per_shard=4)
    assert again["complete"] and again["shards_written"] == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")} == before


def test_resume_with_other_settings_is_refused(tiny_model, prompts_file, tmp_path):
    out = tmp_path / "store"
    do_rollout(tiny_model, prompts_file, out, max_new_tokens=4, prompts_per_shard=4)
    proc = run_cli("rollout", "--model", str(tiny_model), "--prompts", str(prompts_file), "--out", str(out),
                   "--max-new-tokens", "4", "--prompts-per-shard", "4", "--temperature", "0.5", check=False)
    assert proc.returncode == 2
    assert "different settings" in proc.stderr and "sampling.temperature" in proc.stderr
    assert "Traceback" not in proc.stderr
