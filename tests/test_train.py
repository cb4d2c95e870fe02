"""`lightopd train`: every objective runs; accumulation, resume, provenance and the consistency gate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lightopd import objectives as O
from lightopd.errors import InputError, TrainingError
from lightopd.layering import train_settings
from lightopd.provenance import model_fingerprint, read_provenance, write_provenance
from tests.helpers import do_rollout, do_score, metrics, weights, write_jsonl
from tests.helpers import do_train as train_run


@pytest.fixture(scope="module")
def rewarded_store(tiny_model, teacher_model, tmp_path_factory):
    """A teacher store whose rows have graded rewards (a quarter per word): groups of mixed outcomes."""
    tmp = tmp_path_factory.mktemp("rewarded")
    (tmp / "graded.py").write_text("def by_words(completion, reference, metadata):\n"
                                   "    return len(completion.split()) / 4\n")
    words = [f"w{i}" for i in range(40)]
    prompts = write_jsonl(tmp / "p.jsonl", [{"id": f"p{i}", "prompt": " ".join(words[i: i + 3]), "answer": "x"}
                                            for i in range(8)])
    do_rollout(tiny_model, prompts, tmp / "r", n=2, max_new_tokens=10, checker=f"{tmp / 'graded.py'}:by_words")
    do_score(teacher_model, tmp / "r", tmp / "t", top_k=6)
    return tmp / "t"


@pytest.mark.parametrize("name", list(O.OBJECTIVES))
def test_every_objective_trains_and_logs_its_diagnostics(name, consistent_student, teacher_store, rewarded_store,
                                                         tmp_path):
    store = rewarded_store if O.OBJECTIVES[name]().needs().rewards else teacher_store
    result, _ = train_run(consistent_student, store, tmp_path / "out", objective=name, steps=2, batch_size=4,
                          lr=1e-4)
    assert result["steps"] == 2
    lines = metrics(tmp_path / "out")
    assert [m["step"] for m in lines] == [1, 2]
    for m in lines:
        for key in ("loss", "lr", "tokens", "tokens_per_s", "grad_norm", "student_entropy"):
            assert key in m and m[key] == m[key], (key, m)  # present and not NaN
        if name != "sft":
            assert {"k1", "is_ratio_mean", "is_ratio_max", "teacher_topk_mass", "student_topk_mass",
                    "top1_agree"} <= set(m)
        if name == "taid":
            assert 0.4 <= m["taid_t"] <= 1.0
        if name == "opd-seq":
            assert 0 <= m["clip_fraction"] <= 1
    after, before = weights(tmp_path / "out"), weights(consistent_student)
    assert after.keys() == before.keys()
    assert any(not torch.equal(after[k], before[k]) for k in after), "the weights moved"


def test_training_moves_the_loss(consistent_student, rollout_store, tmp_path):
    train_run(consistent_student, rollout_store, tmp_path / "out", objective="sft", steps=25, batch_size=20, lr=3e-3)
    losses = [m["loss"] for m in metrics(tmp_path / "out")]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


def test_gradient_accumulation_equals_one_batch(consistent_student, teacher_store, tmp_path, monkeypatch):
    """The accumulated gradient of many small micro-batches is the gradient of one big batch."""
    captured = []
    clip = torch.nn.utils.clip_grad_norm_

    def capture(parameters, max_norm):
        parameters = list(parameters)
        captured.append([p.grad.clone() for p in parameters])
        return clip(parameters, max_norm)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", capture)
    for name in ("lightning-opd", "opd-seq", "jsd"):
        captured.clear()
        for tag, budget in (("one", 100_000), ("many", 20)):
            train_run(consistent_student, teacher_store, tmp_path / f"{name}-{tag}", objective=name, steps=1,
                      batch_size=8, micro_batch_tokens=budget, lr=1e-3, grad_clip=0.0)
        one, many = captured
        scale = max(float(g.abs().max()) for g in one)
        assert scale > 1e-3, "a real gradient"
        for a, b in zip(one, many, strict=True):  # float32 sums in another order: 1e-5 of the largest entry
            torch.testing.assert_close(a, b, atol=1e-5 * scale, rtol=1e-4)
        loss_one, loss_many = (metrics(tmp_path / f"{name}-{x}")[0]["loss"] for x in ("one", "many"))
        assert loss_one == pytest.approx(loss_many, rel=1e-5)
        a, b = weights(tmp_path / f"{name}-one"), weights(tmp_path / f"{name}-many")
        for key in a:  # Adam's first step divides by |g|, so tiny gradients amplify rounding: 5% of lr
            torch.testing.assert_close(a[key], b[key], atol=5e-5, rtol=0)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_resume_reproduces_the_uninterrupted_run(checkpointing, consistent_student, teacher_store, tmp_path):
    kw = dict(objective="taid", steps=6, batch_size=4, lr=1e-3, save_every=3, schedule="cosine", warmup_steps=2,
              gradient_checkpointing=checkpointing, loss_chunk_tokens=5 if checkpointing else 1024)
    train_run(consistent_student, teacher_store, tmp_path / "full", **kw)
    train_run(consistent_student, teacher_store, tmp_path / "cut", **kw)
    # as if the process died after the step-3 checkpoint: later work is lost
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-6")
    (tmp_path / "cut" / "model.safetensors").unlink()
    (tmp_path / "cut" / "lightopd.json").unlink()  # written last: a killed run has none
    result, _ = train_run(consistent_student, teacher_store, tmp_path / "cut", resume=True, **kw)
    assert result["resumed_from"] == "step-3"
    a, b = weights(tmp_path / "full"), weights(tmp_path / "cut")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [m["loss"] for m in metrics(tmp_path / "full")] == [m["loss"] for m in metrics(tmp_path / "cut")]


def test_output_is_a_plain_transformers_model_with_provenance(consistent_student, teacher_store, teacher_model,
                                                              tmp_path):
    train_run(consistent_student, teacher_store, tmp_path / "out", steps=2, batch_size=4, save_every=1)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.vocab_size == 50
    record = read_provenance(tmp_path / "out")
    assert record["sft_teacher"]["fingerprint"] == model_fingerprint(teacher_model)
    assert record["objective"]["name"] == "lightning-opd" and record["steps"] == 2
    assert record["parent"]["fingerprint"] == model_fingerprint(consistent_student)
    assert record["data"]["format"] == "lightopd.teacher"
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == ["step-1", "step-2"]
    AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "checkpoints" / "step-1")


def test_sft_records_the_writer_and_opd_then_passes_the_gate(tiny_model, teacher_model, rollout_store, tmp_path):
    """SFT on samples written by a model records that model; an OPD run against a store scored by
    that same model then passes the consistency gate with no flag."""
    sft_data = tmp_path / "teacher-samples"
    prompts = Path(json.loads((rollout_store / "manifest.json").read_text())["prompts"]["path"])
    do_rollout(teacher_model, prompts, sft_data, max_new_tokens=8)
    train_run(tiny_model, sft_data, tmp_path / "sft", objective="sft", steps=2, batch_size=4)
    assert read_provenance(tmp_path / "sft")["sft_teacher"]["fingerprint"] == model_fingerprint(teacher_model)
    do_rollout(tmp_path / "sft", prompts, tmp_path / "r", n=2, max_new_tokens=8)
    assert json.loads((tmp_path / "r" / "manifest.json").read_text())["model"]["sft_teacher"]["fingerprint"] == \
        model_fingerprint(teacher_model)
    do_score(teacher_model, tmp_path / "r", tmp_path / "t", top_k=4)
    result, _ = train_run(tmp_path / "sft", tmp_path / "t", tmp_path / "opd", steps=1, batch_size=4)
    assert result["steps"] == 1


def test_teacher_mismatch_is_refused_unless_allowed(tiny_model, teacher_store, tmp_path, capsys):
    other = tmp_path / "student"
    shutil.copytree(tiny_model, other)
    write_provenance(other, {"sft_teacher": {"path": "/elsewhere/other-teacher", "fingerprint": "sha256:other"}})
    with pytest.raises(InputError, match="teacher consistency") as e:
        train_run(other, teacher_store, tmp_path / "a", steps=1, batch_size=4)
    assert "/elsewhere/other-teacher" in str(e.value) and "--allow-teacher-mismatch" in str(e.value)
    assert not (tmp_path / "a").exists()
    train_run(other, teacher_store, tmp_path / "b", steps=1, batch_size=4, allow_teacher_mismatch=True)
    assert "teacher consistency" in capsys.readouterr().err


def test_student_without_record_warns(tiny_model, teacher_store, tmp_path, capsys):
    train_run(tiny_model, teacher_store, tmp_path / "out", steps=1, batch_size=4)
    err = capsys.readouterr().err
    assert "has no recorded SFT teacher" in err


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(consistent_student, teacher_store, tmp_path,
                                                             monkeypatch):
    from lightopd.training.trainer import Trainer

    real, real_step = O.OBJECTIVES["lightning-opd"].loss, Trainer.step
    steps = {"n": 0}

    def counted(self, groups, step=1):
        steps["n"] += 1
        return real_step(self, groups, step)

    def poisoned(self, inputs):  # the loss of step 5 onwards is NaN (it runs again in backward: count steps)
        loss = real(self, inputs)
        return loss * float("nan") if steps["n"] > 4 else loss

    monkeypatch.setattr(Trainer, "step", counted)
    monkeypatch.setattr(O.OBJECTIVES["lightning-opd"], "loss", poisoned)
    with pytest.raises(TrainingError, match="non-finite loss") as e:
        train_run(consistent_student, teacher_store, tmp_path / "out", steps=10, batch_size=4, save_every=2,
                  micro_batch_tokens=100_000)
    assert "step-4" in str(e.value)
    kept = tmp_path / "out" / "checkpoints" / "step-4"
    AutoModelForCausalLM.from_pretrained(kept)
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_set_overrides_and_errors():
    base = {"student": "s", "data": "d", "out": "o"}
    cfg, params = train_settings(base, {"objective": {"name": "jsd", "beta": 0.2}},
                                 [("objective.beta", 0.7), ("lr", 3e-4)])
    assert cfg.objective == "jsd" and params.beta == 0.7 and cfg.lr == 3e-4
    cfg, params = train_settings(base, None, [("objective", "g-opd"), ("objective.lambda", 2)])
    assert params.lambda_ == 2.0
    with pytest.raises(InputError, match="unknown objective.*valid: lightning-opd, opd-is"):
        train_settings({**base, "objective": "nope"}, None, [])
    with pytest.raises(InputError, match="unknown training key 'learning_rate' .valid: .*lr"):
        train_settings(base, {"train": {"learning_rate": 1}}, [])
    with pytest.raises(InputError, match="objective.beta: expected float, got 'high'"):
        train_settings({**base, "objective": "jsd"}, None, [("objective.beta", "high")])
    with pytest.raises(InputError, match="objective.gamma: not a parameter of rkl .valid: .*reward_gate.*support"):
        train_settings({**base, "objective": "rkl"}, None, [("objective.gamma", 1.0)])
    with pytest.raises(InputError, match="steps: expected int, got 'abc'"):
        train_settings(base, None, [("steps", "abc")])
    cfg, _ = train_settings(base, None, [("epochs", 2), ("sft_teacher", "/t")])
    assert cfg.epochs == 2.0 and isinstance(cfg.epochs, float) and cfg.sft_teacher == "/t"
    with pytest.raises(InputError, match="--dtype: float16 training needs loss scaling"):
        train_settings({**base, "dtype": "float16"}, None, [])
    with pytest.raises(InputError, match="--lr: must be > 0"):
        train_settings({**base, "lr": 0.0}, None, [])


def test_keep_checkpoints_keeps_the_newest(consistent_student, teacher_store, tmp_path):
    train_run(consistent_student, teacher_store, tmp_path / "out", steps=4, batch_size=4, save_every=1,
             keep_checkpoints=2)
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == ["step-3", "step-4"]


def test_the_final_model_keeps_the_students_dtype(consistent_student, teacher_store, tmp_path):
    """A bfloat16 student trains in float32 (checkpoints stay float32, to resume exactly) and is
    written back in bfloat16."""
    student = tmp_path / "bf16"
    shutil.copytree(consistent_student, student)
    AutoModelForCausalLM.from_pretrained(consistent_student, dtype=torch.bfloat16).save_pretrained(student)
    train_run(student, teacher_store, tmp_path / "out", steps=2, batch_size=4, save_every=1,
             allow_teacher_mismatch=True)
    final = load_file(tmp_path / "out" / "model.safetensors")
    assert {t.dtype for t in final.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    kept = load_file(tmp_path / "out" / "checkpoints" / "step-2" / "model.safetensors")
    assert {t.dtype for t in kept.values()} == {torch.float32}
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").dtype == torch.bfloat16

