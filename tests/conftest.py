"""Shared fixtures: tiny models, prompt files, and a runner for the real CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lightopd.tiny import make_model


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


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    words = [f"w{i}" for i in range(40)]
    records = [{"id": f"p{i}", "prompt": " ".join(words[i % 7: i % 7 + 1 + i % 5]), "answer": str(i)}
               for i in range(10)]
    records[3] = {"id": "p3", "messages": [{"role": "user", "content": "what is w3 ?"}], "answer": "3"}
    return write_jsonl(tmp_path / "prompts.jsonl", records)


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run `python -m lightopd ARGS` in a subprocess, as a user's shell script would."""
    proc = subprocess.run([sys.executable, "-m", "lightopd", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"lightopd {' '.join(args)} exited {proc.returncode}\n{proc.stderr}")
    return proc


def last_json(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_workers(*args: str, workers: int = 2) -> list[dict]:
    """`python -m lightopd ARGS --worker I/N` for I = 0..N-1, all at once; their JSON results."""
    procs = [subprocess.Popen([sys.executable, "-m", "lightopd", *args, "--worker", f"{i}/{workers}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(workers)]
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return results


def weights(directory) -> dict:
    """A trained model directory's tensors."""
    from safetensors.torch import load_file

    return load_file(Path(directory) / "model.safetensors")


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def consistent_student(tiny_model, teacher_model, tmp_path):
    """The student with a provenance record naming the scoring teacher as its SFT teacher."""
    from lightopd.models import model_fingerprint, write_provenance

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
    from lightopd import rollout
    from lightopd.config import RolloutConfig

    tmp = tmp_path_factory.mktemp("rollouts")
    words = [f"w{i}" for i in range(40)]
    prompts = write_jsonl(tmp / "p.jsonl", [{"id": f"p{i}", "prompt": " ".join(words[i: i + 2 + i % 6])}
                                            for i in range(10)])
    out = tmp / "store"
    rollout.run(RolloutConfig(model=str(tiny_model), prompts=str(prompts), out=str(out), n=2,
                              max_new_tokens=12, prompts_per_shard=3))
    return out


@pytest.fixture(scope="session")
def teacher_store(tmp_path_factory, teacher_model, rollout_store) -> Path:
    """The rollout store scored by the teacher at k = 6."""
    from lightopd import score
    from lightopd.config import ScoreConfig

    out = tmp_path_factory.mktemp("teacher") / "store"
    score.run(ScoreConfig(teacher=str(teacher_model), rollouts=str(rollout_store), out=str(out), top_k=6))
    return out
