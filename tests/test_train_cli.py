"""`lightopd train` from the command line: bad input exits 2 with one clear line; kill -9 and resume."""

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

from lightopd.data.store import ROLLOUT_FORMAT
from lightopd.data.writer import StoreWriter
from lightopd.tiny import default_words, make_model
from tests.helpers import cli, last_json, run_cli


@pytest.fixture
def train_bad(monkeypatch, capsys, tiny_model, teacher_store, tmp_path):
    def run(*extra: str, student=tiny_model, data=teacher_store) -> str:
        out = tmp_path / "out"
        code, stdout, stderr = cli(monkeypatch, capsys, "train", "--student", str(student), "--data", str(data),
                                   "--out", str(out), "--steps", "1", *extra)
        assert code == 2, stderr
        assert "Traceback" not in stderr and stdout == "" and stderr.startswith("error: ")
        assert not (out / "model.safetensors").exists()
        return stderr

    return run


def test_rollout_store_for_an_opd_objective(train_bad, rollout_store):
    err = train_bad(data=rollout_store)
    assert "a rollout store has no teacher columns" in err and "run `lightopd score-teacher` on it first" in err


def test_student_with_another_vocabulary(train_bad, tmp_path):
    other = make_model(tmp_path / "other", default_words(41))
    assert "its vocabulary (sha256:" in train_bad(student=other)


def test_unknown_objective_lists_the_valid_ones(train_bad):
    err = train_bad("--objective", "kd")
    assert "unknown objective" in err and "lightning-opd" in err and "taid" in err


def test_bad_set_and_recipe(train_bad, tmp_path):
    assert "objective.beta: expected float, got 'x'" in train_bad("--objective", "jsd", "--set", "objective.beta=x")
    recipe = tmp_path / "r.toml"
    recipe.write_text("[train]\nlearnig_rate = 1e-5\n")
    assert "unknown training key 'learnig_rate'" in train_bad("--recipe", str(recipe))
    recipe.write_text("[train\n")
    assert "not valid TOML" in train_bad("--recipe", str(recipe))


def test_lr_must_be_positive(train_bad):
    assert "--lr: must be > 0" in train_bad("--lr", "0")


def test_empty_store(train_bad, tiny_model, rollout_store, tmp_path):
    manifest = json.loads((rollout_store / "manifest.json").read_text())
    meta = {k: manifest[k] for k in ("model", "tokenizer", "sampling", "prompts", "prompts_per_shard")}
    empty = tmp_path / "empty"
    StoreWriter(empty, ROLLOUT_FORMAT, meta, num_shards=0)
    state = json.loads((empty / "manifest.json").read_text())
    (empty / "manifest.json").write_text(json.dumps({**state, "complete": True}))
    assert "the store holds no rows" in train_bad("--objective", "sft", data=empty)


def test_out_with_a_previous_run_needs_resume(train_bad, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "metrics.jsonl").write_text("")
    assert "pass --resume" in train_bad("--objective", "sft")


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
