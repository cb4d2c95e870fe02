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

pytestmark = pytest.mark.slow  # end-to-end runs of real processes: `make test-fast` leaves them out

TRAIN = ["--steps", "5", "--batch-size", "4", "--lr", "3e-4", "--micro-batch-tokens", "24", "--seed", "3"]


def assert_same_training(a: dict, b: dict) -> None:
    """Two runs' weights, equal up to float32 summation order. Two ranks sum a step's gradients in
    another order than one process; after 5 Adam steps a weight whose gradient is tiny (a rare
    token's embedding) can differ by a few 1e-5, since Adam divides by the gradient's own scale,
    while the rest agree to 1e-7. A rank's gradient left out moves most weights by about the
    learning rate (3e-4); a mean over the wrong count shows in grad_norm."""
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=0)
        assert (a[key] - b[key]).abs().mean() < 1e-6, key


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, ranks: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node RANKS -m lightopd ARGS` on this machine (gloo on CPU)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--nnodes", "1",
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "--", "lightopd", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def prompt_ids(groups: list[pa.RecordBatch]) -> list[str]:
    return [g.column("prompt_id")[0].as_py() for g in groups]


def prompts_in(store: Path, names: list[str]) -> list[str]:
    return [p for name in names for p in dict.fromkeys(pq.read_table(store / name, columns=["prompt_id"]).column(0)
                                                       .to_pylist())]


def test_ranks_share_each_step_and_cover_the_store_once(teacher_store):
    """Every rank runs the same stream; a step's groups go one to each rank, balanced by tokens."""
    manifest = open_store(teacher_store)
    every = sorted(prompts_in(teacher_store, [s["name"] for s in manifest["shards"]]))
    for world in (1, 2):
        ranks = [S.StepStream([(teacher_store, manifest)], [], seed=0, buffer_size=4, rank=r, world=world)
                 for r in range(world)]
        one = S.StepStream([(teacher_store, manifest)], [], seed=0, buffer_size=4)
        seen = []
        for _ in range(len(every) // 2):  # one epoch: 2 samples per prompt, 4 rows (2 prompts) per step
            step = prompt_ids(one.take_step(4))
            shares = [prompt_ids(r.take_step(4)) for r in ranks]
            assert sorted(p for ids in shares for p in ids) == sorted(step)  # the step, split
            assert all(shares)  # every rank trains on something
            seen += step
        assert sorted(seen) == every, world  # every prompt once per epoch, by one rank
        assert {r.cursor() for r in ranks} == {one.cursor()}


def test_shares_are_balanced_by_tokens():
    groups = [pa.RecordBatch.from_pylist([{"prompt_id": f"p{i}", "prompt_ids": [1] * n, "completion_ids": [2] * n}])
              for i, n in enumerate([50, 10, 40, 30, 20, 5])]
    shares = [prompt_ids(S.share(groups, r, 2)) for r in range(2)]
    assert shares == [["p0", "p1", "p4"], ["p2", "p3", "p5"]]  # 160 and 150 tokens; step order kept
    assert prompt_ids(S.share(groups, 0, 1)) == prompt_ids(groups)


def test_one_shard_store_trains_on_two_ranks_as_one_process(consistent_student, teacher_store, tmp_path):
    """A store of one shard (the case that used to cap the world size at the shard count)."""
    one_shard = tmp_path / "one-shard"
    shutil.copytree(teacher_store, one_shard)
    manifest = json.loads((one_shard / "manifest.json").read_text())
    names = [s["name"] for s in manifest["shards"]]
    table = pa.concat_tables([pq.read_table(one_shard / n) for n in names])
    for n in names:
        (one_shard / n).unlink()
    from lightopd.data.writer import StoreWriter

    meta = {k: v for k, v in manifest.items() if k not in ("shards", "num_shards", "complete", "rows", "tokens",
                                                            "store_id", "format", "format_version", "created",
                                                            "lightopd_version")}
    (one_shard / "manifest.json").unlink()
    writer = StoreWriter(one_shard, manifest["format"], meta, num_shards=1)
    writer.write_shard(0, table, sum(len(c) for c in table.column("completion_ids").to_pylist()))
    assert len(open_store(one_shard)["shards"]) == 1
    common = ["--student", str(consistent_student), "--data", str(one_shard), "--objective", "rkl", *TRAIN,
              "--allow-teacher-mismatch"]
    single = run_cli("train", *common, "--out", str(tmp_path / "one"))
    proc = torchrun("train", *common, "--out", str(tmp_path / "two"))
    assert proc.returncode == 0, proc.stderr
    assert last_json(single)["tokens"] == last_json(proc)["tokens"]
    for a, b in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert_same_training(a, b)


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
    single = run_cli("train", *common, "--out", str(tmp_path / "one"))
    proc = torchrun("train", *common, "--out", str(tmp_path / "two"), *(["--fsdp"] if fsdp else []))
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 1  # only rank 0 prints its result
    assert last_json(proc)["steps"] == 5 and last_json(single)["tokens"] == last_json(proc)["tokens"]
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [m["rows"] for m in two] == [4] * 5 and [m["tokens"] for m in one] == [m["tokens"] for m in two]
    for a, b in zip(one, two, strict=True):  # Adam hides a gradient's scale; the logged norm does not
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=3e-5)
    start, a, b = weights(consistent_student), weights(tmp_path / "one"), weights(tmp_path / "two")
    assert any(not torch.equal(start[k], b[k]) for k in b)  # it trained
    assert_same_training(a, b)
    provenance = json.loads((tmp_path / "two" / "lightopd.json").read_text())
    assert provenance["parallel"] == {"world_size": 2, "fsdp": fsdp}


@pytest.mark.parametrize("fsdp", [False, True])
def test_two_rank_resume_reproduces_the_uninterrupted_run(fsdp, consistent_student, teacher_store, tmp_path):
    common = ["--student", str(consistent_student), "--data", str(teacher_store), "--objective", "jsd", *TRAIN,
              "--save-every", "2", "--schedule", "cosine", *(["--fsdp", "--gradient-checkpointing"] if fsdp else [])]
    proc = torchrun("train", *common, "--out", str(tmp_path / "full"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    kept = tmp_path / "full" / "checkpoints" / "step-2"
    if fsdp:  # each rank's own shards (torch.distributed.checkpoint), nothing gathered
        assert (kept / "sharded" / ".metadata").is_file() and not (kept / "model.safetensors").exists()
        assert len(list((kept / "sharded").glob("*.distcp"))) == 2
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

    if fsdp:
        return
    # the same checkpoint in one process: the data order goes on; a warning says what cannot
    one = tmp_path / "one"
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-2", one / "checkpoints" / "step-2")
    (one / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")
    proc = run_cli("train", *common, "--out", str(one), "--resume")
    assert "written by 2 rank(s) and this run has 1" in proc.stderr
    for m, f in zip(metrics(one), metrics(tmp_path / "full"), strict=True):
        assert (m["step"], m["tokens"], m["rows"]) == (f["step"], f["tokens"], f["rows"])
        assert m["loss"] == pytest.approx(f["loss"], rel=1e-5, abs=1e-6)
    a, b = weights(tmp_path / "full"), weights(one)
    assert_same_training(a, b)


def test_fsdp_trains_a_tied_qwen3_student_as_one_process(consistent_student, teacher_store, tmp_path):
    """Built empty on every rank and filled from rank 0: a Qwen3 whose output layer is its input embedding
    (one parameter under two names) trains as in one process and is written with the weight once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightopd.tiny import build_model

    student = build_model(tmp_path / "qwen3", AutoTokenizer.from_pretrained(consistent_student), arch="qwen3",
                          hidden=32, heads=4, kv_heads=2, logit_scale=1.0)
    common = ["--student", str(student), "--data", str(teacher_store), "--objective", "rkl", *TRAIN,
              "--steps", "3", "--allow-off-policy", "--allow-teacher-mismatch"]
    run_cli("train", *common, "--out", str(tmp_path / "one"))
    proc = torchrun("train", *common, "--out", str(tmp_path / "two"), "--fsdp")
    assert proc.returncode == 0, proc.stderr
    assert [m["loss"] for m in metrics(tmp_path / "one")] == pytest.approx([m["loss"] for m in
                                                                           metrics(tmp_path / "two")], rel=1e-5)
    start, a, b = weights(student), weights(tmp_path / "one"), weights(tmp_path / "two")
    assert a.keys() == b.keys() == start.keys() and "lm_head.weight" not in b
    assert not torch.equal(start["model.embed_tokens.weight"], b["model.embed_tokens.weight"])  # it trained
    assert_same_training(a, b)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "two")
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_fsdp_in_bfloat16_keeps_float32_shards(consistent_student, teacher_store, tmp_path):
    """--dtype bfloat16 under --fsdp: forwards and all-gathers in bf16 (MixedPrecisionPolicy), the weights
    and AdamW state float32 shards. One process computes in bf16 autocast over float32 weights: the same
    numbers to bf16 rounding, where float32 compute differs."""
    import torch.distributed.checkpoint as dcp

    common = ["--student", str(consistent_student), "--data", str(teacher_store), "--objective", "rkl", *TRAIN,
              "--steps", "2", "--save-every", "1"]
    run_cli("train", *common, "--out", str(tmp_path / "fp32"))
    run_cli("train", *common, "--out", str(tmp_path / "one"), "--dtype", "bfloat16")
    proc = torchrun("train", *common, "--out", str(tmp_path / "two"), "--dtype", "bfloat16", "--fsdp")
    assert proc.returncode == 0, proc.stderr
    fp32, one, two = (metrics(tmp_path / d)[0]["loss"] for d in ("fp32", "one", "two"))
    assert two == pytest.approx(one, rel=1e-4) and abs(two - fp32) > 1e-4  # bf16 compute, not float32
    saved = dcp.FileSystemReader(str(tmp_path / "two" / "checkpoints" / "step-1" / "sharded")).read_metadata()
    dtypes = {m.properties.dtype for k, m in saved.state_dict_metadata.items() if hasattr(m, "properties")}
    assert dtypes == {torch.float32}  # weights and both AdamW moments
    assert all(v.dtype == torch.float32 for v in weights(tmp_path / "two").values())  # the student's own dtype


def test_a_batch_without_a_group_per_rank_is_refused(consistent_student, teacher_store, tmp_path):
    proc = torchrun("train", "--student", str(consistent_student), "--data", str(teacher_store),
                    "--out", str(tmp_path / "o"), "--objective", "rkl", "--steps", "1", "--batch-size", "3")
    assert proc.returncode != 0
    assert "--batch-size 3 is less than one prompt group (2 sample(s)) per rank for 2 ranks" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_a_step_needs_a_prompt_group_per_rank():
    S.check_batch(8, 4, 2)
    with pytest.raises(InputError, match="--batch-size 4 is less than one prompt group .* per rank for 2 ranks"):
        S.check_batch(4, 4, 2)
