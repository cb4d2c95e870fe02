"""`lightopd rollout`: exact behaviour log-probs, store contents, determinism, context limits."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightopd.data.reader import verify
from lightopd.data.store import ROLLOUT_SCHEMA, open_store, shard_name
from lightopd.tiny import make_model
from tests.helpers import do_rollout, read_rows, run_workers, write_jsonl
from tests.reference import completion_logits, nucleus_logprobs


@pytest.fixture(scope="module")
def gpt2_model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("models") / "gpt2", arch="gpt2", seed=4)


@pytest.mark.parametrize("temperature,top_p,arch", [
    (1.0, 1.0, "llama"), (0.7, 1.0, "llama"), (1.5, 0.8, "llama"), (0.7, 0.9, "gpt2"),
])
def test_behavior_logprobs_match_an_independent_forward(
    tiny_model, gpt2_model, prompts_file, tmp_path, temperature, top_p, arch
):
    """Batches mix prompt lengths (left padding) and drop finished rows; each row must still see
    exactly the logits of an unpadded forward of its own tokens."""
    out = tmp_path / "store"
    tiny_model = gpt2_model if arch == "gpt2" else tiny_model
    result = do_rollout(tiny_model, prompts_file, out, n=3, max_new_tokens=12,
                        temperature=temperature, top_p=top_p, generation_batch_size=9, prompts_per_shard=5)
    assert result["complete"] and result["rows"] == 30
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    rows = read_rows(out)
    checked = 0
    for row in rows:
        logits = completion_logits(model, row["prompt_ids"], row["completion_ids"])
        for t, (y, lp) in enumerate(zip(row["completion_ids"], row["behavior_logprobs"], strict=True)):
            want = nucleus_logprobs(logits[t], temperature, top_p)[y]
            assert np.isfinite(want), "sampled a token outside the stated distribution"
            assert abs(lp - want) < 1e-4, (row["prompt_id"], t, lp, want)
            checked += 1
    assert checked == result["tokens"] > 100


def test_store_rows_are_complete_and_well_formed(tiny_model, prompts_file, tmp_path):
    out = tmp_path / "store"
    do_rollout(tiny_model, prompts_file, out, n=2, max_new_tokens=10, prompts_per_shard=3)
    manifest = open_store(out)
    assert manifest["num_shards"] == 4 and verify(out) == []
    assert pq.ParquetFile(out / "part-00000.parquet").schema_arrow == ROLLOUT_SCHEMA
    rows = read_rows(out)
    records = [json.loads(line) for line in prompts_file.read_text().splitlines()]
    assert [(r["prompt_id"], r["sample_index"]) for r in rows] == [(rec["id"], j) for rec in records for j in range(2)]
    tok = AutoTokenizer.from_pretrained(tiny_model)
    for row, rec in zip(rows, [rec for rec in records for _ in range(2)], strict=True):
        if "prompt" in rec:
            assert row["prompt_ids"] == tok(rec["prompt"])["input_ids"]
        else:
            rendered = tok.apply_chat_template(rec["messages"], add_generation_prompt=True, tokenize=False)
            assert rendered.endswith("assistant : ")
            # the template owns special tokens, so none are added (as transformers does)
            assert row["prompt_ids"] == tok(rendered, add_special_tokens=False)["input_ids"]
        assert row["answer"] == rec["answer"]
        ids = row["completion_ids"]
        assert len(ids) == len(row["behavior_logprobs"]) >= 1
        assert tok.eos_token_id not in ids[:-1], "generation continued past EOS"
        if row["finish_reason"] == "stop":
            assert ids[-1] == tok.eos_token_id
        else:
            assert row["finish_reason"] == "length" and len(ids) == 10
    assert {r["finish_reason"] for r in rows} == {"stop", "length"}, "fixture should exercise both"
    assert manifest["tokens"] == sum(len(r["completion_ids"]) for r in rows)
    assert manifest["model"]["fingerprint"].startswith("sha256:")
    assert manifest["sampling"] == {"n": 2, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
                                    "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                                    "stop": [], "max_new_tokens": 10, "seed": 0, "policy_logprobs": False}


def test_same_seed_same_rollouts_whatever_the_batching(tiny_model, prompts_file, tmp_path):
    kw = dict(n=3, max_new_tokens=12, temperature=1.0)
    do_rollout(tiny_model, prompts_file, tmp_path / "a", generation_batch_size=64, prompts_per_shard=10, **kw)
    do_rollout(tiny_model, prompts_file, tmp_path / "b", generation_batch_size=2, prompts_per_shard=3, **kw)
    do_rollout(tiny_model, prompts_file, tmp_path / "c", generation_batch_size=64, prompts_per_shard=10, seed=1,
               **{k: v for k, v in kw.items()})
    a, b, c = (read_rows(tmp_path / x) for x in "abc")
    assert [r["completion_ids"] for r in a] == [r["completion_ids"] for r in b]
    np.testing.assert_allclose(
        np.concatenate([r["behavior_logprobs"] for r in a]), np.concatenate([r["behavior_logprobs"] for r in b]),
        atol=1e-5,
    )
    assert [r["completion_ids"] for r in a] != [r["completion_ids"] for r in c]
    samples = {}
    for r in a:
        samples.setdefault(r["prompt_id"], []).append(tuple(r["completion_ids"]))
    assert any(len(set(s)) > 1 for s in samples.values()), "samples of one prompt should differ"


def test_greedy_follows_the_argmax(tiny_model, prompts_file, tmp_path):
    out = tmp_path / "greedy"
    do_rollout(tiny_model, prompts_file, out, n=2, max_new_tokens=8, temperature=0.0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    rows = read_rows(out)
    for row in rows:
        logits = completion_logits(model, row["prompt_ids"], row["completion_ids"])
        assert row["completion_ids"] == logits.argmax(-1).tolist()
        assert row["behavior_logprobs"] == [0.0] * len(row["completion_ids"])
    assert rows[0]["completion_ids"] == rows[1]["completion_ids"]


def test_generation_stops_at_the_model_context(tmp_path):
    model = make_model(tmp_path / "short", context=12, seed=3)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "w1 w2 w3"}, {"prompt": "w1 w2 w3 w4 w5 w6 w7 w8"}])
    out = tmp_path / "store"
    do_rollout(model, prompts, out, max_new_tokens=50, temperature=0.0)
    for row in read_rows(out):
        assert len(row["prompt_ids"]) + len(row["completion_ids"]) <= 12
        if row["finish_reason"] == "length":
            assert len(row["prompt_ids"]) + len(row["completion_ids"]) == 12


def test_n_larger_than_batch_size(tiny_model, prompts_file, tmp_path):
    out = tmp_path / "store"
    result = do_rollout(tiny_model, prompts_file, out, n=5, max_new_tokens=4, generation_batch_size=2, limit=3)
    rows = read_rows(out)
    assert result["rows"] == 15
    assert [(r["prompt_id"], r["sample_index"]) for r in rows] == [(p, j) for p in ("p0", "p1", "p2") for j in range(5)]


@pytest.mark.slow
def test_two_concurrent_workers_write_the_rows_of_one_process(tiny_model, prompts_file, tmp_path):
    args = ["rollout", "--model", str(tiny_model), "--prompts", str(prompts_file), "--out", str(tmp_path / "two"),
            "--n", "2", "--max-new-tokens", "8", "--prompts-per-shard", "3"]
    results = run_workers(*args)
    assert sorted(r["shards_written"] for r in results) == [2, 2]  # 10 prompts: shards 0, 2 and 1, 3
    manifest = open_store(tmp_path / "two")
    assert manifest["complete"] and [s["name"] for s in manifest["shards"]] == [shard_name(i) for i in range(4)]
    assert verify(tmp_path / "two") == []
    do_rollout(tiny_model, prompts_file, tmp_path / "one", n=2, max_new_tokens=8, prompts_per_shard=3)
    assert read_rows(tmp_path / "two") == read_rows(tmp_path / "one")


def test_engine_vllm_without_vllm_or_vllm_flags_without_it_are_exit_2(tiny_model, prompts_file, tmp_path, monkeypatch):
    """Before any model is loaded; the store is the transformers loop's, recorded as such."""
    import importlib.util

    from lightopd.errors import InputError

    with pytest.raises(InputError, match="--tensor-parallel-size: only with --engine vllm"):
        do_rollout(tiny_model, prompts_file, tmp_path / "a", tensor_parallel_size=2)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(InputError, match=r"vLLM is not installed; pip install 'lightopd\[vllm\]'"):
        do_rollout(tiny_model, prompts_file, tmp_path / "b", engine="vllm")
    assert not (tmp_path / "b").exists()
    do_rollout(tiny_model, prompts_file, tmp_path / "hf", max_new_tokens=4)
    assert open_store(tmp_path / "hf")["engine"] == {"name": "hf"}
