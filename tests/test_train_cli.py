"""`lightopd train` from the command line: kill -9 and resume, a non-finite loss (bad input: test_bad_input.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from tests.helpers import cli, last_json, run_cli


def test_kill_9_loses_only_steps_since_the_last_checkpoint(tiny_model, teacher_model, teacher_store, tmp_path):
    args = ["train", "--student", str(tiny_model), "--data", str(teacher_store), "--out", str(tmp_path / "run"),
            "--steps", "400", "--batch-size", "4", "--save-every", "10", "--lr", "1e-4",
            "--sft-teacher", str(teacher_model)]
    proc = subprocess.Popen([sys.executable, "-m", "lightopd", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (checkpoints / "step-30").exists():
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "run" / "model.safetensors").exists(), "the kill must land mid-run"
    done = sorted(int(p.name[5:]) for p in checkpoints.glob("step-*"))
    assert done and done[-1] >= 30
    for step in done:  # every checkpoint that exists is whole
        load_file(checkpoints / f"step-{step}" / "model.safetensors")
        torch.load(checkpoints / f"step-{step}" / "trainer_state.pt", weights_only=True)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) >= done[-1]

    result = last_json(run_cli(*args, "--resume"))
    assert result["resumed_from"] == f"step-{done[-1]}" and result["steps"] == 400
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 401)), "each step logged exactly once"


def test_non_finite_loss_exits_1_naming_the_checkpoint(monkeypatch, capsys, tiny_model, teacher_model, teacher_store,
                                                        tmp_path):
    from lightopd.objectives.divergences import ReverseKL

    real = ReverseKL.loss
    calls = {"n": 0}

    def poisoned(self, inputs):
        calls["n"] += 1
        return real(self, inputs) * (float("inf") if calls["n"] > 3 else 1.0)

    monkeypatch.setattr(ReverseKL, "loss", poisoned)
    code, stdout, stderr = cli(monkeypatch, capsys, "train", "--student", str(tiny_model), "--data", str(teacher_store),
                               "--out", str(tmp_path / "out"), "--objective", "rkl", "--steps", "8", "--batch-size",
                               "4", "--save-every", "1", "--micro-batch-tokens", "100000", "--sft-teacher",
                               str(teacher_model))
    assert code == 1 and stdout == "" and "Traceback" not in stderr
    assert "step 4: non-finite loss" in stderr and "checkpoints/step-3" in stderr
