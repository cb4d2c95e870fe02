"""`--checker`: a user's own Python function (by module or by file), reasoning-gym's scoring, and
`lightopd prompts` writing task and dataset records that need no flags later."""

from __future__ import annotations

import json

import pytest

from lightopd.data.prompts import read_prompts
from lightopd.errors import InputError
from lightopd.tasks.verifiers import verifier
from tests.helpers import last_json, run_cli, write_jsonl

CHECKER = '''
def by_level(completion, reference, metadata):
    """Correct exactly when the record's level is 2: a verdict the completion cannot change."""
    return metadata["level"] == 2

def scored(completion, reference, metadata):
    return (1.0 if metadata["level"] == 2 else 0.25), "read"

def broken(completion, reference, metadata):
    return metadata["missing"]

def unsure(completion, reference, metadata):
    return "maybe"
'''


@pytest.fixture
def checker_file(tmp_path):
    path = tmp_path / "my_checks.py"
    path.write_text(CHECKER)
    return path


@pytest.fixture
def level_prompts(tmp_path):
    return write_jsonl(tmp_path / "p.jsonl", [{"prompt": "w1", "answer": "x", "level": 1},
                                              {"prompt": "w2", "answer": "y", "level": 2}])


def test_a_user_checker_decides_every_verdict(tiny_model, checker_file, level_prompts, tmp_path):
    for function, extracted in (("by_level", None), ("scored", "read")):
        result = last_json(run_cli("eval", "--model", str(tiny_model), "--prompts", str(level_prompts), "--n", "2",
                                   "--max-new-tokens", "2", "--checker", f"{checker_file}:{function}",
                                   "--log-samples", str(tmp_path / "s.jsonl")))
        assert result["accuracy"] == 0.5 and result["pass@k"]["2"] == 0.5
        logged = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
        assert [(s["prompt_id"], s["correct"], s["extracted"]) for s in logged] == [
            ("0", False, extracted), ("0", False, extracted), ("1", True, extracted), ("1", True, extracted)]
        assert logged[0]["metadata"] == {"level": 1} and logged[0]["reference"] == "x"


def test_a_checker_by_module_name_is_imported_from_the_working_directory(checker_file, monkeypatch):
    monkeypatch.chdir(checker_file.parent)
    monkeypatch.syspath_prepend(str(checker_file.parent))
    verify = verifier("my_checks:by_level")
    assert verify("anything", "x", {"level": 2}, "w1") == (True, None)
    assert verify("anything", "x", {"level": 1}, "w1") == (False, None)


@pytest.mark.parametrize("name,message", [
    ("broken", r"p.jsonl line 1: --checker .*:broken raised KeyError: 'missing'"),
    ("unsure", r"returned 'maybe'; it must return a bool, a number, or a pair"),
    ("absent", r"has no function 'absent'"),
])
def test_a_failing_user_checker_exits_2_naming_it(tiny_model, checker_file, level_prompts, name, message):
    proc = run_cli("eval", "--model", str(tiny_model), "--prompts", str(level_prompts), "--max-new-tokens", "2",
                   "--checker", f"{checker_file}:{name}", check=False)
    assert proc.returncode == 2, proc.stderr
    import re

    assert re.search(message, " ".join(proc.stderr.split())), proc.stderr


def test_an_unimportable_checker_module_is_named(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="--checker no_such_module:f: cannot import no_such_module"):
        verifier("no_such_module:f")


def test_reasoning_gym_records_and_checker(tmp_path, tiny_model):
    pytest.importorskip("reasoning_gym", reason="the reasoning-gym extra is not installed")
    out = tmp_path / "chain.jsonl"
    result = last_json(run_cli("prompts", "reasoning-gym:chain_sum", "--n", "6", "--seed", "3", "--out", str(out)))
    assert result["records"] == 6 and result["fields"] == ["answer", "id", "metadata", "question"]
    records = read_prompts(out)  # no flags: question is the prompt, answer the answer, metadata kept
    assert all(r.prompt.startswith("State the final answer") for r in records)
    verify = verifier("reasoning-gym")
    for r in records:
        assert r.metadata["metadata"]["source_dataset"] == "chain_sum"
        assert verify(f"so <answer>{r.answer}</answer>", r.answer, r.metadata, r.prompt)[0] is True
        assert verify(f"<answer>{int(r.answer) + 1}</answer>", r.answer, r.metadata, r.prompt)[0] is False
        assert verify(r.answer, r.answer, r.metadata, r.prompt)[0] is True  # no tag: the whole completion
    again = tmp_path / "again.jsonl"
    run_cli("prompts", "reasoning-gym:chain_sum", "--n", "6", "--seed", "3", "--out", str(again))
    assert again.read_text() == out.read_text()  # the seed fixes the records
    proc = run_cli("prompts", "reasoning-gym:chain_sum", "--n", "6", "--out", str(out), check=False)
    assert proc.returncode == 2 and "exists" in proc.stderr
    evaluated = last_json(run_cli("eval", "--model", str(tiny_model), "--prompts", str(out), "--max-new-tokens", "3",
                                  "--checker", "reasoning-gym"))
    assert evaluated["accuracy"] == 0.0 and evaluated["prompts_evaluated"] == 6  # a random model reads no sums


def test_prompts_from_a_source_with_a_mapping_need_no_flags_later(tmp_path):
    source = write_jsonl(tmp_path / "src.jsonl", [
        {"uid": "a", "text": "w1 w2", "gold": "#### 3", "topic": "sums"},
        {"uid": "b", "text": "w3", "gold": "#### 4", "topic": "sums"}])
    out = tmp_path / "p.jsonl"
    result = last_json(run_cli("prompts", str(source), "--prompt-field", "text", "--answer-field", "gold",
                               "--out", str(out)))
    assert result["records"] == 2
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert written[0] == {"id": "a", "prompt": "w1 w2", "answer": "#### 3", "topic": "sums"}
    assert [(r.id, r.prompt, r.answer, r.metadata) for r in read_prompts(out)] == [
        ("a", "w1 w2", "#### 3", {"topic": "sums"}), ("b", "w3", "#### 4", {"topic": "sums"})]
