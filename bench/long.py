"""Benchmark long sequences in `lightopd train` on a 32k-vocabulary student; prints JSON.

- Memory: the peak resident memory one training step adds (over the process before it) for one
  sequence of 512, 2048 and 8192 completion tokens, each step in a fresh process, with and without
  activation checkpointing, and with the loss in one chunk (as if unchunked) for contrast. Growth
  per extra completion token is the slope between the 2048 and 8192 points.
- Throughput: padded against padding-free (packed) micro-batches on steps whose completion
  lengths vary 10x (50 to 500 tokens), in one process, alternating.
- A train step against a plain SFT step on the same batch is bench/train.py.

Steps are built in memory as a teacher store's rows (the trainer does not care where they came
from): random prompts and completions, a random top-32 with its tail.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, make_bench_model  # noqa: E402

from lightopd.data.store import teacher_schema  # noqa: E402
from lightopd.engine import models  # noqa: E402
from lightopd.layering import train_settings  # noqa: E402
from lightopd.memory import release_freed_memory  # noqa: E402
from lightopd.objectives import lookup  # noqa: E402
from lightopd.training.trainer import TrainData, Trainer  # noqa: E402

VOCAB, K, PROMPT = 32000, 32, 64
LENGTHS = (512, 2048, 8192)


def group(completion: int, seed: int) -> pa.RecordBatch:
    """One prompt's row, as a teacher store holds it."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(10, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    lp = lambda *shape: (-torch.rand(*shape, generator=g) * 5).tolist()  # noqa: E731
    top = torch.randint(10, VOCAB, (completion * K,), generator=g).tolist()  # flat, K per token
    row = {"prompt_id": f"p{seed}", "sample_index": 0, "prompt_ids": ids(PROMPT), "completion_ids": ids(completion),
           "behavior_logprobs": lp(completion), "finish_reason": "length", "teacher_logprobs": lp(completion),
           "topk_ids": top, "topk_logprobs": pa.array(lp(completion * K), pa.float16()),
           "teacher_log_tail": lp(completion), "teacher_entropy": lp(completion)}
    schema = teacher_schema()
    return pa.RecordBatch.from_pylist([{name: row.get(name) for name in schema.names}], schema=schema)


def trainer_for(student: Path, **flags) -> Trainer:
    cfg, params = train_settings({"student": str(student), "data": "unused", "out": "unused", "lr": 1e-5,
                                  "objective": "rkl", "micro_batch_tokens": 4096, **flags})
    objective = lookup("rkl")(params.__class__(**{**params.__dict__, "temperature": 1.0}), 100)
    model = models.load_model(student, torch.device("cpu"), torch.float32)
    data = TrainData(tuple(n for n in teacher_schema().names if n != "reference_logprobs"), K, VOCAB)
    return Trainer(cfg, objective, model, data, 100)


def rss_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(field)


def one_step(student: Path, completion: int, checkpointing: bool, chunk: int) -> dict:
    """(In a child process) the peak memory one step of one `completion`-token sequence adds."""
    release_freed_memory()
    trainer = trainer_for(student, gradient_checkpointing=checkpointing, loss_chunk_tokens=chunk)
    trainer.step([group(64, 0)])  # optimizer state and allocator pools exist before the measured step
    batch = [group(completion, 1)]
    release_freed_memory()
    before = rss_kb("VmRSS:")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    start = time.perf_counter()
    trainer.step(batch)
    seconds = time.perf_counter() - start
    return {"step_peak_mb": round((rss_kb("VmHWM:") - before) / 1024, 1), "seconds": round(seconds, 2)}


def memory(student: Path) -> dict:
    out = {}
    for name, checkpointing, chunk in (("checkpointing", True, 1024), ("no_checkpointing", False, 1024),
                                       ("checkpointing_loss_in_one_chunk", True, 1 << 20)):
        points = {}
        for length in LENGTHS:
            proc = subprocess.run([sys.executable, __file__, "--child", str(student), str(length),
                                   str(int(checkpointing)), str(chunk)], capture_output=True, text=True, check=True)
            points[length] = json.loads(proc.stdout.strip().splitlines()[-1])
        slope = (points[LENGTHS[-1]]["step_peak_mb"] - points[LENGTHS[-2]]["step_peak_mb"]) * 1024 * 1024 / (
            LENGTHS[-1] - LENGTHS[-2])
        out[name] = {"step_peak_mb": {str(n): p["step_peak_mb"] for n, p in points.items()},
                     "step_seconds": {str(n): p["seconds"] for n, p in points.items()},
                     "bytes_per_extra_completion_token": round(slope),
                     "share_of_one_fp32_vocab_row": round(slope / (VOCAB * 4), 3)}
    return out


def throughput(student: Path, steps: int, rounds: int) -> dict:
    """Padded vs packed tokens/s on the same skewed steps (completion lengths 50-500, 32 rows a step)."""
    g = torch.Generator().manual_seed(0)
    batches = [[group(int(n), 100 * s + i) for i, n in enumerate(torch.randint(50, 501, (32,), generator=g))]
               for s in range(steps)]
    tokens = sum(len(b.column("completion_ids")[0]) for batch in batches for b in batch)
    trainers = {"padded": trainer_for(student, packing="off"), "packed": trainer_for(student, packing="on")}
    assert trainers["packed"].packed
    seconds = {name: 0.0 for name in trainers}
    for trainer in trainers.values():
        trainer.step(batches[0])  # warm-up
    for _ in range(rounds):
        for name, trainer in trainers.items():
            start = time.perf_counter()
            for batch in batches:
                trainer.step(batch)
            seconds[name] += time.perf_counter() - start
    rate = {name: round(rounds * tokens / s, 1) for name, s in seconds.items()}
    return {"completion_tokens_per_step": tokens // steps, "rows_per_step": 32, "micro_batch_tokens": 4096,
            "padded_tokens_per_s": rate["padded"], "packed_tokens_per_s": rate["packed"],
            "packed_over_padded": round(rate["packed"] / rate["padded"], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        student, length, checkpointing, chunk = args.child
        print(json.dumps(one_step(Path(student), int(length), bool(int(checkpointing)), int(chunk))))
        return
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        student = make_bench_model(Path(tmp) / "student", vocab=VOCAB, context=LENGTHS[-1] + PROMPT)
        result = {"benchmark": "long", "machine": machine(),
                  "student": {"vocab": VOCAB, "hidden": 256, "layers": 4, "attention": "sdpa"},
                  "memory_one_step": memory(student),
                  "throughput_skewed_lengths": throughput(student, args.steps, args.rounds)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
