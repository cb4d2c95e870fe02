"""Rewards in the store: each row's `reward` is the checker's score of its completion, exactly as
`eval` checks the same sample (same engine, seed and sampling: the same tokens), a score that is not
0/1 kept as given, null where the record has no answer; score-teacher carries the column."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from lightopd.data.groups import reward_summary
from lightopd.tasks.checkers import check
from tests.helpers import cli, do_rollout, do_score, metrics, read_rows, run_cli, write_jsonl

CHECKER = '''
def by_words(completion, reference, metadata):
    """A graded score: a quarter per word, so most are neither 0 nor 1."""
    return len(completion.split()) / 4
'''


@pytest.fixture
def answered(tmp_path):
    words = [f"w{i}" for i in range(40)]
    records = [{"id": f"p{i}", "prompt": " ".join(words[i: i + 3]), "answer": words[i + 3]} for i in range(6)]
    records.append({"id": "free", "prompt": "w1 w2"})  # no answer: no reward
    return write_jsonl(tmp_path / "p.jsonl", records)


def test_rewards_are_the_builtin_checkers_verdicts(tiny_model, answered, tmp_path):
    do_rollout(tiny_model, answered, tmp_path / "r", n=3, max_new_tokens=4, temperature=1.0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert manifest["reward"] == {"checker": "auto"}
    rows = read_rows(tmp_path / "r")
    answers = {r["prompt_id"]: json.loads(line).get("answer")
               for line, r in zip(answered.read_text().splitlines(), rows[::3], strict=False)}
    for row in rows:
        answer = answers.get(row["prompt_id"])
        if row["prompt_id"] == "free":
            assert row["reward"] is None
            continue
        text = tokenizer.decode(row["completion_ids"], skip_special_tokens=True)
        assert row["reward"] == float(check(text, answer, "auto")[0])
    do_score(tiny_model, tmp_path / "r", tmp_path / "t", top_k=4)
    assert [r["reward"] for r in read_rows(tmp_path / "t")] == [r["reward"] for r in rows]


@pytest.mark.slow
def test_a_graded_score_is_kept_and_eval_agrees(tiny_model, answered, tmp_path, monkeypatch):
    (tmp_path / "graded.py").write_text(CHECKER)
    monkeypatch.chdir(tmp_path)
    settings = ["--n", "2", "--max-new-tokens", "6", "--temperature", "1.0", "--seed", "3",
                "--checker", "graded.py:by_words"]
    run_cli("rollout", "--model", str(tiny_model), "--prompts", str(answered), "--out", "r", *settings)
    run_cli("eval", "--model", str(tiny_model), "--prompts", str(answered), "--log-samples", "samples.jsonl",
            "--limit", "6", *settings)  # the answered records: a row's samples are keyed by its prompt id
    rows = {(r["prompt_id"], r["sample_index"]): r for r in read_rows(tmp_path / "r")}
    logged = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(logged) == 12  # eval checks the answered records only
    graded = 0
    for sample in logged:
        row = rows[(sample["prompt_id"], sample["sample_index"])]
        assert row["reward"] == pytest.approx(len(sample["completion"].split()) / 4)
        assert sample["correct"] == (row["reward"] >= 1.0)
        graded += row["reward"] not in (0.0, 1.0)
    assert graded, "scores that are not 0/1 are kept as given"


@pytest.mark.slow
def test_the_reward_command_rescores_a_store_without_sampling(tiny_model, answered, tmp_path, monkeypatch):
    """Same rows, rewards of the new checker; rollout and teacher stores alike; the result verifies."""
    (tmp_path / "graded.py").write_text(CHECKER)
    monkeypatch.chdir(tmp_path)
    do_rollout(tiny_model, answered, tmp_path / "r", n=2, max_new_tokens=5, temperature=1.0)
    do_score(tiny_model, tmp_path / "r", tmp_path / "t", top_k=4)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    for store in ("r", "t"):
        run_cli("reward", store, "--out", f"{store}2", "--checker", "graded.py:by_words")
        before, after = read_rows(tmp_path / store), read_rows(tmp_path / f"{store}2")
        assert [{**r, "reward": None} for r in before] == [{**r, "reward": None} for r in after]
        for row in after:
            text = tokenizer.decode(row["completion_ids"], skip_special_tokens=True)
            want = None if row["prompt_id"] == "free" else pytest.approx(len(text.split()) / 4)
            assert row["reward"] == want
        manifest = json.loads((tmp_path / f"{store}2" / "manifest.json").read_text())
        record = manifest["reward"] if store == "r" else manifest["rollouts"]["reward"]
        assert record["checker"] == "graded.py:by_words" and record["recomputed_from"]["path"].endswith(store)
        assert run_cli("inspect", f"{store}2", "--verify").returncode == 0
        if store == "t":  # written back in its own top-k layout (argmax, then by id), as stored
            raw = [pq.read_table(tmp_path / s / f"part-{i:05d}.parquet", columns=["topk_ids"]).column(0).to_pylist()
                   for s in ("t", "t2") for i in range(manifest["num_shards"])]
            assert raw[:manifest["num_shards"]] == raw[manifest["num_shards"]:]
    refused = run_cli("reward", "r", "--out", "r", "--checker", "exact", check=False)
    assert refused.returncode == 2 and "the store being read" in refused.stderr


def test_reward_summary_of_a_hand_built_store():
    groups = {"a": [1.0, 0.0, 1.0, 1.0], "b": [0.0, 0.0], "c": [1.0, 1.0], "d": [0.5, 0.25]}
    got = reward_summary(groups)
    assert got == {"rows": 10, "mean": 0.575, "pass_rate": 0.5, "prompts": 4,
                   "pass_rate_per_prompt": {"mean": 0.4375, "median": 0.375, "min": 0.0, "max": 1.0},
                   "prompts_all_pass": 1, "prompts_none_pass": 2, "prompts_all_equal_share": 0.5}


@pytest.mark.slow
def test_grpo_and_kdrl_train_on_rewards_and_refuse_a_store_without(tiny_model, answered, tmp_path, monkeypatch,
                                                                   capsys):
    (tmp_path / "graded.py").write_text(CHECKER)
    monkeypatch.chdir(tmp_path)
    unanswered = write_jsonl(tmp_path / "bare.jsonl", [{"id": f"q{i}", "prompt": f"w{i} w{i + 1}"} for i in range(4)])
    run_cli("rollout", "--model", str(tiny_model), "--prompts", str(answered), "--out", "r", "--n", "2",
            "--max-new-tokens", "6", "--limit", "6", "--checker", "graded.py:by_words")
    do_score(tiny_model, tmp_path / "r", tmp_path / "t", top_k=4)
    for name in ("grpo", "kdrl"):
        code, out, err = cli(monkeypatch, capsys, "train", "--student", str(tiny_model), "--data", "t", "--out", name,
                             "--objective", name, "--steps", "2", "--batch-size", "12", "--allow-teacher-mismatch")
        assert code == 0, err
        lines = metrics(tmp_path / name)
        assert lines[0]["grad_norm"] > 0 and "clip_fraction" in lines[0]
    assert [line["kd_beta"] for line in lines] == [0.005, 0.001]  # kdrl's β annealed over the run
    do_rollout(tiny_model, unanswered, tmp_path / "bare", n=2, max_new_tokens=4)
    code, _, err = cli(monkeypatch, capsys, "train", "--student", str(tiny_model), "--data", "bare", "--out", "o",
                       "--objective", "grpo", "--steps", "1", "--batch-size", "4")
    assert code == 2 and "no rewards" in err and "lightopd reward" in err
    run_cli("reward", "r", "--out", "r-exact", "--checker", "exact")  # the tiny model never says the answer: all 0
    code, _, err = cli(monkeypatch, capsys, "train", "--student", str(tiny_model), "--data", "r-exact", "--out", "z",
                       "--objective", "grpo", "--steps", "1", "--batch-size", "12")
    assert code == 0 and "every group-relative advantage is 0" in err


@pytest.mark.slow
def test_row_weights_reach_the_loss(tiny_model, teacher_model, answered, tmp_path, monkeypatch, capsys):
    (tmp_path / "graded.py").write_text(CHECKER)
    monkeypatch.chdir(tmp_path)
    run_cli("rollout", "--model", str(tiny_model), "--prompts", str(answered), "--out", "r", "--n", "2",
            "--max-new-tokens", "6", "--limit", "6", "--checker", "graded.py:by_words")
    do_score(teacher_model, tmp_path / "r", tmp_path / "t", top_k=4)
    base = ["train", "--student", str(tiny_model), "--data", "t", "--steps", "1", "--batch-size", "12",
            "--allow-teacher-mismatch", "--objective", "lightning-opd"]
    code, _, err = cli(monkeypatch, capsys, *base, "--out", "paced", "--set", "objective.row_weight=paced")
    assert code == 0, err
    first = metrics(tmp_path / "paced")[0]
    rewards = [r["reward"] for r in read_rows(tmp_path / "t")]
    assert 0 <= first["row_weight"] <= 0.25 and (first["grad_norm"] > 0) == (first["row_weight"] > 0), rewards
    code, _, err = cli(monkeypatch, capsys, *base, "--out", "gated", "--set", "objective.reward_gate=100")
    assert code == 0 and metrics(tmp_path / "gated")[0]["grad_norm"] == 0.0 and "gradient is zero" in err
