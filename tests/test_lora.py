"""`train --lora-rank`: adapters through peft, the base model's loss at step 1, the adapter or the
merged model as output, exact resume, and 2 ranks equal to one process."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from lightopd.errors import InputError
from tests.helpers import do_train, metrics, run_cli, weights

peft = pytest.importorskip("peft", reason="LoRA needs the optional peft extra: pip install 'lightopd[peft]'")

KW = dict(objective="rkl", batch_size=4, lr=1e-2)


def logits(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor([[5, 9, 12, 7, 3]])).logits


def adapter(directory) -> dict:
    from safetensors.torch import load_file

    return load_file(directory / "adapter_model.safetensors")


def test_adapters_start_at_the_base_models_loss_and_only_they_train(consistent_student, teacher_store, tmp_path):
    do_train(consistent_student, teacher_store, tmp_path / "full", steps=1, **KW)
    do_train(consistent_student, teacher_store, tmp_path / "lora", steps=3, lora_rank=4, **KW)
    # B = 0: the first step's loss is the base model's, to float rounding
    assert metrics(tmp_path / "lora")[0]["loss"] == pytest.approx(metrics(tmp_path / "full")[0]["loss"], rel=1e-6)
    out = tmp_path / "lora"
    assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    record = json.loads((out / "lightopd.json").read_text())
    assert record["lora"] == {"rank": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": "all-linear",
                              "merged": False}
    base = AutoModelForCausalLM.from_pretrained(consistent_student)
    adapted = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(consistent_student), str(out))
    assert not torch.allclose(logits(adapted), logits(base))  # the adapters moved
    trained = {k for k, v in adapted.named_parameters() if "lora_B" in k and v.abs().max() > 0}
    assert trained and all("lm_head" not in k for k in trained)


def test_merge_lora_writes_a_plain_model_equal_to_base_plus_adapter(consistent_student, teacher_store, tmp_path):
    do_train(consistent_student, teacher_store, tmp_path / "adapter", steps=3, lora_rank=4, **KW)
    do_train(consistent_student, teacher_store, tmp_path / "merged", steps=3, lora_rank=4, merge_lora=True, **KW)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")  # plain transformers
    adapted = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(consistent_student),
                                             str(tmp_path / "adapter"))
    torch.testing.assert_close(logits(merged), logits(adapted), atol=1e-5, rtol=1e-5)
    changed = [k for k, v in weights(tmp_path / "merged").items()
               if not torch.equal(v, weights(consistent_student)[k])]
    assert changed and all(k.endswith("proj.weight") for k in changed)  # linear layers only


def test_lora_resume_reproduces_the_uninterrupted_run(consistent_student, teacher_store, tmp_path):
    kw = dict(steps=4, save_every=2, lora_rank=4, **KW)
    do_train(consistent_student, teacher_store, tmp_path / "full", **kw)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-2", tmp_path / "cut" / "checkpoints" / "step-2")
    result, _ = do_train(consistent_student, teacher_store, tmp_path / "cut", resume=True, **kw)
    assert result["resumed_from"] == "step-2"
    a, b = adapter(tmp_path / "full"), adapter(tmp_path / "cut")
    assert a.keys() == b.keys() and all("lora" in k for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_lora_without_peft_is_exit_2(consistent_student, teacher_store, tmp_path, monkeypatch):
    with pytest.raises(InputError, match="--merge-lora: there is no adapter"):
        do_train(consistent_student, teacher_store, tmp_path / "a", steps=1, merge_lora=True, **KW)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    with pytest.raises(InputError, match=r"pip install 'lightopd\[peft\]'"):
        do_train(consistent_student, teacher_store, tmp_path / "b", steps=1, lora_rank=4, **KW)


def test_two_ranks_train_the_adapter_of_one_process(consistent_student, teacher_store, tmp_path):
    from tests.test_distributed import torchrun

    common = ["--student", str(consistent_student), "--data", str(teacher_store), "--objective", "rkl",
              "--steps", "3", "--batch-size", "4", "--lr", "1e-2", "--lora-rank", "4"]
    run_cli("train", *common, "--out", str(tmp_path / "one"))
    proc = torchrun("train", *common, "--out", str(tmp_path / "two"))
    assert proc.returncode == 0, proc.stderr
    a, b = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)


def test_fsdp_trains_the_adapter_of_one_process_resumes_exactly_and_merges(consistent_student, teacher_store,
                                                                             tmp_path):
    """Under --fsdp the base and the adapters are sharded together; checkpoints hold each rank's shards
    of the adapters and their AdamW state only, and the output is gathered: the adapter, or merged."""
    import torch.distributed.checkpoint as dcp

    from tests.test_distributed import torchrun

    common = ["--student", str(consistent_student), "--data", str(teacher_store), "--objective", "rkl",
              "--steps", "4", "--batch-size", "4", "--lr", "1e-2", "--lora-rank", "4", "--save-every", "2"]
    run_cli("train", *common, "--out", str(tmp_path / "one"))
    run_cli("train", *common, "--out", str(tmp_path / "one-merged"), "--merge-lora")
    proc = torchrun("train", *common, "--out", str(tmp_path / "two"), "--fsdp")
    assert proc.returncode == 0, proc.stderr
    assert metrics(tmp_path / "two")[0]["loss"] == pytest.approx(metrics(tmp_path / "one")[0]["loss"], rel=1e-6)
    a, b = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)
    base = AutoModelForCausalLM.from_pretrained(consistent_student)
    peft.PeftModel.from_pretrained(base, str(tmp_path / "two"))  # peft reads it

    kept = tmp_path / "two" / "checkpoints" / "step-2" / "sharded"
    saved = dcp.FileSystemReader(str(kept)).read_metadata().state_dict_metadata
    weights_saved = [k for k in saved if k.startswith("model.")]
    assert weights_saved and all("lora_" in k for k in weights_saved)  # not the frozen base
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "two" / "checkpoints" / "step-2", cut / "checkpoints" / "step-2")
    proc = torchrun("train", *common, "--out", str(cut), "--fsdp", "--resume")
    assert proc.returncode == 0, proc.stderr
    resumed = adapter(cut)
    for key in b:
        assert torch.equal(b[key], resumed[key]), key

    proc = torchrun("train", *common, "--out", str(tmp_path / "two-merged"), "--fsdp", "--merge-lora")
    assert proc.returncode == 0, proc.stderr
    one, two = weights(tmp_path / "one-merged"), weights(tmp_path / "two-merged")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(one[key], two[key], atol=1e-5, rtol=0)
