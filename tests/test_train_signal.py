"""`train` on stores sampled the way users sample: step-1 ratios are exactly 1 whatever the
temperature, top-p, top-k and min-p, the SFT loss is the HF `labels=` loss, padded vocabularies of different
sizes work together, and the store is checked against what each objective assumes."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from lightopd.provenance import model_fingerprint, read_provenance, write_provenance
from lightopd.tiny import make_model
from tests.helpers import cli, do_rollout, do_score, do_train, metrics, read_rows, weights, write_jsonl
from tests.reference import completion_logits, log_softmax64, sampler_logprobs


@pytest.fixture(scope="module")
def broad_model(tmp_path_factory):
    """A student whose next-token distributions are broad, so a top-p nucleus cuts many tokens."""
    return make_model(tmp_path_factory.mktemp("models") / "broad", seed=3, logit_scale=4.0)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    words = [f"w{i}" for i in range(40)]
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "p.jsonl",
                       [{"id": f"p{i}", "prompt": " ".join(words[i: i + 3 + i % 4])} for i in range(8)])


def scored_store(tmp_path, student, teacher, prompts, **sampling):
    do_rollout(student, prompts, tmp_path / "r", n=2, max_new_tokens=10, prompts_per_shard=4, **sampling)
    do_score(teacher, tmp_path / "r", tmp_path / "t", top_k=5)
    return tmp_path / "r", tmp_path / "t"


SAMPLERS = [dict(temperature=1.0), dict(temperature=0.6), dict(temperature=1.0, top_p=0.95),
            dict(temperature=0.6, top_p=0.95), dict(temperature=0.6, top_k=20), dict(temperature=0.6, min_p=0.1),
            dict(temperature=0.6, top_p=0.95, top_k=20)]


def sampler_id(settings: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in settings.items())


@pytest.mark.parametrize("sampling", SAMPLERS, ids=sampler_id)
def test_step_one_ratios_are_one_under_any_sampler(broad_model, teacher_model, prompts, tmp_path, sampling):
    rollouts, store = scored_store(tmp_path, broad_model, teacher_model, prompts, **sampling)
    for name in ("opd-is", "opd-seq"):
        do_train(broad_model, store, tmp_path / name, objective=name, steps=1, batch_size=16, lr=1e-3)
        first = metrics(tmp_path / name)[0]
        assert first["is_ratio_mean"] == pytest.approx(1.0, abs=1e-5), name
        assert first["is_ratio_max"] == pytest.approx(1.0, abs=1e-4), name
    # what makes it 1: the stored ℓold is the float64 model's untruncated log-prob at T; the behaviour
    # log-probs (ℓμ) are not, wherever the sampler truncated
    temperature, truncates = sampling["temperature"], len(sampling) > 1
    model = AutoModelForCausalLM.from_pretrained(broad_model, dtype=torch.float64).eval()
    naive = []
    for row in read_rows(rollouts):
        lq = log_softmax64(completion_logits(model, row["prompt_ids"], row["completion_ids"]) / temperature)
        lq_y = lq[np.arange(len(row["completion_ids"])), row["completion_ids"]]
        # stored only where they can differ from ℓμ: an untruncated sampler's ℓμ is ℓold
        assert (row["policy_logprobs"] is None) == (not truncates)
        np.testing.assert_allclose(row["policy_logprobs"] or row["behavior_logprobs"], lq_y, atol=1e-4)
        naive += list(np.exp(lq_y - np.array(row["behavior_logprobs"])))
    assert (abs(np.mean(naive) - 1.0) > 1e-3) == truncates
    if temperature != 1.0:
        do_train(broad_model, store, tmp_path / "tau1", [("objective.temperature", 1.0)], objective="opd-is",
                 steps=1, batch_size=16, lr=1e-3)
        assert abs(metrics(tmp_path / "tau1")[0]["is_ratio_mean"] - 1.0) > 1e-3
    if truncates:  # behavior=sampler: ratios against the truncated distribution, the kept mass at step 1
        do_train(broad_model, store, tmp_path / "sampler", [("objective.behavior", "sampler")], objective="opd-is",
                 steps=1, batch_size=16, lr=1e-3)
        first = metrics(tmp_path / "sampler")[0]
        assert first["sampler_kept_mass"] < 0.999
        assert first["is_ratio_mean"] == pytest.approx(1.0, abs=1e-5), "is_ratio is always against ℓold"


@pytest.mark.parametrize("sampling", SAMPLERS[3:], ids=sampler_id)
def test_rollout_samples_the_stated_distribution(broad_model, prompts, tmp_path, sampling):
    rollouts = tmp_path / "r"
    do_rollout(broad_model, prompts, rollouts, n=2, max_new_tokens=10, prompts_per_shard=4, **sampling)
    model = AutoModelForCausalLM.from_pretrained(broad_model, dtype=torch.float32).eval()
    args = (sampling["temperature"], sampling.get("top_p", 1.0), sampling.get("top_k", 0), sampling.get("min_p", 0.0))
    cut = 0
    for row in read_rows(rollouts):
        logits = completion_logits(model, row["prompt_ids"], row["completion_ids"])
        for t, (y, lp) in enumerate(zip(row["completion_ids"], row["behavior_logprobs"], strict=True)):
            want = sampler_logprobs(logits[t], *args)
            assert lp == pytest.approx(want[y], abs=1e-4)
            cut += int(np.isinf(want).sum())
    assert cut > 100, "the sampler removed tokens: the truncation is exercised"


@pytest.mark.parametrize("sampled_at, tau", [(1.0, None), (0.6, None), (0.6, 0.6)])
def test_sft_step_loss_is_the_hf_labels_loss(sampled_at, tau, tiny_model, rollout_store, prompts_file, tmp_path):
    """sft learns samples as they are: τ = 1 whatever T drew the store (the HF `labels=` loss), unless
    objective.temperature asks for a tempered one (the same loss of logits / τ)."""
    store = rollout_store
    if sampled_at != 1.0:
        store = tmp_path / "cool"
        do_rollout(tiny_model, prompts_file, store, n=2, max_new_tokens=12, temperature=sampled_at, top_p=0.95)
    sets = [] if tau is None else [("objective.temperature", tau)]
    do_train(tiny_model, store, tmp_path / "sft", sets, objective="sft", steps=1, batch_size=20, lr=1e-3)
    rows = read_rows(store)
    assert len(rows) == 20, "one step holds the whole store"
    width = max(len(r["prompt_ids"]) + len(r["completion_ids"]) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        p, c = r["prompt_ids"], r["completion_ids"]
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        labels[i, len(p): len(p) + len(c)] = torch.tensor(c)
        mask[i, : len(p) + len(c)] = 1
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():
        if tau is None:
            want = model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
        else:
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].double() / tau
            want = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                                     ignore_index=-100).item()
    assert metrics(tmp_path / "sft")[0]["loss"] == pytest.approx(want, rel=1e-5)
    assert read_provenance(tmp_path / "sft")["objective"]["params"]["temperature"] == (tau or 1.0)


def padded_model(path, rows: int, seed: int, hidden: int):
    """A tiny model with `rows` output rows for a 50-id tokenizer, its padded rows made attractive."""
    make_model(path, seed=seed, hidden=hidden, logit_scale=3.0, vocab_rows=rows)
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.get_output_embeddings().weight[50:] *= 40
    model.save_pretrained(path)
    return path


def test_padded_vocabularies_of_different_sizes_work_together(prompts, tmp_path):
    student = padded_model(tmp_path / "student", 64, seed=1, hidden=32)
    teacher = padded_model(tmp_path / "teacher", 72, seed=2, hidden=48)
    rollouts, store = scored_store(tmp_path, student, teacher, prompts, temperature=1.0)
    s_model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float64).eval()
    t_model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float64).eval()
    padded_would_win = 0
    rows = read_rows(store)
    for row in rows:
        assert max(row["completion_ids"]) < 50 and max(row["topk_ids"]) < 50
        s = completion_logits(s_model, row["prompt_ids"], row["completion_ids"])
        t = completion_logits(t_model, row["prompt_ids"], row["completion_ids"])
        padded_would_win += int((t.argmax(-1) >= 50).sum() + (s.argmax(-1) >= 50).sum())
        y = np.array(row["completion_ids"])
        np.testing.assert_allclose(row["behavior_logprobs"], log_softmax64(s[:, :50])[np.arange(len(y)), y],
                                   atol=1e-4)
        np.testing.assert_allclose(row["teacher_logprobs"], log_softmax64(t[:, :50])[np.arange(len(y)), y],
                                   atol=1e-4)
    assert padded_would_win > 0, "unmasked, the padded rows would have taken the argmax"
    do_train(student, store, tmp_path / "out", objective="rkl", steps=1, batch_size=16, lr=1e-3,
             allow_teacher_mismatch=True)
    total, tokens = 0.0, 0
    for row in rows:  # the tail-bucket reverse KL over the tokenizer's 50 ids, in float64
        q = log_softmax64(completion_logits(s_model, row["prompt_ids"], row["completion_ids"])[:, :50])
        p = log_softmax64(completion_logits(t_model, row["prompt_ids"], row["completion_ids"])[:, :50])
        ids = np.array(row["topk_ids"]).reshape(-1, 5)
        for t in range(len(ids)):
            rest = np.setdiff1d(np.arange(50), ids[t])
            qh = np.append(q[t, ids[t]], np.log(np.exp(q[t, rest]).sum()))
            ph = np.append(p[t, ids[t]], np.log(np.exp(p[t, rest]).sum()))
            total += (np.exp(qh) * (qh - ph)).sum()
        tokens += len(ids)
    assert metrics(tmp_path / "out")[0]["loss"] == pytest.approx(total / tokens, rel=1e-3)


def test_greedy_store_refused_where_behaviour_probabilities_are_read(monkeypatch, capsys, tiny_model, teacher_model,
                                                                    prompts, tmp_path):
    _, store = scored_store(tmp_path, tiny_model, teacher_model, prompts, temperature=0.0)
    base = ["train", "--student", str(tiny_model), "--data", str(store), "--steps", "1", "--batch-size", "4",
            "--allow-teacher-mismatch"]
    code, _, err = cli(monkeypatch, capsys, *base, "--out", str(tmp_path / "a"), "--objective", "opd-is")
    assert code == 2 and "greedy" in err and "--objective opd-is" in err
    code, _, err = cli(monkeypatch, capsys, *base, "--out", str(tmp_path / "b"), "--objective", "lightning-opd")
    assert code == 0
    first = metrics(tmp_path / "b")[0]  # the drift is from the rollout model's softmax at τ = 1, not from a point mass
    assert first["is_ratio_mean"] == pytest.approx(1.0, abs=1e-5) and first["sampler_single_token"] == 1.0


def test_off_policy_rollouts_warn_unless_allowed(monkeypatch, capsys, tiny_model, teacher_store, tmp_path):
    other = make_model(tmp_path / "other", seed=11)
    base = ["train", "--data", str(teacher_store), "--steps", "1", "--batch-size", "4", "--allow-teacher-mismatch"]
    code, _, err = cli(monkeypatch, capsys, *base, "--student", str(other), "--out", str(tmp_path / "a"))
    assert code == 0 and "off-policy" in err and model_fingerprint(other) in err
    code, _, err = cli(monkeypatch, capsys, *base, "--student", str(other), "--out", str(tmp_path / "b"),
                       "--allow-off-policy")
    assert code == 0 and "off-policy" not in err
    code, _, err = cli(monkeypatch, capsys, *base, "--student", str(tiny_model), "--out", str(tmp_path / "c"))
    assert code == 0 and "off-policy" not in err, "the student's own rollouts"
    child = tmp_path / "child"  # a model trained from the rollout model counts as the student's own
    shutil.copytree(other, child)
    write_provenance(child, {"parent": {"fingerprint": model_fingerprint(tiny_model)}})
    code, _, err = cli(monkeypatch, capsys, *base, "--student", str(child), "--out", str(tmp_path / "d"))
    assert code == 0 and "off-policy" not in err
    code, _, err = cli(monkeypatch, capsys, *base, "--student", str(other), "--out", str(tmp_path / "e"),
                       "--objective", "rkl")
    assert code == 0 and "off-policy" not in err, "a divergence on the top-k assumes nothing of who sampled"


def test_dropout_is_off_in_the_training_forward_unless_kept(prompts, teacher_model, tmp_path):
    student = make_model(tmp_path / "gpt2", arch="gpt2", seed=2, logit_scale=4.0)  # GPT-2's dropout is 0.1
    assert AutoModelForCausalLM.from_pretrained(student).config.resid_pdrop > 0
    _, store = scored_store(tmp_path, student, teacher_model, prompts)
    do_train(student, store, tmp_path / "off", objective="opd-is", steps=1, batch_size=16, allow_teacher_mismatch=True)
    do_train(student, store, tmp_path / "on", objective="opd-is", steps=1, batch_size=16, allow_teacher_mismatch=True,
             dropout=True)
    assert metrics(tmp_path / "off")[0]["is_ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert abs(metrics(tmp_path / "on")[0]["is_ratio_mean"] - 1.0) > 1e-3


def test_base_and_chat_tokenizers_of_one_vocabulary_train_together(monkeypatch, capsys, tiny_model, rollout_store,
                                                                   tmp_path):
    chat = tmp_path / "chat"
    shutil.copytree(tiny_model, chat)
    tokenizer = AutoTokenizer.from_pretrained(chat)
    tokenizer.eos_token = "w39"
    tokenizer.save_pretrained(chat)
    GenerationConfig(eos_token_id=tokenizer.eos_token_id).save_pretrained(chat)
    code, _, err = cli(monkeypatch, capsys, "train", "--student", str(chat), "--data", str(rollout_store), "--out",
                       str(tmp_path / "out"), "--objective", "sft", "--steps", "1", "--batch-size", "4")
    assert code == 0 and "other end tokens" in err and "[2]" in err


def test_opd_seq_reports_its_clip_fraction(tiny_model, teacher_store, tmp_path):
    do_train(tiny_model, teacher_store, tmp_path / "rollout", objective="opd-seq", steps=4, batch_size=8, lr=3e-2,
             allow_teacher_mismatch=True)
    fractions = [m["clip_fraction"] for m in metrics(tmp_path / "rollout")]
    assert fractions[0] == 0.0 and max(fractions) > 0, "no clipping before the first update, some after"
    do_train(tiny_model, teacher_store, tmp_path / "current", [("objective.anchor", "current")], objective="opd-seq",
             steps=4, batch_size=8, lr=3e-2, allow_teacher_mismatch=True)
    assert all(m["clip_fraction"] == 0.0 for m in metrics(tmp_path / "current"))
    assert weights(tmp_path / "current")["lm_head.weight"].ne(weights(tiny_model)["lm_head.weight"]).any()


def as_older_release(store) -> None:
    """Rewrite a teacher store as lightopd wrote it before rows carried policy_logprobs: no such
    column, and neither the shards' layout nor the manifest's sampling record the newer settings."""
    manifest = json.loads((store / "manifest.json").read_text())
    sampling = manifest["rollouts"]["sampling"]
    for key in ("top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "stop",
                "policy_logprobs"):
        sampling.pop(key)
    for entry in manifest["shards"]:
        path = store / entry["name"]
        table = pq.read_table(path).drop_columns(["policy_logprobs"])
        metadata = dict(table.schema.metadata)
        layout = json.loads(metadata[b"lightopd.layout"])
        layout.pop("sampling")
        metadata[b"lightopd.layout"] = json.dumps(layout).encode()
        pq.write_table(table.replace_schema_metadata(metadata), path)
        entry["sha256"], entry["bytes"] = hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_size
    (store / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("top_p", [1.0, 0.95])
def test_a_store_from_before_policy_logprobs(broad_model, teacher_model, prompts, tmp_path, monkeypatch, capsys,
                                             top_p):
    """Untruncated, it trains as before (ℓold is ℓμ); truncated, the objectives that need ℓold say
    so (exit 2) and offer behavior=sampler, and the others train."""
    _, store = scored_store(tmp_path, broad_model, teacher_model, prompts, temperature=0.6, top_p=top_p)
    as_older_release(store)
    base = ["train", "--student", str(broad_model), "--data", str(store), "--steps", "1", "--batch-size", "16",
            "--allow-teacher-mismatch"]
    code, _, err = cli(monkeypatch, capsys, *base, "--out", str(tmp_path / "is"), "--objective", "opd-is")
    if top_p == 1.0:
        assert code == 0 and metrics(tmp_path / "is")[0]["is_ratio_mean"] == pytest.approx(1.0, abs=1e-5)
        return
    assert code == 2 and "policy_logprobs" in err and "objective.behavior=sampler" in err, err
    code, _, _ = cli(monkeypatch, capsys, *base, "--out", str(tmp_path / "sampler"), "--objective", "opd-is",
                     "--set", "objective.behavior=sampler")
    assert code == 0 and metrics(tmp_path / "sampler")[0]["grad_norm"] > 0
    code, _, _ = cli(monkeypatch, capsys, *base, "--out", str(tmp_path / "lopd"), "--objective", "lightning-opd")
    first = metrics(tmp_path / "lopd")[0]
    assert code == 0 and "is_ratio_mean" not in first and first["sampler_single_token"] >= 0
