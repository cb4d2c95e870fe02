"""A GSM8K-shaped Parquet file (question, a rationale ending in `#### x`, two extra columns) through
rollout -> score-teacher -> train -> eval with no field flags, its extra columns carried along as
metadata, and the reference's `#### x` read as its answer."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from lightopd.data.reader import iter_batches
from tests.helpers import do_rollout, last_json, read_rows, run_cli, write_jsonl

pytestmark = pytest.mark.slow  # end-to-end runs of real processes: `make test-fast` leaves them out


def test_a_gsm8k_file_goes_through_every_stage(tiny_model, teacher_model, tmp_path):
    # the references of even prompts end in the model's own greedy answer, so eval at T = 0 scores exactly 1/2
    candidates = [f"w{i} w{(7 * i) % 40} ?" for i in range(40)]
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"id": str(i), "prompt": q} for i, q in enumerate(candidates)])
    do_rollout(tiny_model, plain, tmp_path / "greedy", temperature=0.0, max_new_tokens=5)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    texts = {int(r["prompt_id"]): tok.decode(r["completion_ids"], skip_special_tokens=True).strip() for r in
             read_rows(tmp_path / "greedy")}
    chosen = [i for i in range(40) if texts[i] and texts[i] != "w39 w39"][:8]  # an empty answer marks nothing
    assert len(chosen) == 8
    questions, greedy = [candidates[i] for i in chosen], {str(k): texts[i] for k, i in enumerate(chosen)}
    answers = [f"w1 and w2 make w3\nso it is w3\n#### {greedy[str(i)] if i % 2 == 0 else 'w39 w39'}"
               for i in range(8)]
    gsm = tmp_path / "gsm8k.parquet"
    pq.write_table(pa.table({"question": questions, "answer": answers, "source": ["train"] * 8,
                             "difficulty": list(range(8))}), gsm)

    rollouts, scored, trained = tmp_path / "r", tmp_path / "t", tmp_path / "o"
    result = run_cli("rollout", "--model", str(tiny_model), "--prompts", str(gsm), "--out", str(rollouts), "--n", "2",
                     "--max-new-tokens", "5", "--temperature", "0.6", "--top-p", "0.95")
    assert "prompt <- 'question'; answer <- 'answer'; id <- record index; metadata <- difficulty, source" in \
        " ".join(result.stderr.split())
    rows = read_rows(rollouts)
    assert len(rows) == 16 and rows[2]["answer"] == answers[1]
    assert json.loads(rows[2]["metadata"]) == {"source": "train", "difficulty": 1}
    run_cli("score-teacher", "--teacher", str(teacher_model), "--data", str(rollouts), "--out", str(scored),
            "--top-k", "4")
    assert [r["metadata"] for r in read_rows(scored)] == [r["metadata"] for r in rows]  # carried along
    run_cli("train", "--student", str(tiny_model), "--data", str(scored), "--out", str(trained), "--steps", "2",
            "--batch-size", "8", "--sft-teacher", str(teacher_model))

    log = tmp_path / "samples.jsonl"
    before = last_json(run_cli("eval", "--model", str(tiny_model), "--prompts", str(gsm), "--prompt-field", "question",
                               "--answer-field", "answer", "--temperature", "0", "--max-new-tokens", "5",
                               "--log-samples", str(log), "--data", str(scored)))
    assert before["accuracy"] == 0.5 and before["prompts_evaluated"] == 8
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert [s["reference_answer"] for s in logged] == [a.rsplit("#### ", 1)[1] for a in answers]
    assert [s["correct"] for s in logged] == [i % 2 == 0 for i in range(8)]
    assert logged[0]["metadata"] == {"source": "train", "difficulty": 0}
    assert before["teacher"]["rows"] == 16
    after = last_json(run_cli("eval", "--model", str(trained), "--prompts", str(gsm), "--temperature", "0",
                              "--max-new-tokens", "5"))
    assert 0 <= after["accuracy"] <= 1 and after["prompts_evaluated"] == 8


def test_inspect_shows_rows_decoded(tiny_model, rollout_store, teacher_store, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    first = next(r for b in iter_batches(teacher_store) for r in b.to_pylist())
    shown = last_json(run_cli("inspect", str(teacher_store), "--show", "3"))["show"]
    assert len(shown) == 3
    assert shown[0]["prompt"] == tok.decode(first["prompt_ids"], skip_special_tokens=False)
    assert shown[0]["completion"] == tok.decode(first["completion_ids"], skip_special_tokens=False)
    mean = sum(first["teacher_logprobs"]) / len(first["teacher_logprobs"])
    assert abs(shown[0]["mean_teacher_logprobs"] - mean) < 1e-4
    # the sampling model gone: ids instead of text, and a warning saying why
    moved = tmp_path / "store"
    shutil.copytree(rollout_store, moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["model"]["path"] = str(tmp_path / "gone")
    (moved / "manifest.json").write_text(json.dumps(manifest))
    proc = run_cli("inspect", str(moved), "--show", "1")
    assert last_json(proc)["show"][0]["prompt"] == next(iter_batches(moved)).to_pylist()[0]["prompt_ids"]
    assert "token ids are shown, not text" in proc.stderr
