"""Fingerprints change with weights or vocabulary and with nothing else; provenance round-trips."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightopd import provenance
from lightopd.engine import models
from lightopd.tiny import default_words, make_model, make_tokenizer

WORDS = default_words(40)


def test_model_fingerprint_follows_the_weights(tmp_path):
    a = make_model(tmp_path / "a", seed=0)
    copy = tmp_path / "copy"
    shutil.copytree(a, copy)
    assert provenance.model_fingerprint(a) == provenance.model_fingerprint(copy), "a copy is the same model"
    assert provenance.model_fingerprint(a) != provenance.model_fingerprint(make_model(tmp_path / "b", seed=1))
    weights = copy / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.norm.weight"] = tensors["model.norm.weight"] + 1e-3
    save_file(tensors, weights, metadata={"format": "pt"})
    assert provenance.model_fingerprint(a) != provenance.model_fingerprint(copy)


def test_large_weight_files_are_sampled_not_reread(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "WHOLE_FILE_LIMIT", 1024)
    monkeypatch.setattr(provenance, "BLOCK_SIZE", 256)
    a = make_model(tmp_path / "a", seed=0, hidden=64)
    before = provenance.model_fingerprint(a)
    tensors = load_file(a / "model.safetensors")
    tensors = {k: v + 0.01 for k, v in tensors.items()}  # what a training step does: every weight moves
    save_file(tensors, a / "model.safetensors", metadata={"format": "pt"})
    assert provenance.model_fingerprint(a) != before


def test_tokenizer_fingerprint_is_the_vocabulary():
    base = provenance.tokenizer_fingerprint(make_tokenizer(WORDS))
    assert provenance.tokenizer_fingerprint(make_tokenizer(WORDS, chat_template=None)) == base
    assert provenance.tokenizer_fingerprint(make_tokenizer(WORDS + ["extra"])) != base
    assert provenance.tokenizer_fingerprint(make_tokenizer(list(reversed(WORDS)))) != base
    chat = make_tokenizer(WORDS)
    chat.eos_token = "w39"  # a chat checkpoint of the same family: other end token, same ids
    assert provenance.tokenizer_fingerprint(chat) == base


def test_end_tokens_are_compared_apart_from_the_vocabulary():
    assert provenance.eos_mismatch([2], [2, 7], "m", "the student") is None
    warning = provenance.eos_mismatch([7], [2], "m", "the student")
    assert "end with token ids [7]" in warning and "stops at [2]" in warning and "eos_token_id" in warning


def test_context_length_of_a_nested_text_config():
    from transformers import Gemma3Config

    config = Gemma3Config(text_config={"max_position_embeddings": 4096})
    assert models.context_length(config) == 4096


def test_padded_output_rows_and_a_tokenizer_too_large(tmp_path):
    from lightopd.errors import InputError

    padded = make_model(tmp_path / "padded", vocab_rows=64)
    tokenizer = make_tokenizer(WORDS)
    info = models.model_info(padded, tokenizer)
    assert (info.vocab, info.output_rows) == (len(tokenizer), 64)
    small = make_model(tmp_path / "small", default_words(20))
    with pytest.raises(InputError, match="its tokenizer has 50 ids but its output layer only 30 rows"):
        models.model_info(small, tokenizer)


def test_provenance_round_trip(tmp_path):
    assert provenance.read_provenance(tmp_path) is None
    provenance.write_provenance(tmp_path, {"sft_teacher": {"path": "/t", "fingerprint": "sha256:x"}})
    assert provenance.read_provenance(tmp_path)["sft_teacher"]["fingerprint"] == "sha256:x"


def test_auto_dtype_is_float32_on_cpu():
    assert models.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert models.resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


@pytest.mark.slow
def test_a_tiny_models_vocabulary_from_any_prompt_file(tmp_path):
    """`python -m lightopd.tiny --vocab-from` reads Parquet and CSV as prompt sources (their records'
    strings), text as text, and names a file it cannot read (exit 2, no traceback)."""
    import subprocess
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    table = pa.table({"question": ["how many apples ?"], "answer": ["#### 3"], "n": [1]})
    pq.write_table(table, tmp_path / "g.parquet")
    (tmp_path / "g.csv").write_text("question,answer\nhow many pears ?,#### 5\n")
    (tmp_path / "notes.txt").write_text("plain words here\n")
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)))
    run = [sys.executable, "-m", "lightopd.tiny", str(tmp_path / "m")]
    for name in ("g.parquet", "g.csv", "notes.txt"):
        run += ["--vocab-from", str(tmp_path / name)]
    subprocess.run(run, check=True, capture_output=True)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "m")
    for text in ("how many apples ? #### 3", "how many pears ? #### 5", "plain words here"):
        assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text
    assert tokenizer.unk_token_id not in tokenizer("apples pears #### 5")["input_ids"]
    bad = subprocess.run([sys.executable, "-m", "lightopd.tiny", str(tmp_path / "b"), "--vocab-from",
                          str(tmp_path / "blob.bin")], capture_output=True, text=True)
    assert bad.returncode == 2 and "not a text file" in bad.stderr and "Traceback" not in bad.stderr
