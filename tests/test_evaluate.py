"""`lightopd eval`: pass@k, majority vote, teacher agreement against a full-vocabulary reference."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightopd.config import EvalConfig
from lightopd.data.reader import iter_batches
from lightopd.stages import evaluate
from tests.helpers import do_rollout, do_score, last_json, read_rows, run_cli, write_jsonl
from tests.reference import completion_logits, log_softmax64


@pytest.mark.parametrize("n,c", [(5, 0), (5, 2), (5, 5), (8, 3)])
def test_pass_at_k_equals_enumeration(n, c):
    outcomes = [True] * c + [False] * (n - c)
    for k in range(1, n + 1):
        subsets = list(itertools.combinations(outcomes, k))
        assert evaluate.pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


def test_answer_metrics():
    results = [
        [(True, "4"), (False, "5"), (True, "4"), (False, None)],   # majority "4": right
        [(False, "7"), (False, "7"), (True, "6"), (False, None)],  # majority "7": wrong
        [(False, None)] * 4,                                         # no answers at all
    ]
    m = evaluate.answer_metrics(results, 4)
    assert m["accuracy"] == pytest.approx(3 / 12)
    assert m["majority_accuracy"] == pytest.approx(1 / 3)
    assert set(m["pass@k"]) == {"1", "2", "4"}
    assert m["pass@k"]["1"] == pytest.approx(m["accuracy"])
    assert m["pass@k"]["4"] == pytest.approx(2 / 3)


def test_teacher_agreement_equals_full_vocabulary_reference(tiny_model, teacher_model, rollout_store, tmp_path):
    store = tmp_path / "full"
    do_score(teacher_model, rollout_store, store, top_k=50, topk_dtype="float32")
    got = evaluate.run(EvalConfig.of(model=str(tiny_model), data=str(store), micro_batch_tokens=30))["teacher"]
    student = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float64).eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_model, dtype=torch.float64).eval()
    rkl, fkl, k1, agree = [], [], [], []
    for row in (r for b in iter_batches(rollout_store) for r in b.to_pylist()):
        q = log_softmax64(completion_logits(student, row["prompt_ids"], row["completion_ids"]))
        p = log_softmax64(completion_logits(teacher, row["prompt_ids"], row["completion_ids"]))
        y = np.array(row["completion_ids"])
        rkl += list((np.exp(q) * (q - p)).sum(-1))
        fkl += list((np.exp(p) * (p - q)).sum(-1))
        k1 += list(q[np.arange(len(y)), y] - p[np.arange(len(y)), y])
        agree += list(q.argmax(-1) == p.argmax(-1))
    assert got["tokens"] == len(k1)
    assert got["rkl"] == pytest.approx(np.mean(rkl), abs=1e-4)
    assert got["fkl"] == pytest.approx(np.mean(fkl), abs=1e-4)
    assert got["k1"] == pytest.approx(np.mean(k1), abs=1e-4)
    assert got["top1_agree"] == pytest.approx(np.mean(agree))


@pytest.mark.slow
def test_end_to_end_accuracy_against_known_answers(tiny_model, tmp_path):
    """Answers set to the model's own greedy output for half the prompts: accuracy is exactly 1/2."""
    prompts = [{"id": f"q{i}", "prompt": f"w{i} w{i + 1}"} for i in range(6)]
    plain = write_jsonl(tmp_path / "plain.jsonl", prompts)
    do_rollout(tiny_model, plain, tmp_path / "greedy", temperature=0.0, max_new_tokens=6)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    greedy = {r["prompt_id"]: tok.decode(r["completion_ids"], skip_special_tokens=True)
              for b in iter_batches(tmp_path / "greedy") for r in b.to_pylist()}
    for i, p in enumerate(prompts):
        p["answer"] = greedy[p["id"]] if i % 2 == 0 else "w39 w39 w39"
        p["subject"] = ["even", "odd", "even", "odd", "mixed", "mixed"][i]  # right: q0 q2 q4; wrong: q1 q3 q5
    with_answers = write_jsonl(tmp_path / "answers.jsonl", prompts)
    out = tmp_path / "eval.json"
    result = last_json(run_cli("eval", "--model", str(tiny_model), "--prompts", str(with_answers), "--checker", "exact",
                               "--temperature", "0", "--max-new-tokens", "6", "--n", "2", "--out", str(out),
                               "--group-by", "subject"))
    assert result["accuracy"] == 0.5 and result["pass@k"] == {"1": 0.5, "2": 0.5}
    groups = result["groups"]["scores"]
    assert result["groups"]["field"] == "subject" and list(groups) == ["even", "mixed", "odd"]
    assert [(g["prompts"], g["accuracy"], g["majority_accuracy"]) for g in groups.values()] == [
        (2, 1.0, 1.0), (2, 0.5, 0.5), (2, 0.0, 0.0)]
    assert result["majority_accuracy"] == 0.5 and result["prompts_evaluated"] == 6
    assert 1 <= result["mean_completion_tokens"] <= 6 and 0 <= result["truncation_rate"] <= 1
    assert json.loads(out.read_text()) == result
    compared = last_json(run_cli("eval", "--compare", str(out), str(out)))
    assert compared["compare"]["eval"]["accuracy"] == 0.5
    assert compared["compare"]["eval"]["accuracy (subject = even)"] == 1.0  # a row per group in the table
    (tmp_path / "other").mkdir()
    other = tmp_path / "other" / "eval.json"
    other.write_text(json.dumps({**result, "accuracy": 0.25}))
    compared = last_json(run_cli("eval", "--compare", str(out), str(other)))  # same file name, two columns
    assert compared["compare"][str(out)]["accuracy"] == 0.5 and compared["compare"][str(other)]["accuracy"] == 0.25


def test_compare_writes_a_bar_chart(tmp_path):
    from PIL import Image

    def result(name: str, accuracy: float) -> str:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"command": "eval", "model": name, "accuracy": accuracy, "pass@k": {"1": accuracy},
                                    "majority_accuracy": accuracy, "mean_completion_tokens": 7.0}))
        return str(path)

    images = []
    for high in (0.9, 0.2):
        png = tmp_path / f"chart-{high}.png"
        summary = evaluate.compare([result("sft", 0.1), result("opd", high)], plot=str(png))
        assert summary["plot"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        images.append(Image.open(png).convert("L"))
    assert images[0].size == images[1].size
    assert images[0].tobytes() != images[1].tobytes()  # the bars' heights are drawn from the results


def test_compare_draws_the_training_curves_of_runs(tmp_path):
    """`eval --compare RUN/metrics.jsonl ... --plot PNG`: each run's last step, and every curve."""
    pytest.importorskip("matplotlib", reason="charts need the optional plot extra")
    from PIL import Image

    def run(name: str, losses: list[float]) -> str:
        (tmp_path / name).mkdir()
        path = tmp_path / name / "metrics.jsonl"
        path.write_text("".join(json.dumps({"step": i + 1, "loss": loss, "lr": 1e-3 * (i + 1), "grad_norm": 2.0,
                                            "k1": loss / 2, "tokens": 100, "tokens_per_s": 9.0}) + "\n"
                                for i, loss in enumerate(losses)))
        return str(path)

    png = tmp_path / "curves.png"
    proc = run_cli("eval", "--compare", run("a", [3.0, 2.0, 1.5]), run("b", [3.0, 2.5]), "--plot", str(png))
    summary = last_json(proc)
    assert summary["runs"]["a"] == {"steps": 3, "last": {"loss": 1.5, "lr": 3e-3, "grad_norm": 2.0, "k1": 0.75}}
    assert summary["runs"]["b"]["steps"] == 2 and summary["plot"] == str(png)
    assert Image.open(png).size[0] > 800 and "the last step" in proc.stderr
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "metrics.jsonl").write_text('{"accuracy": 1}\n')
    bad = run_cli("eval", "--compare", str(tmp_path / "c" / "metrics.jsonl"), check=False)
    assert bad.returncode == 2 and "not a training run's metrics.jsonl" in bad.stderr


def test_limit_applies_to_the_teacher_store(tiny_model, teacher_store):
    """--limit N measures agreement on the rows of the store's first N prompts, and only those."""
    rows = read_rows(teacher_store)
    first = list(dict.fromkeys(r["prompt_id"] for r in rows))[:3]
    kept = [r for r in rows if r["prompt_id"] in first]
    got = evaluate.run(EvalConfig.of(model=str(tiny_model), data=str(teacher_store), limit=3))["teacher"]
    assert (got["prompts"], got["rows"]) == (3, len(kept)) and len(kept) < len(rows)
    assert got["tokens"] == sum(len(r["completion_ids"]) for r in kept)


@pytest.mark.slow
def test_compare_warns_when_settings_differ_and_refuses_options_it_ignores(tiny_model, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "w1", "answer": "w2"}, {"prompt": "w3", "answer": "w4"}])
    for name, extra in (("a", []), ("b", []), ("c", ["--n", "2", "--limit", "1"])):
        run_cli("eval", "--model", str(tiny_model), "--prompts", str(prompts), "--max-new-tokens", "2",
                "--out", str(tmp_path / f"{name}.json"), *extra)
    same = run_cli("eval", "--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"))
    assert last_json(same)["differences"] == [] and "warning" not in same.stderr
    differ = run_cli("eval", "--compare", str(tmp_path / "a.json"), str(tmp_path / "c.json"))
    lines = last_json(differ)["differences"]
    assert "results made with different limit: a=None, c=1" in lines
    assert "results made with different n: a=1, c=2" in lines
    assert any(line.startswith("results made with different prompts.count") for line in lines)
    assert "warning: results made with different n" in differ.stderr
    proc = run_cli("eval", "--compare", str(tmp_path / "a.json"), "--model", str(tiny_model), check=False)
    assert proc.returncode == 2 and "--model: not used with --compare" in proc.stderr
