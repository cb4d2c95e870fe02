"""`train --report-to`: the trackers get what metrics.jsonl gets, read back from what they wrote."""

from __future__ import annotations

import importlib.util
import shutil

import pytest

from lightopd.errors import InputError
from lightopd.training import trackers as T
from tests.helpers import do_train, metrics


def scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_gets_every_step_of_metrics_jsonl(consistent_student, teacher_store, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is an optional extra: pip install 'lightopd[tensorboard]'")
    do_train(consistent_student, teacher_store, tmp_path / "out", steps=3, batch_size=4, report_to="tensorboard")
    logged, lines = scalars(tmp_path / "out" / "tensorboard"), metrics(tmp_path / "out")
    for name in ("loss", "grad_norm", "lr", "tokens", "k1", "top1_agree"):
        assert [step for step, _ in logged[f"train/{name}"]] == [1, 2, 3]
        assert [v for _, v in logged[f"train/{name}"]] == pytest.approx([m[name] for m in lines], rel=1e-6)


def test_a_resumed_run_logs_each_step_once(consistent_student, teacher_store, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is an optional extra: pip install 'lightopd[tensorboard]'")
    kw = dict(steps=4, batch_size=4, save_every=2, report_to="tensorboard")
    do_train(consistent_student, teacher_store, tmp_path / "out", **kw)
    shutil.rmtree(tmp_path / "out" / "checkpoints" / "step-4")  # as if it died after logging step 4 unsaved
    (tmp_path / "out" / "model.safetensors").unlink()
    (tmp_path / "out" / "lightopd.json").unlink()  # written last: a killed run has none
    result, _ = do_train(consistent_student, teacher_store, tmp_path / "out", resume=True, **kw)
    assert result["resumed_from"] == "step-2"
    logged = scalars(tmp_path / "out" / "tensorboard")["train/loss"]
    assert [step for step, _ in logged] == [1, 2, 3, 4]
    assert [v for _, v in logged] == pytest.approx([m["loss"] for m in metrics(tmp_path / "out")], rel=1e-6)


def test_a_missing_tracker_package_is_exit_2_before_training(consistent_student, teacher_store, tmp_path,
                                                             monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(InputError, match=r"--report-to wandb: .*pip install 'lightopd\[wandb\]'"):
        do_train(consistent_student, teacher_store, tmp_path / "out", steps=1, batch_size=4, report_to="wandb")
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_all_means_the_installed_ones(monkeypatch):
    installed = {"tensorboard", "mlflow"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name in installed else None)
    assert T.trackers_of("all") == ("tensorboard", "mlflow")
    assert T.trackers_of("none") == () and T.trackers_of("wandb, tensorboard") == ("wandb", "tensorboard")
