"""From a record to the ids fed to the model: chat templates (auto/always/never, system prompt,
template options such as Qwen3's enable_thinking), and prompts too long for the model. Expected ids
are written out by hand and tokenized as plain text, not rendered by the code under test."""

from __future__ import annotations

import json

import pytest

from lightopd.data.chat import ChatSettings, Renderer, speaks_chat
from lightopd.data.fields import PromptRecord
from lightopd.data.prompts import encode_all
from lightopd.engine.models import load_tokenizer
from lightopd.errors import InputError
from lightopd.tiny import CHAT_MODEL_TEMPLATE, CHAT_MODEL_WORDS, default_words, make_model
from tests.helpers import last_json, read_rows, run_cli, write_jsonl


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A chat model's tokenizer, shaped like Qwen3's (tiny.CHAT_MODEL_TEMPLATE): a turn ends with </s>, and
    enable_thinking=false writes an empty think block after the generation prompt."""
    return make_model(tmp_path_factory.mktemp("models") / "chat", words=default_words(40) + CHAT_MODEL_WORDS
                      + ["be", "brief"], chat_template=CHAT_MODEL_TEMPLATE, seed=3)


def record(prompt=None, messages=None) -> PromptRecord:
    return PromptRecord("0", prompt, None if messages is None else tuple(messages), None, {}, "p.jsonl line 1")


def text_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_a_chat_models_tokenizer_is_recognised(chat_model, tiny_model, plain_model):
    assert speaks_chat(load_tokenizer(chat_model), [2]) is True  # its template ends turns with </s>
    assert speaks_chat(load_tokenizer(tiny_model), [2]) is False  # a template that never stops: a base model's
    assert speaks_chat(load_tokenizer(plain_model), [2]) is False  # no template


def test_plain_prompts_under_each_chat_mode(chat_model, tiny_model):
    chat, base = load_tokenizer(chat_model), load_tokenizer(tiny_model)
    as_is = [1] + text_ids(base, "w1 w2")  # BOS, then the text
    assert Renderer(base, ChatSettings("auto"), [2]).ids(record("w1 w2")) == as_is
    assert Renderer(base, ChatSettings("always"), [2]).ids(record("w1 w2")) == text_ids(base, "user : w1 w2 "
                                                                                           "assistant :")
    assert Renderer(chat, ChatSettings("auto"), [2]).ids(record("w1 w2")) == text_ids(chat, "user : w1 w2 </s> "
                                                                                           "assistant :")
    assert Renderer(chat, ChatSettings("never"), [2]).ids(record("w1 w2")) == as_is


def test_system_prompt_and_template_options(chat_model):
    tok = load_tokenizer(chat_model)
    renderer = Renderer(tok, ChatSettings("auto", "be brief", {"enable_thinking": False}), [2])
    assert renderer.ids(record("w1")) == text_ids(tok, "system : be brief </s> user : w1 </s> assistant : <think> "
                                                       "</think>")
    own = record(messages=[{"role": "system", "content": "w9"}, {"role": "user", "content": "w1"}])
    assert renderer.ids(own) == text_ids(tok, "system : w9 </s> user : w1 </s> assistant : <think> </think>")
    thinking = Renderer(tok, ChatSettings("auto", None, {"enable_thinking": True}), [2])
    assert thinking.ids(record("w1")) == text_ids(tok, "user : w1 </s> assistant :")


def test_chat_options_that_change_nothing_are_errors(tiny_model, plain_model):
    base = Renderer(load_tokenizer(tiny_model), ChatSettings("auto", "be brief"), [2])
    with pytest.raises(InputError, match="--system-prompt: no prompt is rendered with the chat template"):
        encode_all(base, [record("w1")], context=64)
    with pytest.raises(InputError, match="--chat always: the tokenizer of --model has no chat template"):
        Renderer(load_tokenizer(plain_model), ChatSettings("always"), [2])


def test_long_prompts_error_skip_or_truncate(tiny_model):
    tok = load_tokenizer(tiny_model)
    renderer = Renderer(tok, ChatSettings("never"), [2])
    records = [record("w1 w2"), PromptRecord("1", " ".join(f"w{i}" for i in range(10)), None, None, {}, "line 2")]
    with pytest.raises(InputError, match=r"line 2: prompt is 11 tokens, over the limit of 5 \(--max-prompt-tokens\)"):
        encode_all(renderer, records, 64, max_prompt_tokens=5)
    skipped = encode_all(renderer, records, 64, max_prompt_tokens=5, long_prompts="skip")
    assert [r.id for r in skipped.records] == ["0"] and skipped.skipped == 1
    cut = encode_all(renderer, records, 64, max_prompt_tokens=5, long_prompts="truncate")
    assert cut.ids[1] == text_ids(tok, "w5 w6 w7 w8 w9") and cut.truncated == 1  # the end is kept
    # the model's context bounds every prompt, leaving a position to generate
    assert encode_all(renderer, records, 8, long_prompts="truncate").ids[1] == text_ids(tok, "w3 w4 w5 w6 w7 w8 w9")


@pytest.mark.slow
def test_rollout_and_eval_render_alike_and_the_store_records_how(chat_model, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"question": "w1 w2", "answer": "3", "level": 1},
                                                 {"question": "w3", "answer": "4", "level": 2}])
    flags = ["--system-prompt", "be brief", "--chat-template-kwargs", json.dumps({"enable_thinking": False})]
    run_cli("rollout", "--model", str(chat_model), "--prompts", str(prompts), "--out", str(tmp_path / "r"),
            "--max-new-tokens", "2", *flags)
    manifest = last_json(run_cli("inspect", str(tmp_path / "r")))
    assert manifest["prompts"]["rendering"] == {
        "chat": "auto", "plain_prompts": "user turn", "system_prompt": "be brief",
        "chat_template_kwargs": {"enable_thinking": False}, "chat_template": manifest["prompts"]["rendering"][
            "chat_template"]}
    tok = load_tokenizer(chat_model)
    rows = read_rows(tmp_path / "r")
    expected = text_ids(tok, "system : be brief </s> user : w1 w2 </s> assistant : <think> </think>")
    assert rows[0]["prompt_ids"] == expected
    assert [json.loads(r["metadata"]) for r in rows] == [{"level": 1}, {"level": 2}]
    run_cli("eval", "--model", str(chat_model), "--prompts", str(prompts), "--max-new-tokens", "2",
            "--log-samples", str(tmp_path / "samples.jsonl"), *flags)
    logged = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert logged[0]["prompt"] == tok.decode(expected, skip_special_tokens=False)
