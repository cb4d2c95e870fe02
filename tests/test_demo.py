"""The bundled task and teacher, and `lightopd demo` end to end in a reduced size."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightopd.data.reader import verify
from lightopd.data.store import open_store
from lightopd.provenance import read_provenance
from lightopd.stages import demo
from lightopd.tasks import addition as A
from tests.helpers import last_json, read_rows, run_cli

pytestmark = pytest.mark.slow  # end-to-end runs of real processes: `make test-fast` leaves them out


def test_task_formats_answers_and_splits():
    assert A.solution(123, 456, "worked") == "975|579"
    assert A.solution(999, 999, "worked") == "8991|1998"
    assert A.solution(123, 456, "direct") == "|579"
    assert A.solution(123, 456, "plain") == "579"
    for fmt in A.FORMATS:
        assert A.format_of(A.solution(987, 654, fmt)) == fmt
    for text in ("", "12|", "|1a", "1x|12", "x"):
        assert A.format_of(text) == "other"
    train = set(A.pairs(3000, "train", 0))
    heldout = A.pairs(500, "heldout", 0)
    assert len(heldout) == 500 and not train & set(heldout)
    assert A.pairs(500, "heldout", 0) == heldout and A.pairs(500, "heldout", 1) != heldout
    tokenizer = A.make_tokenizer()
    ids = tokenizer(A.prompt(123, 456))["input_ids"]
    assert len(ids) == 9 and tokenizer.decode(ids, skip_special_tokens=True) == "123+456="


@pytest.mark.parametrize("name,formats", [("two-format", ["worked", "direct"]), ("plain", ["plain"]),
                                          ("tagged", ["worked", "direct"])])
def test_bundled_teachers_solve_held_out_pairs(name, formats):
    """The shipped teachers, as their training script recorded them and as they answer now."""
    path = demo.TEACHER.parent / name
    training = json.loads((path / "training.json").read_text())
    assert training["formats"] == formats and min(training["heldout_exact_match"].values()) >= 0.97
    assert (path / "model.safetensors").stat().st_size < 4 * 2**20  # a few MB at most
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    heldout = A.pairs(100, "heldout", 7)
    ids = tokenizer([A.prompt(a, b) for a, b in heldout], return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=0)
    texts = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    assert sum(t.split("|")[-1] == str(a + b) for t, (a, b) in zip(texts, heldout, strict=True)) >= 97
    assert {A.format_of(t) for t in texts} <= set(formats)


def test_the_tagged_teacher_follows_the_tag():
    """Tagged, the tagged teacher works every sum out (the worked format); untagged, it mixes formats."""
    path = demo.TAGGED_TEACHER
    assert json.loads((path / "training.json").read_text())["tagged"] == ["worked"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    heldout = A.pairs(100, "heldout", 7)
    torch.manual_seed(0)
    shares = {}
    for tag in (A.TAG, ""):
        ids = tokenizer([tag + A.prompt(a, b) for a, b in heldout], return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=12, do_sample=True, eos_token_id=2, pad_token_id=0)
        texts = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
        correct = sum(t.split("|")[-1] == str(a + b) for t, (a, b) in zip(texts, heldout, strict=True))
        assert correct >= (97 if tag else 90), (tag, correct)  # sampled at T = 1: its direct format errs at times
        shares[tag] = sum(A.format_of(t) == "worked" for t in texts)
    assert shares[A.TAG] >= 97 and 20 <= shares[""] <= 80, shares


def test_demo_of_context_self_distillation_small(tmp_path):
    """`demo --context`: the SFT student scores its own untagged rollouts as if tagged, and trains on them."""
    out = tmp_path / "demo"
    proc = run_cli("demo", "--context", "--out", str(out), "--sft-prompts", "400", "--sft-steps", "30",
                   "--opd-prompts", "24", "--opd-steps", "6", "--heldout-prompts", "100", "--seed", "1")
    result = last_json(proc)
    assert set(result["accuracy"]) == {*demo.MODELS, "sft_tagged"} and result["variant"] == "context self-distillation"
    assert result["accuracy"]["teacher"] >= 0.9
    store = open_store(out / "teacher-store")
    assert store["scoring"]["context"]["template"] == "+{prompt}" and verify(out / "teacher-store") == []
    assert store["teacher"]["fingerprint"] == read_provenance(out / "opd")["parent"]["fingerprint"]
    assert "self-distillation" in proc.stderr
    tokenizer = A.make_tokenizer()
    for row in read_rows(out / "teacher-store"):
        assert tokenizer.decode(row["teacher_prompt_ids"], skip_special_tokens=True) == A.TAG + row["prompt"]
        assert not row["prompt"].startswith(A.TAG)
    tagged = [json.loads(line)["prompt"] for line in (out / "prompts-sft.jsonl").read_text().splitlines()]
    assert sum(p.startswith(A.TAG) for p in tagged) == 200


def test_demo_end_to_end_small(tmp_path):
    out = tmp_path / "demo"
    proc = run_cli("demo", "--out", str(out), "--sft-prompts", "400", "--sft-steps", "30", "--opd-prompts", "24",
                   "--opd-steps", "6", "--heldout-prompts", "100", "--seed", "1")
    result = last_json(proc)
    assert result["command"] == "demo" and set(result["accuracy"]) == set(demo.MODELS)
    assert all(0 <= v <= 1 for v in result["accuracy"].values())
    assert result["accuracy"]["teacher"] >= 0.95  # the bundled teacher, sampled at T = 1, on held-out pairs
    for name, shares in result["format_share"].items():
        assert sum(shares.values()) == pytest.approx(1.0), name
    assert set(result["format_share"]["teacher"]) <= {"worked", "direct"}
    assert set(result["seconds"]) == {"rollout_teacher", "sft", "rollout_student", "score_teacher", "opd",
                                      "sft_more", "eval", "total"}
    assert "held-out exact match" in proc.stderr and (out / "base" / "config.json").is_file()
    assert "off-policy" not in proc.stderr and "teacher consistency" not in proc.stderr, \
        "the demo trains on the student's own rollouts, scored by its SFT teacher: nothing to warn of"
    assert json.loads((out / "demo.json").read_text()) == result
    # the stores and models behind it are real and consistent
    for store in ("sft-data", "rollouts", "teacher-store"):
        assert open_store(out / store)["complete"] and verify(out / store) == []
    assert open_store(out / "rollouts")["rows"] == 24 * 4
    teacher = open_store(out / "teacher-store")["teacher"]["fingerprint"]
    assert read_provenance(out / "sft")["sft_teacher"]["fingerprint"] == teacher
    opd = read_provenance(out / "opd")
    assert opd["objective"]["name"] == "opd-seq" and opd["steps"] == 6 and opd["sft_teacher"]["fingerprint"] == teacher
    assert read_provenance(out / "sft-more")["steps"] == 6


def test_demo_refuses_a_used_directory(tmp_path):
    (tmp_path / "x").write_text("")
    proc = run_cli("demo", "--out", str(tmp_path), check=False)
    assert proc.returncode == 2 and "already holds files" in proc.stderr


@pytest.mark.slow
def test_full_size_demo_shows_the_opd_gain(tmp_path):
    """The demo at its defaults (about a minute on 2 CPU cores): OPD beats SFT and the SFT-more control."""
    result = last_json(run_cli("demo", "--out", str(tmp_path / "demo"), "--seed", "0"))
    accuracy = result["accuracy"]
    assert accuracy["teacher"] >= 0.97
    assert accuracy["opd"] >= accuracy["sft_more"] + 0.10 and accuracy["opd"] >= accuracy["sft"] + 0.10
    assert result["format_share"]["opd"]["worked"] > result["format_share"]["sft"]["worked"]
