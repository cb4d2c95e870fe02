"""Shared fixtures: tiny models, prompt files, stores. Helpers live in helpers.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lightopd.tiny import make_model
from tests.helpers import do_rollout, do_score, write_jsonl


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny Llama whose generation_config carries sampling defaults lightopd must ignore."""
    return make_model(
        tmp_path_factory.mktemp("models") / "student",
        generation_defaults={"do_sample": True, "temperature": 0.6, "top_k": 5, "top_p": 0.9,
                             "eos_token_id": 2, "bos_token_id": 1, "pad_token_id": 0},
    )


@pytest.fixture(scope="session")
def plain_model(tmp_path_factory) -> Path:
    """A tiny Llama whose tokenizer has no chat template."""
    return make_model(tmp_path_factory.mktemp("models") / "plain", chat_template=None, seed=1)


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    words = [f"w{i}" for i in range(40)]
    records = [{"id": f"p{i}", "prompt": " ".join(words[i % 7: i % 7 + 1 + i % 5]), "answer": str(i)}
               for i in range(10)]
    records[3] = {"id": "p3", "messages": [{"role": "user", "content": "what is w3 ?"}], "answer": "3"}
    return write_jsonl(tmp_path / "prompts.jsonl", records)


@pytest.fixture
def consistent_student(tiny_model, teacher_model, tmp_path):
    """The student with a provenance record naming the scoring teacher as its SFT teacher."""
    from lightopd.provenance import model_fingerprint, write_provenance

    student = tmp_path / "student"
    shutil.copytree(tiny_model, student)
    record = {"path": str(teacher_model), "fingerprint": model_fingerprint(teacher_model)}
    write_provenance(student, {"sft_teacher": record})
    return student


@pytest.fixture(scope="session")
def teacher_model(tmp_path_factory) -> Path:
    """A different (larger) tiny Llama with the student's vocabulary."""
    return make_model(tmp_path_factory.mktemp("models") / "teacher", seed=7, hidden=48, layers=3, logit_scale=20.0)


@pytest.fixture(scope="session")
def rollout_store(tmp_path_factory, tiny_model) -> Path:
    """A complete rollout store: 10 prompts x 2 samples in 4 shards, sampled from the student."""
    tmp = tmp_path_factory.mktemp("rollouts")
    words = [f"w{i}" for i in range(40)]
    prompts = write_jsonl(tmp / "p.jsonl", [{"id": f"p{i}", "prompt": " ".join(words[i: i + 2 + i % 6])}
                                            for i in range(10)])
    out = tmp / "store"
    do_rollout(tiny_model, prompts, out, n=2, max_new_tokens=12, prompts_per_shard=3)
    return out


@pytest.fixture(scope="session")
def teacher_store(tmp_path_factory, teacher_model, rollout_store) -> Path:
    """The rollout store scored by the teacher at k = 6."""
    out = tmp_path_factory.mktemp("teacher") / "store"
    do_score(teacher_model, rollout_store, out, top_k=6)
    return out


@pytest.fixture
def card_rollouts(tiny_model, tmp_path) -> Path:
    """A rollout store sampled at a model card's settings: 8 prompts × 2 at T = 0.6, top-p 0.95, top-k 20."""
    records = [{"id": f"p{i}", "prompt": f"w{i} w{i + 3} w{i % 4}"} for i in range(8)]
    out = tmp_path / "r"
    do_rollout(tiny_model, write_jsonl(tmp_path / "p.jsonl", records), out, n=2, max_new_tokens=10,
               temperature=0.6, top_p=0.95, top_k=20)
    return out
