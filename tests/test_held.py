"""engine/held.py: a held model serves a load of its directory only with the directory's exact
weights (same fingerprint, same device, its dtype or a wider one), and only while handing over."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from lightopd.engine import held
from lightopd.engine.models import load_model

CPU = torch.device("cpu")


def _bf16_copy(src, dst):
    shutil.copytree(src, dst)
    weights = {k: v.to(torch.bfloat16) for k, v in load_file(dst / "model.safetensors").items()}
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_a_held_model_serves_its_directory_exactly(tiny_model, tmp_path):
    student = _bf16_copy(tiny_model, tmp_path / "bf16")
    disk = load_model(student, CPU, torch.float32)
    with held.handing_over():
        model = load_model(student, CPU, torch.float32)
        held.hold(student, model, torch.bfloat16)  # as train holds what it wrote
        assert load_model(student, CPU, torch.float16) is not model
        same = load_model(student, CPU, torch.bfloat16)
        assert same is model and next(model.parameters()).dtype == torch.bfloat16
        read = AutoModelForCausalLM.from_pretrained(student, dtype=torch.bfloat16).eval()  # as a load from disk
        buffers = dict(read.named_buffers())
        for name, buffer in same.named_buffers():  # the rotary frequencies (not saved) stay float32
            assert buffer.dtype == buffers[name].dtype and torch.equal(buffer, buffers[name]), name
        ids = torch.tensor([[5, 9, 13, 7, 21, 30, 11, 4]])
        with torch.no_grad():
            assert torch.equal(same(input_ids=ids).logits, read(input_ids=ids).logits)
        wider = load_model(student, CPU, torch.float32, trains=True)  # widened in place, exactly, and taken
        assert wider is model
        for (name, a), b in zip(wider.state_dict().items(), disk.state_dict().values(), strict=True):
            assert a.dtype == torch.float32 and torch.equal(a, b), name
        assert load_model(student, CPU, torch.float32) is not model  # taken: the next load reads the directory
    held.hold(student, model, torch.float32)  # not handing over: nothing is held
    assert load_model(student, CPU, torch.float32) is not model


def test_a_narrower_load_or_a_changed_directory_reads_the_files(tiny_model, tmp_path):
    student = shutil.copytree(tiny_model, tmp_path / "s")
    with held.handing_over():
        model = load_model(student, CPU, torch.float32)
        held.hold(student, model, torch.float32)
        narrow = load_model(student, CPU, torch.bfloat16)  # rounding the held weights would lose them
        assert narrow is not model and next(model.parameters()).dtype == torch.float32
        assert load_model(tiny_model, CPU, torch.float32) is not model  # another directory
        weights = load_file(student / "model.safetensors")
        save_file({k: v + 1 for k, v in weights.items()}, student / "model.safetensors", metadata={"format": "pt"})
        changed = load_model(student, CPU, torch.float32)
        assert changed is not model
        key = next(iter(weights))
        assert torch.equal(changed.state_dict()[key], weights[key] + 1)


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_a_load_asking_for_another_attention_kernel_reads_the_files(tiny_model, tmp_path, kernel):
    with held.handing_over():
        model = load_model(tiny_model, CPU, torch.float32, attn_implementation="sdpa")
        held.hold(tiny_model, model, torch.float32)
        again = load_model(tiny_model, CPU, torch.float32, attn_implementation=kernel)
        assert (again is model) == (kernel == "sdpa")
