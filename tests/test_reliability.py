"""Nothing lost, nothing foreign: one run per output, strict resume, finite weights or nothing,
and failures that leave the output as it was."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from lightopd.data.lock import LOCK, exclusive
from lightopd.provenance import read_provenance
from tests.helpers import Exploit, cli, last_json, metrics, run_cli, weights

pytestmark = pytest.mark.slow  # end-to-end runs of real processes: `make test-fast` leaves them out


def train_args(student, store, out, *extra):
    return ["train", "--student", str(student), "--data", str(store), "--out", str(out), "--batch-size", "4",
            "--lr", "1e-4", *extra]


def test_two_trains_on_one_out_leave_one_run_and_one_model(consistent_student, teacher_store, tmp_path):
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, "-m", "lightopd", *train_args(consistent_student, teacher_store, out,
                                                                            "--steps", "300")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.1)
    second = run_cli(*train_args(consistent_student, teacher_store, out, "--steps", "2"), check=False)
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert second.returncode == 2 and "in use by another lightopd run" in second.stderr
    assert f"pid {first.pid}" in second.stderr, "the message names the run holding --out"
    assert json.loads(stdout.strip().splitlines()[-1])["steps"] == 300
    assert [m["step"] for m in metrics(out)] == list(range(1, 301))
    AutoModelForCausalLM.from_pretrained(out)
    assert not (out / LOCK).exists(), "the lock goes with its run"


def test_the_lock_of_a_killed_run_is_taken_over(monkeypatch, capsys, consistent_student, teacher_store, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK).write_text(json.dumps({"pid": 999999, "host": "gone", "started": "earlier", "command": "train"}))
    code, _, err = cli(monkeypatch, capsys, *train_args(consistent_student, teacher_store, out, "--steps", "1"))
    assert code == 0 and "taking over the lock of a run that ended without releasing it (pid 999999" in err


def test_a_worker_share_of_a_store_is_one_process(tiny_model, prompts_file, tmp_path):
    """While a process holds worker 0/2 of a store, another worker 0/2 stops naming it; 1/2 is free."""
    out = tmp_path / "r"
    args = ["rollout", "--model", str(tiny_model), "--prompts", str(prompts_file), "--out", str(out),
            "--max-new-tokens", "4", "--prompts-per-shard", "1", "--worker"]
    with exclusive(out, "a test", ".worker-0-of-2.lock"):
        second = run_cli(*args, "0/2", check=False)
        assert second.returncode == 2 and "--worker 0/2: in use by another lightopd run" in second.stderr
        assert f"pid {os.getpid()}" in second.stderr
        assert last_json(run_cli(*args, "1/2"))["shards_written"] == 5
    assert last_json(run_cli(*args, "0/2"))["complete"]


@pytest.fixture
def checkpointed(consistent_student, teacher_store, tmp_path):
    """A finished 4-step run with a checkpoint at every step."""
    out = tmp_path / "run"
    run_cli(*train_args(consistent_student, teacher_store, out, "--steps", "4", "--save-every", "1"))
    return out


@pytest.mark.parametrize("change,word", [
    (["--steps", "4", "--lr", "2e-4"], "--lr: 0.0001 in the checkpoint, 0.0002 now"),
    (["--steps", "4", "--seed", "5"], "--seed: 0 in the checkpoint, 5 now"),
    (["--steps", "4", "--objective", "rkl"], "the objective:"),
    (["--steps", "3"], "the checkpoint is at step 4, past the 3 steps asked for"),
])
def test_resume_refuses_settings_that_change_the_result(checkpointed, consistent_student, teacher_store, change,
                                                        word, monkeypatch, capsys):
    base = ["train", "--student", str(consistent_student), "--data", str(teacher_store), "--out", str(checkpointed),
            "--batch-size", "4", "--resume"]
    lr = [] if "--lr" in change else ["--lr", "1e-4"]
    code, _, err = cli(monkeypatch, capsys, *base, *lr, *change)
    assert code == 2 and word in err and "only --steps, --epochs" in err, err
    assert [m["step"] for m in metrics(checkpointed)] == [1, 2, 3, 4], "nothing was touched"


def test_resume_refuses_other_data(checkpointed, consistent_student, teacher_store, tmp_path, monkeypatch, capsys):
    other = tmp_path / "other-store"
    shutil.copytree(teacher_store, other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "created": "another day"}))
    code, _, err = cli(monkeypatch, capsys, *train_args(consistent_student, other, checkpointed, "--steps", "4",
                                                        "--resume"))
    assert code == 2 and "--data (its manifest)" in err


def test_resume_may_raise_steps_and_change_how_often_it_saves(checkpointed, consistent_student, teacher_store,
                                                              monkeypatch, capsys):
    code, out, err = cli(monkeypatch, capsys, *train_args(consistent_student, teacher_store, checkpointed,
                                                          "--steps", "6", "--save-every", "3", "--resume"))
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["resumed_from"] == "step-4"
    assert [m["step"] for m in metrics(checkpointed)] == [1, 2, 3, 4, 5, 6]


def test_resume_drops_a_metrics_line_cut_short_and_refuses_damage_elsewhere(checkpointed, consistent_student,
                                                                           teacher_store, monkeypatch, capsys):
    """As if killed while logging step 5 of a longer run: no final model, the step-4 checkpoint lost."""
    (checkpointed / "lightopd.json").unlink()
    shutil.rmtree(checkpointed / "checkpoints" / "step-4")
    lines = (checkpointed / "metrics.jsonl").read_text().splitlines()
    (checkpointed / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 5, "lo')  # a kill mid-write
    code, _, err = cli(monkeypatch, capsys, *train_args(consistent_student, teacher_store, checkpointed,
                                                        "--steps", "4", "--save-every", "1", "--resume"))
    assert code == 0, err
    assert [m["step"] for m in metrics(checkpointed)] == [1, 2, 3, 4]
    (checkpointed / "lightopd.json").unlink()
    shutil.rmtree(checkpointed / "checkpoints" / "step-4")
    lines = (checkpointed / "metrics.jsonl").read_text().splitlines()
    (checkpointed / "metrics.jsonl").write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    code, _, err = cli(monkeypatch, capsys, *train_args(consistent_student, teacher_store, checkpointed,
                                                        "--steps", "4", "--save-every", "1", "--resume"))
    assert code == 2 and "metrics.jsonl line 2: not a metrics record" in err


def test_an_update_that_makes_weights_non_finite_stops_and_keeps_the_last_good_checkpoint(
        consistent_student, teacher_store, tmp_path, monkeypatch, capsys):
    """An optimizer step that writes a NaN into the weights at step 3 (finite loss and gradients)."""
    real, calls = torch.optim.AdamW.step, {"n": 0}

    def step(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    out = tmp_path / "out"
    code, _, err = cli(monkeypatch, capsys, *train_args(consistent_student, teacher_store, out, "--steps", "5",
                                                        "--save-every", "1"))
    assert code == 1 and "step 3: the update made a weight non-finite" in err and "step-2" in err, err
    assert not (out / "model.safetensors").exists(), "no non-finite model is ever written"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]
    for checkpoint in (out / "checkpoints").glob("step-*"):
        assert all(bool(t.isfinite().all()) for t in weights(checkpoint).values()), checkpoint


def test_a_failure_before_the_first_step_leaves_out_as_it_was(consistent_student, teacher_store, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(teacher_store, damaged)
    os.remove(damaged / "part-00000.parquet")
    out = tmp_path / "out"
    proc = run_cli(*train_args(consistent_student, damaged, out, "--steps", "2"), check=False)
    assert proc.returncode == 2 and "missing" in proc.stderr
    assert not out.exists(), "a rerun after fixing the data is not refused as 'already holds files'"


def _pickled_exploit(checkpoint):
    torch.save({"step": 4, "payload": Exploit(checkpoint.parent.parent / "ran")}, checkpoint / "trainer_state.pt")


def _truncated_state(checkpoint):
    data = (checkpoint / "trainer_state.pt").read_bytes()
    (checkpoint / "trainer_state.pt").write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage,why", [
    (_pickled_exploit, "is not a lightopd checkpoint (its trainer_state.pt holds Python objects other than tensors"),
    (_truncated_state, "is not a lightopd checkpoint (its trainer_state.pt cannot be read: "),
    (lambda c: (c / "model.safetensors").unlink(), "is damaged (it holds no *.safetensors weights)"),
    (lambda c: (c / "lightopd.json").unlink(), "is damaged (its lightopd.json is missing)"),
])
def test_resume_falls_back_past_a_damaged_newest_checkpoint(damage, why, checkpointed, consistent_student,
                                                            teacher_store, monkeypatch, capsys):
    """The finished 4-step run goes on to 5 steps from step-3, since step-4 cannot be trusted; nothing in the
    damaged trainer state runs."""
    damage(checkpointed / "checkpoints" / "step-4")
    code, out, err = cli(monkeypatch, capsys, *train_args(consistent_student, teacher_store, checkpointed,
                                                          "--steps", "5", "--save-every", "1", "--resume"))
    assert code == 0, err
    assert f"warning: --resume: checkpoint step-4 {why}" in err and "resuming from step-3 instead" in err, err
    assert json.loads(out.strip().splitlines()[-1])["resumed_from"] == "step-3"
    assert [m["step"] for m in metrics(checkpointed)] == [1, 2, 3, 4, 5]
    assert not (checkpointed / "ran").exists(), "the pickled command did not run"
    weights(checkpointed / "checkpoints" / "step-4")  # written again, whole
    assert read_provenance(checkpointed)["steps"] == 5


def test_a_pickle_in_the_only_checkpoint_is_exit_2_and_runs_nothing(consistent_student, teacher_store, tmp_path,
                                                                     monkeypatch, capsys):
    out = tmp_path / "run"
    code, _, err = cli(monkeypatch, capsys, *train_args(consistent_student, teacher_store, out, "--steps", "2",
                                                        "--save-every", "2"))
    assert code == 0, err
    (out / "lightopd.json").unlink()  # as if killed before its final model
    torch.save({"step": 2, "payload": Exploit(tmp_path / "ran")}, out / "checkpoints" / "step-2" / "trainer_state.pt")
    code, stdout, err = cli(monkeypatch, capsys, *train_args(consistent_student, teacher_store, out, "--steps", "2",
                                                             "--save-every", "2", "--resume"))
    assert code == 2 and stdout == "" and "Traceback" not in err
    assert "error: --resume: checkpoint step-2 is not a lightopd checkpoint (its trainer_state.pt holds" in err
    assert "unsupported GLOBAL posix.system" in err and not (tmp_path / "ran").exists()
    assert (out / "checkpoints" / "step-2").is_dir(), "a checkpoint that cannot be resumed is kept when none can"
