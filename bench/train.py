"""Benchmark `lightopd train` on a 32k-vocabulary student; prints JSON.

In one process, on the same steps (same groups, same micro-batches):
- lightopd's optimizer step with the lightning-opd objective and every diagnostic;
- a plain SFT step: the model's own forward (full logits), cross-entropy on the completion
  tokens, backward, AdamW: the physical limit for offline OPD, which reads its signal from disk.
The cost of verified reads (hashing every shard as it is read) against training on its tokens.
Then the peak resident memory of `lightopd train` (fixed steps, a 16-group shuffle buffer) on a
store and on one 10x larger: streaming keeps it flat.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, make_bench_model, peak_rss_mb  # noqa: E402

from lightopd.config import RolloutConfig, ScoreConfig  # noqa: E402
from lightopd.data.batching import pack_by_tokens  # noqa: E402
from lightopd.data.reader import shard_problem  # noqa: E402
from lightopd.data.rows import ShardLayout  # noqa: E402
from lightopd.data.store import open_store, sampling_of, store_columns  # noqa: E402
from lightopd.data.stream import GroupStream  # noqa: E402
from lightopd.engine import models  # noqa: E402
from lightopd.layering import train_settings  # noqa: E402
from lightopd.memory import release_freed_memory  # noqa: E402
from lightopd.objectives import lookup  # noqa: E402
from lightopd.stages import rollout, score  # noqa: E402
from lightopd.stages.train import student_temperature  # noqa: E402
from lightopd.training.trainer import TrainData, Trainer  # noqa: E402

BUFFER = 16  # prompt groups in the shuffle buffer of the memory runs


def make_store(tmp: Path, student: Path, teacher: Path, prompts: int, name: str, max_new: int) -> Path:
    rng = random.Random(prompts)
    path = tmp / f"{name}.jsonl"
    path.write_text("".join(
        json.dumps({"id": f"p{i}", "prompt": " ".join(f"w{rng.randrange(31990)}" for _ in range(rng.randint(16, 64)))})
        + "\n" for i in range(prompts)))
    rollouts = tmp / f"{name}-rollouts"
    rollout.run(RolloutConfig.of(model=str(student), prompts=str(path), out=str(rollouts), n=2,
                                 max_new_tokens=max_new, prompts_per_shard=32, device="cpu"))
    store = tmp / f"{name}-teacher"
    score.run(ScoreConfig.of(teacher=str(teacher), data=str(rollouts), out=str(store), top_k=32, device="cpu"))
    return store


def bench_world(tmp: Path, name: str) -> tuple[Path, Path, Path]:
    """The bench student (32k vocabulary), a deeper teacher, and a teacher store of 48 prompts × 2
    samples of up to 96 tokens: (student, teacher, store)."""
    student = make_bench_model(tmp / "student", seed=0)
    teacher = make_bench_model(tmp / "teacher", seed=1, layers=6)
    return student, teacher, make_store(tmp, student, teacher, 48, name, 96)


def sft_step(model, optimizer, rows, micro_batch_tokens) -> None:
    lengths = [len(r["prompt_ids"]) + len(r["completion_ids"]) for r in rows]
    tokens = sum(len(r["completion_ids"]) for r in rows)
    for micro in pack_by_tokens(lengths, micro_batch_tokens):
        width = max(lengths[i] for i in micro)
        ids = torch.zeros((len(micro), width), dtype=torch.long)
        labels = torch.full_like(ids, -100)
        for j, i in enumerate(micro):
            p, c = rows[i]["prompt_ids"], rows[i]["completion_ids"]
            ids[j, : len(p) + len(c)] = torch.tensor(p + c)
            labels[j, len(p): len(p) + len(c)] = torch.tensor(c)
        mask = (labels != -100) | (torch.arange(width) < torch.tensor([lengths[i] for i in micro])[:, None])
        logits = model(input_ids=ids, attention_mask=mask.long()).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                 labels[:, 1:].reshape(-1), reduction="sum", ignore_index=-100)
        (loss / tokens).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    release_freed_memory()  # as the CLI does
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        student, teacher, small = bench_world(tmp, "small")

        cfg, params = train_settings({"student": str(student), "data": str(small), "out": str(tmp / "unused"),
                                      "batch_size": args.batch_size, "lr": 1e-5})
        manifest = open_store(small)
        columns = ["prompt_ids", "completion_ids", *store_columns(manifest)]
        stream = GroupStream(small, manifest, [s["name"] for s in manifest["shards"]], columns, 0, 64)
        steps = [stream.take_rows(args.batch_size) for _ in range(args.steps + 1)]
        tokens = sum(len(c) for groups in steps[1:] for g in groups for c in g.column("completion_ids").to_pylist())

        torch.manual_seed(0)
        model = models.load_model(student, torch.device("cpu"), torch.float32)
        objective = lookup("lightning-opd")(student_temperature(params, sampling_of(manifest)), args.steps)
        data = TrainData(store_columns(manifest), 32, 32000)
        trainer = Trainer(cfg, objective, model, data, args.steps)
        trainer.step(steps[0])  # warm-up
        start = time.perf_counter()
        for groups in steps[1:]:
            trainer.step(groups)
        opd_s = time.perf_counter() - start

        torch.manual_seed(0)
        model = models.load_model(student, torch.device("cpu"), torch.float32)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        sft_step(model, optimizer, [r for g in steps[0] for r in g.to_pylist()], cfg.micro_batch_tokens)
        start = time.perf_counter()
        for groups in steps[1:]:
            sft_step(model, optimizer, [r for g in groups for r in g.to_pylist()], cfg.micro_batch_tokens)
        sft_s = time.perf_counter() - start

        # verified reads: every shard is hashed and its identity checked each time it is read (once an
        # epoch); compared with training on the same tokens
        start = time.perf_counter()
        for _ in range(3):
            for entry in manifest["shards"]:
                assert shard_problem(small, entry, manifest["store_id"]) is None
        verify_s = (time.perf_counter() - start) / 3
        verify_fraction = verify_s / (manifest["tokens"] * opd_s / tokens)
        # ... and every row's shape against the shard's layout (k per token, lengths, id ranges), as
        # every reader does: the checks alone, not the Parquet decoding that training needs anyway
        rows_s = 0.0
        for _ in range(3):
            for entry in manifest["shards"]:
                with pq.ParquetFile(small / entry["name"]) as pf:
                    layout = ShardLayout(small / entry["name"], pf.schema_arrow, manifest)
                    for batch in pf.iter_batches():
                        start = time.perf_counter()
                        layout.check(batch, 0)
                        rows_s += time.perf_counter() - start
        rows_s /= 3

        large = make_store(tmp, student, teacher, 480, "large", 96)
        peaks = {}
        for name, store in (("store_1x", small), ("store_10x", large)):
            peaks[name] = {
                "tokens_in_store": open_store(store)["tokens"],
                "peak_rss_mb": round(peak_rss_mb([
                    sys.executable, "-m", "lightopd", "train", "--student", str(student), "--data", str(store),
                    "--out", str(tmp / f"out-{name}"), "--steps", "8", "--batch-size", str(args.batch_size),
                    "--allow-teacher-mismatch", "--device", "cpu",
                    # a shuffle buffer smaller than either store, so both runs hold as many groups: the
                    # default (256 groups) holds all 48 of the small store but 256 of the large one
                    "--shuffle-buffer", str(BUFFER)]), 1),
            }

    print(json.dumps({
        "benchmark": "train",
        "machine": machine(),
        "student": {"vocab": 32000, "hidden": 256, "layers": 4},
        "workload": {"steps_timed": args.steps, "batch_size": args.batch_size, "completion_tokens": tokens,
                     "micro_batch_tokens": cfg.micro_batch_tokens, "objective": "lightning-opd", "top_k": 32},
        "lightopd_tokens_per_s": round(tokens / opd_s, 1),
        "plain_sft_step_tokens_per_s": round(tokens / sft_s, 1),
        "ratio_vs_sft_step": round(sft_s / opd_s, 2),
        "verified_reads": {"seconds_per_epoch_of_the_store": round(verify_s, 4),
                           "fraction_of_training_time": round(verify_fraction, 5),
                           "row_checks_seconds_per_epoch": round(rows_s, 4),
                           "row_checks_fraction_of_training_time": round(rows_s / (manifest["tokens"] * opd_s / tokens),
                                                                         5)},
        "memory": {"shuffle_buffer_groups": BUFFER, **peaks},
    }))


if __name__ == "__main__":
    main()
