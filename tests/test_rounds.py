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
from tests.helpers import last_json, read_rows, run_cli, weights, write_jsonl
from tests.reference import completion_logits, log_softmax64


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
