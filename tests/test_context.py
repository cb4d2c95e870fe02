"""A teacher that sees more than the student: score-teacher --teacher-prompt against a float64 forward of
the rendered teacher prompt, its errors, its length policy, and the self-distillation gate."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightopd.data.store import open_store
from lightopd.tiny import CHAT_MODEL_TEMPLATE, CHAT_MODEL_WORDS, default_words, make_model
from tests.helpers import cli, do_rollout, do_score, read_rows, run_cli, write_jsonl
from tests.reference import completion_logits, log_softmax64

WORDS = default_words(40) + CHAT_MODEL_WORDS + ["hint", "be", "brief"]
TEMPLATE = "hint {hint} {prompt}"


@pytest.fixture(scope="module")
def chat_pair(tmp_path_factory):
    """A chat student and a confident chat teacher of one vocabulary (Qwen3-shaped template), and a
    rollout store of the student over prompts whose records carry a `hint` field."""
    tmp = tmp_path_factory.mktemp("context")
    student = make_model(tmp / "student", words=WORDS, chat_template=CHAT_MODEL_TEMPLATE, seed=4)
    teacher = make_model(tmp / "teacher", words=WORDS, chat_template=CHAT_MODEL_TEMPLATE, seed=5, hidden=48,
                         logit_scale=20.0)
    records = [{"id": f"p{i}", "prompt": " ".join(f"w{j}" for j in range(i, 2 * i + 1)), "answer": str(i),
                "hint": f"w{30 + i} w{20 - i}"} for i in range(6)]  # prompts of 1 to 6 words
    prompts = write_jsonl(tmp / "prompts.jsonl", records)
    rollouts = tmp / "rollouts"
    do_rollout(student, prompts, rollouts, n=2, max_new_tokens=6, prompts_per_shard=4)
    return student, teacher, rollouts


@pytest.mark.slow
def test_teacher_logprobs_under_a_template_equal_a_direct_forward(chat_pair, tmp_path):
    """At k < V, temperature 0.7 and a chat template with a system turn and template options: every
    statistic equals a float64 forward of the independently rendered teacher prompt + the completion."""
    student, teacher, rollouts = chat_pair
    k, temperature = 5, 0.7
    out = tmp_path / "scored"
    do_score(teacher, rollouts, out, top_k=k, temperature=temperature, topk_dtype="float32",
             teacher_prompt=TEMPLATE, teacher_system_prompt="be brief",
             teacher_chat_template_kwargs='{"enable_thinking": false}')
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    reference = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float64).eval()
    hints = {f"p{i}": f"w{30 + i} w{20 - i}" for i in range(6)}
    rows = read_rows(out)
    assert len(rows) == 12
    outside = 0
    for row in rows:
        turns = [{"role": "system", "content": "be brief"},
                 {"role": "user", "content": f"hint {hints[row['prompt_id']]} {row['prompt']}"}]
        want_prompt = list(tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True,
                                                         enable_thinking=False)["input_ids"])
        assert row["teacher_prompt_ids"] == want_prompt != row["prompt_ids"]
        n = len(row["completion_ids"])
        ref = log_softmax64(completion_logits(reference, want_prompt, row["completion_ids"]) / temperature)
        np.testing.assert_allclose(row["teacher_logprobs"], ref[np.arange(n), row["completion_ids"]], atol=1e-5)
        want_ids = np.argsort(-ref, axis=-1, kind="stable")[:, :k]
        assert (np.array(row["topk_ids"]).reshape(n, k) == want_ids).all()
        np.testing.assert_allclose(np.array(row["topk_logprobs"]).reshape(n, k),
                                   np.take_along_axis(ref, want_ids, -1), atol=1e-5)
        rest = np.ones(ref.shape, dtype=bool)
        np.put_along_axis(rest, want_ids, False, -1)
        np.testing.assert_allclose(row["teacher_log_tail"], np.log(np.where(rest, np.exp(ref), 0).sum(-1)),
                                   rtol=1e-4)
        outside += sum(y not in want_ids[t] for t, y in enumerate(row["completion_ids"]))
    assert outside > 0, "some sampled tokens fall outside the teacher's top-k"
    context = open_store(out)["scoring"]["context"]
    assert context["template"] == TEMPLATE and context["rendering"]["system_prompt"] == "be brief"
    assert context["rendering"]["chat_template_kwargs"] == {"enable_thinking": False}
    assert context["fingerprint"].startswith("sha256:") and context["skipped"] == context["truncated"] == 0
    shown = json.loads(run_cli("inspect", str(out), "--show", "1").stdout.strip().splitlines()[-1])["show"][0]
    assert "hint" in shown["teacher_prompt"] and "hint" not in shown["prompt"]


def test_template_errors_name_the_record_and_the_field(chat_pair, tmp_path, monkeypatch, capsys):
    _, teacher, rollouts = chat_pair
    base = ["score-teacher", "--teacher", str(teacher), "--data", str(rollouts), "--top-k", "4"]
    for template, want in (("solution {solution}", "has no field 'solution'"),
                           ("{prompt} {0}", "is not a plain name"), ("no field at all", "names no field"),
                           ("{prompt", "not a format template")):
        code, _, err = cli(monkeypatch, capsys, *base, "--out", str(tmp_path / "x"), "--teacher-prompt", template)
        assert code == 2 and want in err, err
    code, _, err = cli(monkeypatch, capsys, *base, "--out", str(tmp_path / "y"), "--teacher-system-prompt", "be")
    assert code == 2 and "--teacher-system-prompt: only with --teacher-prompt" in err
    assert "row 0 (prompt 'p0')" in cli(monkeypatch, capsys, *base, "--out", str(tmp_path / "z"),
                                        "--teacher-prompt", "{solution}")[2]
    assert not (tmp_path / "x").exists(), "refused before any store is written"


def test_long_teacher_prompts_error_skip_or_truncate(chat_pair, tmp_path, monkeypatch, capsys):
    """The teacher's context is 64 positions; a template that repeats the prompt r times, with the
    prompt's longest completion, may not fit."""
    _, teacher, rollouts = chat_pair
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    rows = read_rows(rollouts)
    longest = {r["prompt_id"]: max(len(s["completion_ids"]) for s in rows if s["prompt_id"] == r["prompt_id"])
               for r in rows}

    def too_long(repeats: int) -> set[str]:  # rendered independently, as a chat model's user turn
        def length(pid):
            text = " ".join([next(r["prompt"] for r in rows if r["prompt_id"] == pid)] * repeats)
            return len(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                     tokenize=True)["input_ids"])
        return {pid for pid in longest if length(pid) + longest[pid] > 64}

    template = lambda repeats: " ".join(["{prompt}"] * repeats)  # noqa: E731
    base = ["score-teacher", "--teacher", str(teacher), "--data", str(rollouts), "--top-k", "4"]
    code, _, err = cli(monkeypatch, capsys, *base, "--out", str(tmp_path / "e"), "--teacher-prompt", template(60))
    assert code == 2 and "exceeds the teacher's context of 64" in err and "--teacher-long-prompts" in err
    assert too_long(60) == set(longest)
    do_score(teacher, rollouts, tmp_path / "t", top_k=4, teacher_prompt=template(60), teacher_long_prompts="truncate")
    scored = read_rows(tmp_path / "t")
    assert len(scored) == 12 and open_store(tmp_path / "t")["scoring"]["context"]["truncated"] == 6
    assert all(len(r["teacher_prompt_ids"]) + longest[r["prompt_id"]] == 64 for r in scored)
    repeats = next(r for r in range(2, 30) if 0 < len(too_long(r)) < 6)  # some prompts fit, others not
    do_score(teacher, rollouts, tmp_path / "s", top_k=4, teacher_prompt=template(repeats), teacher_long_prompts="skip")
    kept = {r["prompt_id"] for r in read_rows(tmp_path / "s")}
    assert kept == set(longest) - too_long(repeats) and len(read_rows(tmp_path / "s")) == 2 * len(kept)
    assert open_store(tmp_path / "s")["scoring"]["context"]["skipped"] == len(too_long(repeats))


def test_the_self_distillation_gate(chat_pair, tmp_path, monkeypatch, capsys):
    """The student scoring its own rollouts: with a context it is self-distillation and trains; without one
    its signal is zero, so score-teacher warns and train refuses (unless --allow-teacher-mismatch)."""
    student, _, rollouts = chat_pair
    do_score(student, rollouts, tmp_path / "self", top_k=4, teacher_prompt=TEMPLATE)
    train = ["train", "--student", str(student), "--objective", "lightning-opd", "--steps", "1", "--batch-size", "4"]
    code, _, err = cli(monkeypatch, capsys, *train, "--data", str(tmp_path / "self"), "--out", str(tmp_path / "a"))
    assert code == 0 and "self-distillation" in err and "teacher consistency holds" in err, err
    code, _, err = cli(monkeypatch, capsys, "score-teacher", "--teacher", str(student), "--data", str(rollouts),
                       "--out", str(tmp_path / "bare"), "--top-k", "4")
    assert code == 0 and "is the model that sampled" in err
    code, _, err = cli(monkeypatch, capsys, *train, "--data", str(tmp_path / "bare"), "--out", str(tmp_path / "b"))
    assert code == 2 and "signal is zero" in err and "--teacher-prompt" in err
    code, _, err = cli(monkeypatch, capsys, *train, "--data", str(tmp_path / "bare"), "--out", str(tmp_path / "c"),
                       "--allow-teacher-mismatch")
    assert code == 0 and "signal is zero" in err
