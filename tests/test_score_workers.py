"""score-teacher: workers, kills and re-runs never lose or duplicate rows (bad input: test_bad_input.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lightopd.data.reader import verify
from lightopd.data.store import open_store
from tests.helpers import do_rollout, do_score, last_json, read_rows, run_cli, run_workers, write_jsonl

pytestmark = pytest.mark.slow  # end-to-end runs of real processes: `make test-fast` leaves them out


def test_two_concurrent_workers_fill_one_store(teacher_model, rollout_store, tmp_path):
    out = tmp_path / "teacher"
    args = ["score-teacher", "--teacher", str(teacher_model), "--data", str(rollout_store), "--out", str(out),
            "--top-k", "4"]
    results = run_workers(*args)
    assert sorted(r["shards_written"] for r in results) == [2, 2]
    manifest = open_store(out)
    assert [s["name"] for s in manifest["shards"]] == [f"part-0000{i}.parquet" for i in range(4)]
    assert verify(out) == []
    single = tmp_path / "single"
    do_score(teacher_model, rollout_store, single, top_k=4)
    assert read_rows(out) == read_rows(single), "splitting the work changes nothing"


def test_killed_worker_resumes_without_loss_or_duplicates(tiny_model, teacher_model, tmp_path):
    words = " ".join(f"w{i}" for i in range(30))
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": f"q{i}", "prompt": words[: 5 + 3 * (i % 25)]}
                                                 for i in range(40)])
    rollouts = tmp_path / "rollouts"
    do_rollout(tiny_model, prompts, rollouts, n=2, max_new_tokens=40, prompts_per_shard=1)
    out = tmp_path / "teacher"
    args = ["score-teacher", "--teacher", str(teacher_model), "--data", str(rollouts), "--out", str(out),
            "--top-k", "4", "--micro-batch-tokens", "16"]
    workers = [subprocess.Popen([sys.executable, "-m", "lightopd", *args, "--worker", f"{i}/2"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(2)]
    manifest = out / "manifest.json"

    def worker0_shards() -> int:
        if not manifest.exists():
            return 0
        return sum(int(s["name"][5:10]) % 2 == 0 for s in json.loads(manifest.read_text())["shards"])

    deadline = time.time() + 120
    while time.time() < deadline and workers[0].poll() is None and worker0_shards() < 3:
        time.sleep(0.005)
    os.kill(workers[0].pid, signal.SIGKILL)
    workers[0].wait()
    assert workers[1].wait(timeout=300) == 0
    before = json.loads(manifest.read_text())
    assert not before["complete"] and 3 <= worker0_shards() < 20, "the kill must land mid-run"

    resumed = last_json(run_cli(*args, "--worker", "0/2"))
    assert resumed["complete"] and resumed["shards_written"] == 40 - len(before["shards"])
    assert verify(out) == [] and not list(out.glob(".*.tmp"))
    rows = read_rows(out)
    keys = [(r["prompt_id"], r["sample_index"]) for r in rows]
    assert len(keys) == len(set(keys)) == 80
    reference = tmp_path / "reference"
    do_score(teacher_model, rollouts, reference, top_k=4, micro_batch_tokens=16)
    assert rows == read_rows(reference)


def test_rerun_with_other_k_is_refused(teacher_model, rollout_store, tmp_path):
    out = tmp_path / "teacher"
    do_score(teacher_model, rollout_store, out, top_k=4)
    proc = run_cli("score-teacher", "--teacher", str(teacher_model), "--data", str(rollout_store),
                   "--out", str(out), "--top-k", "8", check=False)
    assert proc.returncode == 2 and "scoring.top_k: store has 4, this run has 8" in proc.stderr
