"""`lightopd rounds` (stages/rounds.py): round 2 samples round 1's student (its provenance, and its
log-probs from a float64 forward of round 1's weights); a run killed with SIGKILL in any stage and
started again ends with the weights of a run never killed; --refresh-when ends rounds early."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from lightopd.data.store import open_store
from lightopd.provenance import model_fingerprint, read_provenance
from tests.helpers import cli, last_json, read_rows, run_cli, weights, write_jsonl
from tests.reference import completion_logits, log_softmax64

pytestmark = pytest.mark.slow  # end-to-end runs of real processes: `make test-fast` leaves them out


@pytest.fixture
def args(consistent_student, teacher_model, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": f"p{i}", "prompt": f"w{i} w{i + 3}", "answer": f"w{i + 1}"}
                                                 for i in range(8)])

    def make(out, *extra):
        return ["rounds", "--student", str(consistent_student), "--teacher", str(teacher_model), "--prompts",
                str(prompts), "--out", str(out), "--rounds", "2", "--steps-per-round", "4", "--n", "2",
                "--max-new-tokens", "8", "--teacher-top-k", "4", "--batch-size", "4", "--lr", "1e-3",
                "--save-every", "1", *extra]
    return make


def test_round_two_samples_round_one_student(args, consistent_student, tmp_path):
    out = tmp_path / "run"
    result = last_json(run_cli(*args(out, "--heldout", str(tmp_path / "p.jsonl"))))
    assert result["rounds"] == 2 and result["steps"] == 8 and result["model"] == str(out / "round-2" / "student")
    first, second = out / "round-1" / "student", out / "round-2" / "student"
    rollouts = open_store(out / "round-2" / "rollouts")
    assert rollouts["model"]["fingerprint"] == model_fingerprint(first)
    assert open_store(out / "round-1" / "rollouts")["model"]["fingerprint"] == model_fingerprint(consistent_student)
    assert read_provenance(second)["parent"]["fingerprint"] == model_fingerprint(first)
    assert read_provenance(first)["parent"]["fingerprint"] == model_fingerprint(consistent_student)
    model = AutoModelForCausalLM.from_pretrained(first, dtype=torch.float64).eval()
    for row in read_rows(out / "round-2" / "rollouts"):  # sampled by round 1's weights, untruncated at T = 1
        lp = log_softmax64(completion_logits(model, row["prompt_ids"], row["completion_ids"]))
        want = lp[np.arange(len(row["completion_ids"])), row["completion_ids"]]
        np.testing.assert_allclose(row["behavior_logprobs"], want, atol=2e-5, rtol=0)
    lines = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [1, 2] and all(line["steps"] == 4 for line in lines)
    assert lines[0]["is_ess"] <= 1 and "heldout_kl" in lines[1] and lines[1]["heldout_accuracy"] is not None


@pytest.mark.parametrize("stage", ["round-1/teacher-store", "round-1/student/checkpoints/step-2",
                                   "round-2/rollouts"])
def test_a_kill_in_any_stage_resumes_to_the_uninterrupted_run(args, tmp_path, stage):
    run_cli(*args(tmp_path / "whole"))
    out = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "lightopd", *args(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (out / stage).exists():
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "round-2" / "student" / "model.safetensors").exists(), "the kill must land before the end"
    result = last_json(run_cli(*args(out)))
    assert result["steps"] == 8
    a, b = weights(tmp_path / "whole" / "round-2" / "student"), weights(out / "round-2" / "student")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for r in (1, 2):  # every step logged exactly once
        steps = [json.loads(x)["step"] for x in (out / f"round-{r}" / "student" / "metrics.jsonl").read_text()
                 .splitlines()]
        assert steps == [1, 2, 3, 4]


def test_refresh_when_ends_rounds_early_within_the_step_budget(args, tmp_path):
    out = tmp_path / "run"
    result = last_json(run_cli(*args(out, "--refresh-when", "is_ess<2")))  # crossed at every step
    lines = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert result["steps"] == 8 and len(lines) == 8 and all(line["steps"] == 1 for line in lines)
    assert [line["ended"] for line in lines[:-1]] == ["refresh_when"] * 7


def test_the_trained_student_is_handed_over_in_memory(args, monkeypatch, capsys, tmp_path):
    """No stage reads a round's student from its directory (train hands it on in memory), and the run
    ends with the weights of a run that reads every student from its directory."""
    from transformers import AutoModelForCausalLM as Auto

    from lightopd.engine import held

    loads, original = [], Auto.from_pretrained.__func__
    monkeypatch.setattr(Auto, "from_pretrained",
                        classmethod(lambda c, path, *a, **k: loads.append(str(path)) or original(c, path, *a, **k)))
    code, out, err = cli(monkeypatch, capsys, *args(tmp_path / "held", "--heldout", str(tmp_path / "p.jsonl")))
    assert code == 0, err
    assert not [p for p in loads if "round-" in p], loads  # round 1's student sampled, scored and trained again
    assert len(loads) == 3  # the student (round 1's sampling, then its training), and the teacher once
    monkeypatch.setattr(held, "take", lambda *a, **k: None)
    code, out, err = cli(monkeypatch, capsys, *args(tmp_path / "read"))
    assert code == 0, err
    assert [p for p in loads[3:] if "round-1" in p], "without the hand-over round 2 reads round 1's student"
    a, b = weights(tmp_path / "held" / "round-2" / "student"), weights(tmp_path / "read" / "round-2" / "student")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_two_ranks_run_the_rounds_of_one_process(args, tmp_path):
    """Under torchrun each rank samples and scores its share of every store (as --worker RANK/2) and
    trains with the other (DDP): the stores hold the rows of one process, and the students its
    weights (up to the order of a float32 sum); rank 0 alone prints the summary."""
    from tests.test_distributed import torchrun

    run_cli(*args(tmp_path / "one", "--heldout", str(tmp_path / "p.jsonl")))
    proc = torchrun(*args(tmp_path / "two", "--heldout", str(tmp_path / "p.jsonl")))
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 1 and last_json(proc)["steps"] == 8
    for r in (1, 2):
        for store in ("rollouts", "teacher-store", "heldout-store"):
            a, b = (read_rows(tmp_path / run / f"round-{r}" / store) for run in ("one", "two"))
            key = lambda row: (row["prompt_id"], row["sample_index"])  # noqa: E731
            assert [key(x) for x in sorted(a, key=key)] == [key(x) for x in sorted(b, key=key)]
            assert sorted(x["completion_ids"] for x in a) == sorted(x["completion_ids"] for x in b)
        assert read_provenance(tmp_path / "two" / f"round-{r}" / "student")["parallel"]["world_size"] == 2
    a, b = weights(tmp_path / "one" / "round-2" / "student"), weights(tmp_path / "two" / "round-2" / "student")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)
    one, two = ([json.loads(x) for x in (tmp_path / run / "rounds.jsonl").read_text().splitlines()]
                for run in ("one", "two"))
    assert [x["sampled_tokens"] for x in one] == [x["sampled_tokens"] for x in two]
