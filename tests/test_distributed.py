"""`torchrun ... -m lightopd train` with 2 gloo ranks: the same training as one process, disjoint
data per rank, resume, and the errors a launch can hit."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lightopd.data import stream as S
from lightopd.data.store import open_store
from lightopd.errors import InputError
from tests.helpers import last_json, metrics, run_cli, weights

TRAIN = ["--steps", "5", "--batch-size", "4", "--lr", "3e-4", "--micro-batch-tokens", "24", "--seed", "3"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, ranks: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node RANKS -m lightopd ARGS` on this machine (gloo on CPU)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--nnodes", "1",
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "lightopd", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def prompt_ids(groups: list[pa.RecordBatch]) -> list[str]:
    return [g.column("prompt_id")[0].as_py() for g in groups]


def prompts_in(store: Path, names: list[str]) -> list[str]:
    return [p for name in names for p in dict.fromkeys(pq.read_table(store / name, columns=["prompt_id"]).column(0)
                                                       .to_pylist())]


def test_ranks_read_disjoint_parts_that_cover_the_store(teacher_store):
    manifest = open_store(teacher_store)
    every = sorted(prompts_in(teacher_store, [s["name"] for s in manifest["shards"]]))
    for parts, world in [(2, 2), (4, 2), (4, 4)]:
        split = S.split_shards(manifest, parts)
        read = []  # one epoch of every part, by the rank that owns it
        for rank in range(world):
            stream = S.StepStream(teacher_store, manifest, [], seed=0, buffer_size=4, parts=parts, rank=rank,
                                  world=world)
            assert sorted(stream.parts) == list(range(rank, parts, world))
            for p, part in stream.parts.items():
                read.append(prompt_ids([next(part) for _ in prompts_in(teacher_store, split[p])]))
        assert sorted(p for ids in read for p in ids) == every, (parts, world)  # every prompt once, by one rank


def test_one_process_owning_two_parts_takes_the_steps_two_ranks_take(teacher_store):
    manifest = open_store(teacher_store)
    one = S.StepStream(teacher_store, manifest, [], seed=5, buffer_size=3, parts=2)
    ranks = [S.StepStream(teacher_store, manifest, [], seed=5, buffer_size=3, parts=2, rank=r, world=2)
             for r in range(2)]
    for _ in range(12):
        assert prompt_ids(one.take_step(2)) == prompt_ids(ranks[0].take_step(2)) + prompt_ids(ranks[1].take_step(2))
    assert one.cursors() == {**ranks[0].cursors(), **ranks[1].cursors()}


@pytest.mark.parametrize("objective,fsdp,checkpointing", [("opd-seq", False, False), ("rkl", False, True),
                                                         ("rkl", True, True)])
def test_two_ranks_train_the_weights_of_one_process(objective, fsdp, checkpointing, consistent_student, teacher_store,
                                                    tmp_path):
    """opd-seq normalises advantages by a std over the whole step: it must cross ranks. Under FSDP2 each rank
    holds half of every weight; with 32-token micro-batches the ranks' micro-batch counts differ in 4 of
    the 5 steps, and the rank with fewer pads to the other's count (every forward gathers from both).
    Activation checkpointing, packed micro-batches and 3-position loss chunks change nothing."""
    common = ["--student", str(consistent_student), "--data", str(teacher_store), "--objective", objective, *TRAIN,
              *(["--micro-batch-tokens", "32"] if fsdp else []),
              *(["--gradient-checkpointing", "--packing", "on", "--loss-chunk-tokens", "3"] if checkpointing else [])]
    single = run_cli("train", *common, "--out", str(tmp_path / "one"), "--set", "data_parts=2")
    proc = torchrun("train", *common, "--out", str(tmp_path / "two"), *(["--fsdp"] if fsdp else []))
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 1  # only rank 0 prints its result
    assert last_json(proc)["steps"] == 5 and last_json(single)["tokens"] == last_json(proc)["tokens"]
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [m["rows"] for m in two] == [4] * 5 and [m["tokens"] for m in one] == [m["tokens"] for m in two]
    for a, b in zip(one, two, strict=True):  # Adam hides a gradient's scale; the logged norm does not
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    start, a, b = weights(consistent_student), weights(tmp_path / "one"), weights(tmp_path / "two")
    assert any(not torch.equal(start[k], b[k]) for k in b)  # it trained
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)
    provenance = json.loads((tmp_path / "two" / "lightopd.json").read_text())
    assert provenance["parallel"] == {"world_size": 2, "data_parts": 2, "fsdp": fsdp}


@pytest.mark.parametrize("fsdp", [False, True])
def test_two_rank_resume_reproduces_the_uninterrupted_run(fsdp, consistent_student, teacher_store, tmp_path):
    common = ["--student", str(consistent_student), "--data", str(teacher_store), "--objective", "jsd", *TRAIN,
              "--save-every", "2", "--schedule", "cosine", *(["--fsdp", "--gradient-checkpointing"] if fsdp else [])]
    assert torchrun("train", *common, "--out", str(tmp_path / "full")).returncode == 0
    cut = tmp_path / "cut"  # as if both ranks died after the step-2 checkpoint
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-2", cut / "checkpoints" / "step-2")
    lines = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    (cut / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n")  # a step logged after the checkpoint
    proc = torchrun("train", *common, "--out", str(cut), "--resume")
    assert proc.returncode == 0, proc.stderr
    assert last_json(proc)["resumed_from"] == "step-2"
    a, b = weights(tmp_path / "full"), weights(cut)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert metrics(tmp_path / "full") == [{**m, "tokens_per_s": f["tokens_per_s"]}
                                          for m, f in zip(metrics(cut), metrics(tmp_path / "full"), strict=True)]

    # the same checkpoint in one process: refused, naming the world size it needs
    proc = run_cli("train", *common, "--out", str(cut), "--resume", check=False)
    assert proc.returncode == 2
    assert "2 rank(s)" in proc.stderr and "same world size" in proc.stderr


def test_world_size_must_divide_the_batch(consistent_student, teacher_store, tmp_path):
    proc = torchrun("train", "--student", str(consistent_student), "--data", str(teacher_store),
                    "--out", str(tmp_path / "o"), "--objective", "rkl", "--steps", "1", "--batch-size", "3")
    assert proc.returncode != 0
    assert "--batch-size 3 is not divisible by the world size" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_data_parts_checks(teacher_store):
    manifest = open_store(teacher_store)  # 4 shards

    def parts(batch_size: int, requested: int | None, world: int) -> int:
        return S.data_parts_for(batch_size, requested, manifest, world, str(teacher_store))

    assert parts(4, None, 2) == 2
    assert parts(8, 4, 2) == 4
    with pytest.raises(InputError, match="data_parts 3 is not a multiple of the world size"):
        parts(6, 3, 2)
    with pytest.raises(InputError, match="--batch-size 6 is not divisible by data_parts 4"):
        parts(6, 4, 1)
    with pytest.raises(InputError, match="4 shard\\(s\\) cannot be split into 8"):
        parts(8, 8, 1)
