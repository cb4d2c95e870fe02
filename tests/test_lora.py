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


@pytest.mark.slow
def test_lightopd_merge_writes_what_merge_lora_would_and_eval_takes_an_adapter(consistent_student, teacher_store,
                                                                               tmp_path):
    do_train(consistent_student, teacher_store, tmp_path / "adapter", steps=3, lora_rank=4, **KW)
    do_train(consistent_student, teacher_store, tmp_path / "merged", steps=3, lora_rank=4, merge_lora=True, **KW)
    result = json.loads(run_cli("merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "m")).stdout)
    assert result["base"] == str(consistent_student) and (tmp_path / "m" / "config.json").is_file()
    for name, value in weights(tmp_path / "merged").items():  # train --merge-lora's own output, to float rounding
        torch.testing.assert_close(weights(tmp_path / "m")[name], value, atol=1e-6, rtol=1e-6)
    record = json.loads((tmp_path / "m" / "lightopd.json").read_text())
    assert record["lora"]["merged"] is True and record["merged_from"] == str((tmp_path / "adapter").resolve())
    assert record["sft_teacher"] == json.loads((tmp_path / "adapter" / "lightopd.json").read_text())["sft_teacher"]
    again = run_cli("merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "m"), check=False)
    assert again.returncode == 2 and "exists" in again.stderr
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "adapter", moved)
    record = json.loads((moved / "lightopd.json").read_text())
    (moved / "lightopd.json").write_text(json.dumps({**record, "parent": {**record["parent"], "path": "gone"}}))
    (moved / "adapter_config.json").write_text(json.dumps(
        {**json.loads((moved / "adapter_config.json").read_text()), "base_model_name_or_path": "gone"}))
    lost = run_cli("merge", str(moved), "--out", str(tmp_path / "m2"), check=False)
    assert lost.returncode == 2 and "--base" in lost.stderr and "Traceback" not in lost.stderr
    run_cli("merge", str(moved), "--out", str(tmp_path / "m2"), "--base", str(consistent_student))
    other = run_cli("merge", str(moved), "--out", str(tmp_path / "m3"), "--base", str(tmp_path / "merged"), check=False)
    assert other.returncode == 2 and "not the model it was trained on" in other.stderr  # its recorded fingerprint
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"w{i} w{i + 2}", "answer": "w3"}) + "\n"
                               for i in range(4)))
    evals = [json.loads(run_cli("eval", "--model", str(model), "--prompts", str(prompts), "--temperature", "0",
                                "--max-new-tokens", "4", "--data", str(teacher_store), "--limit", "2"
                                ).stdout.splitlines()[-1]) for model in (tmp_path / "adapter", tmp_path / "m")]
    assert evals[0]["accuracy"] == evals[1]["accuracy"] and evals[0]["mean_completion_tokens"] == evals[1][
        "mean_completion_tokens"]
    assert evals[0]["teacher"]["rkl"] == pytest.approx(evals[1]["teacher"]["rkl"], rel=1e-5)  # the same model


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


@pytest.mark.slow
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


@pytest.mark.slow
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


def llama4_student(path):
    """A tiny Llama 4 text model with the store's vocabulary: every layer an MoE block with a router (a Linear
    subclass that returns a tuple), 2 routed experts stored stacked, and a shared expert."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    from lightopd.tiny import default_words, make_tokenizer

    tokenizer = make_tokenizer(default_words(40))
    torch.manual_seed(0)
    config = Llama4TextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=32,
                              intermediate_size_mlp=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=8, num_local_experts=2, num_experts_per_tok=1,
                              interleave_moe_layer_step=1, max_position_embeddings=64, bos_token_id=1,
                              eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    Llama4ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_lora_on_a_llama4_moe_student_leaves_its_routers_out(teacher_store, tmp_path):
    student = llama4_student(tmp_path / "llama4")
    result, _ = do_train(student, teacher_store, tmp_path / "out", steps=1, lora_rank=4, **KW)
    assert result["steps"] == 1 and metrics(tmp_path / "out")[0]["loss"] == pytest.approx(result["final_loss"])
    trained = adapter(tmp_path / "out")
    assert not any("router" in k for k in trained), "a router returns a tuple: no adapter can wrap it"
    assert any("shared_expert.gate_proj" in k for k in trained) and any("self_attn.q_proj" in k for k in trained)
    with pytest.raises(InputError, match=r"--lora-target-modules q_proj,router: model\.layers\.0\.feed_forward\."
                                         r"router is the router of an MoE block \(Llama4Router\)"):
        do_train(student, teacher_store, tmp_path / "named", steps=1, lora_rank=4,
                 lora_target_modules="q_proj,router", **KW)


def tiny_moe(kind: str):
    """A tiny Mixtral or DeepSeek-V3 (stacked routed experts; DeepSeek-V3 with a dense first layer and shared
    experts, whose linear layers are named as transformers 4's experts were)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, MixtralConfig, MixtralForCausalLM

    common = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    if kind == "mixtral":
        return MixtralForCausalLM(MixtralConfig(**common, num_local_experts=2, num_experts_per_tok=1))
    return DeepseekV3ForCausalLM(DeepseekV3Config(
        **common, n_routed_experts=2, num_experts_per_tok=1, moe_intermediate_size=16, first_k_dense_replace=1,
        n_group=1, topk_group=1, kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4,
        v_head_dim=8))


@pytest.mark.parametrize("kind", ["mixtral", "deepseek_v3"])
def test_default_targets_of_moe_models_leave_routers_out_and_peft_notes_stay_quiet(kind, capsys):
    import warnings

    from lightopd.layering import train_settings
    from lightopd.training.lora import adapted_modules, add_adapters

    cfg, _ = train_settings({"student": "s", "data": "d", "out": "o", "lora_rank": 4}, None, [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = add_adapters(tiny_moe(kind), cfg)
    assert not [w for w in caught if "pattern" in str(w.message)], [str(w.message) for w in caught]
    on = {name: type(module).__name__ for name, module, _ in adapted_modules(model.get_base_model())}
    assert not any("Router" in kind_ for kind_ in on.values()) and "model.layers.1.mlp.gate" not in on
    assert "model.layers.1.self_attn.o_proj" in on
    err = capsys.readouterr().err
    if kind == "mixtral":  # its experts are stacked weights, not linear layers: attention alone
        assert all(".self_attn." in name for name in on) and not err
        return
    # peft moved the dense and shared-expert MLP layers' adapters onto the routed experts, and says so through us
    assert "model.layers.0.mlp.gate_proj" not in on and "model.layers.1.mlp.experts" in on
    assert "peft takes 6 of this deepseek_v3 student's linear layers" in err and "rank 8" in err
    gate_up = dict(model.get_base_model().named_modules())["model.layers.1.mlp.experts.base_layer"]
    assert gate_up.lora_A["default"].weight.shape[0] == 2 * 8, "rank 2R for each of the 2 experts: the pattern applied"
