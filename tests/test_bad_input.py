"""Bad input: exit code 2, one message naming the file/record/field, no traceback, no store."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightopd.tiny import make_model
from tests.helpers import cli, write_jsonl


@pytest.fixture
def rollout_bad(monkeypatch, capsys, tiny_model, tmp_path):
    def run(prompts: Path | str, *extra: str, model: Path | str = tiny_model) -> str:
        out = tmp_path / "out"
        code, stdout, stderr = cli(monkeypatch, capsys, "rollout", "--model", str(model), "--prompts", str(prompts),
                                   "--out", str(out), "--max-new-tokens", "4", *extra)
        assert code == 2, stderr
        assert "Traceback" not in stderr and stdout == ""
        assert stderr.startswith("error: ") and len(stderr.strip().splitlines()) == 1, stderr
        assert not (out / "manifest.json").exists(), "bad input must not leave a store"
        return stderr

    return run


def test_missing_prompt_file(rollout_bad, tmp_path):
    assert "nope.jsonl: no such file" in rollout_bad(tmp_path / "nope.jsonl")


def test_malformed_json_names_the_line(rollout_bad, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "w1"}\n\n{"prompt": "w2"\n')
    err = rollout_bad(path)
    assert f"{path} line 3: not valid JSON" in err


def test_both_prompt_and_messages(rollout_bad, tmp_path):
    both = {"prompt": "w1", "messages": [{"role": "user", "content": "w1"}]}
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "w1"}, both])
    assert "line 2: record has both of 'prompt' and 'messages'" in rollout_bad(path)


def test_neither_prompt_nor_messages(rollout_bad, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "answer": "3"}])
    assert "line 1: record has neither of 'prompt' and 'messages'" in rollout_bad(path)


def test_unknown_field_is_named(rollout_bad, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "w1", "anwser": "3"}])
    assert "line 1: unknown field 'anwser'" in rollout_bad(path)


def test_wrong_field_types(rollout_bad, tmp_path):
    assert "field 'prompt' must be a string" in rollout_bad(write_jsonl(tmp_path / "a.jsonl", [{"prompt": 3}]))
    assert "field 'messages'[0]" in rollout_bad(write_jsonl(tmp_path / "b.jsonl", [{"messages": [{"role": "user"}]}]))
    duplicate = write_jsonl(tmp_path / "c.jsonl", [{"id": "x", "prompt": "w1"}] * 2)
    assert "line 2: duplicate id 'x'" in rollout_bad(duplicate)


def test_empty_file(rollout_bad, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n")
    assert "holds no records" in rollout_bad(path)


def test_messages_without_chat_template(rollout_bad, plain_model, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "w1"}, {"messages": [{"role": "user", "content": "w1"}]}])
    err = rollout_bad(path, model=plain_model)
    assert "line 2: field 'messages' needs a chat template" in err


def test_model_directory_missing(rollout_bad, prompts_file, tmp_path):
    assert "no such model directory" in rollout_bad(prompts_file, model=tmp_path / "no-model")


def test_directory_without_weights(rollout_bad, prompts_file, tmp_path):
    (tmp_path / "cfg-only").mkdir()
    (tmp_path / "cfg-only" / "config.json").write_text("{}")
    assert "no *.safetensors weights" in rollout_bad(prompts_file, model=tmp_path / "cfg-only")


def test_prompt_longer_than_context(rollout_bad, tmp_path):
    model = make_model(tmp_path / "short", context=8)
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "w1"}, {"prompt": " ".join(f"w{i}" for i in range(12))}])
    err = rollout_bad(path, model=model)
    assert "line 2: prompt is 13 tokens" in err and "context of 8 tokens" in err


@pytest.mark.parametrize("option,value,message", [
    ("--n", "0", "--n: samples per prompt must be >= 1"),
    ("--temperature", "-0.5", "--temperature: must be >= 0"),
    ("--top-p", "0", "--top-p: must be in (0, 1]"),
    ("--max-new-tokens", "0", "--max-new-tokens: must be >= 1"),
    ("--dtype", "float8", "--dtype: must be one of"),
])
def test_bad_option_values(rollout_bad, prompts_file, option, value, message):
    assert message in rollout_bad(prompts_file, option, value)


def test_option_of_wrong_type(monkeypatch, capsys, tiny_model, prompts_file, tmp_path):
    code, _, err = cli(monkeypatch, capsys, "rollout", "--model", str(tiny_model), "--prompts", str(prompts_file),
                       "--out", str(tmp_path / "o"), "--n", "two")
    assert code == 2 and "--n" in err and "Traceback" not in err


def test_out_is_a_non_store_directory(rollout_bad, prompts_file, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert "not empty and holds no lightopd store" in rollout_bad(prompts_file)


def test_inspect_of_a_non_store(monkeypatch, capsys, tmp_path):
    code, _, err = cli(monkeypatch, capsys, "inspect", str(tmp_path))
    assert code == 2 and "not a lightopd store" in err
