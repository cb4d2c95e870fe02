"""`lightopd train` from the command line: kill -9 and resume, a non-finite loss (bad input: test_bad_input.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import cli, last_json, run_cli

pytestmark = pytest.mark.slow  # end-to-end runs of real processes: `make test-fast` leaves them out


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


SLOW_FINAL_SAVE = """
import sys, time
from pathlib import Path
import lightopd.training.checkpoints as checkpoints
from lightopd.cli import main

real, flag = checkpoints.write_provenance, Path(sys.argv[1])

def slow(directory, record):  # the final model's files are written: stop there until killed
    real(directory, record)
    if "checkpoints" not in Path(directory).parts:
        flag.touch()
        time.sleep(300)

checkpoints.write_provenance = slow
sys.argv = ["lightopd", *sys.argv[2:]]
main()
"""


def test_kill_9_while_the_final_model_is_written_leaves_a_run_to_resume(tiny_model, teacher_model, teacher_store,
                                                                        tmp_path):
    """No half model that looks finished: model loading says the run did not finish, and --resume completes it,
    removing the temporaries of the killed run."""
    out = tmp_path / "run"
    args = ["train", "--student", str(tiny_model), "--data", str(teacher_store), "--out", str(out), "--steps", "6",
            "--batch-size", "4", "--save-every", "2", "--lr", "1e-4", "--sft-teacher", str(teacher_model)]
    flag = tmp_path / "in-final-save"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_FINAL_SAVE, str(flag), *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not flag.exists():
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert flag.exists(), "the kill must land inside the final save"
    assert not (out / "lightopd.json").exists() and (out / ".model.tmp").is_dir()
    (out / "checkpoints" / ".step-8.tmp").mkdir()  # as if a checkpoint write had been killed too
    for command in (["eval", "--model", str(out), "--prompts", str(tmp_path / "p.jsonl")],
                    ["rollout", "--model", str(out), "--prompts", str(tmp_path / "p.jsonl"), "--out",
                     str(tmp_path / "r")]):
        (tmp_path / "p.jsonl").write_text('{"prompt": "w1", "answer": "w2"}\n')
        proc = run_cli(*command, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert f"--model {out} is a lightopd train run that did not finish" in proc.stderr
        assert f"--out {out} --resume" in proc.stderr

    result = last_json(run_cli(*args, "--resume"))
    assert result["resumed_from"] == "step-6" and result["steps"] == 6
    assert not list(out.rglob("*.tmp")), "the killed run's temporaries are gone"
    assert json.loads((out / "lightopd.json").read_text())["steps"] == 6
    assert run_cli("eval", "--model", str(out), "--prompts", str(tmp_path / "p.jsonl"), "--max-new-tokens", "2",
                   check=False).returncode == 0


def test_a_file_size_limit_hit_by_a_checkpoint_is_exit_1_and_leaves_no_temporary(tiny_model, teacher_model,
                                                                                 teacher_store, tmp_path):
    """RLIMIT_FSIZE below the checkpoint's model file (89 KB of float32 weights) but above every other file
    the run writes: the step-1 checkpoint write fails with EFBIG (Python ignores SIGXFSZ)."""
    import resource

    limit = 32 << 10
    assert (tiny_model / "model.safetensors").stat().st_size > 2 * limit
    out = tmp_path / "run"
    args = ["train", "--student", str(tiny_model), "--data", str(teacher_store), "--out", str(out), "--steps", "3",
            "--batch-size", "4", "--save-every", "1", "--sft-teacher", str(teacher_model)]
    proc = subprocess.run([sys.executable, "-m", "lightopd", *args], capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "a file-size limit was reached" in errors[0], proc.stderr
    assert (out / "metrics.jsonl").is_file(), "the limit was met by the checkpoint, after step 1"
    assert not list(out.rglob("*.tmp")) and not list((out / "checkpoints").iterdir()), "no temporary is left"

    result = last_json(run_cli(*args, "--resume"))
    assert result["steps"] == 3 and [json.loads(line)["step"] for line in
                                     (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2", "step-3"]
