"""Benchmark the token selection: what dropping positions before the output layer saves; prints JSON.

On the bench world (a 32k-vocabulary, 4-layer student; a teacher store of 96-token completions at
k = 32), in one process on the same steps: lightopd's optimizer step with lightning-opd keeping
every token, then keeping each row's first 50% and 10% (`--token-select position`: the dropped
positions skip the output layer and the loss), and the entropy selection at 50% (which reads the
current student: one more forward without gradients). Then the peak resident memory of `lightopd
train` (fixed steps) under each. Every figure is also given as a ratio to keeping all.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, peak_rss_mb  # noqa: E402
from train import bench_world  # noqa: E402

from lightopd.data.store import open_store, sampling_of, store_columns  # noqa: E402
from lightopd.data.stream import GroupStream  # noqa: E402
from lightopd.engine import models  # noqa: E402
from lightopd.layering import train_settings  # noqa: E402
from lightopd.memory import release_freed_memory  # noqa: E402
from lightopd.objectives import lookup  # noqa: E402
from lightopd.stages.train import student_temperature  # noqa: E402
from lightopd.training.trainer import TrainData, Trainer  # noqa: E402

SELECTIONS = {"all": {}, "position 50%": {"token_select": "position", "token_keep": 0.5},
              "position 10%": {"token_select": "position", "token_keep": 0.1},
              "entropy 50%": {"token_select": "entropy", "token_keep": 0.5}}


def step_seconds(student: Path, store: Path, flags: dict, steps: int, batch_size: int, out: Path) -> float:
    cfg, params = train_settings({"student": str(student), "data": str(store), "out": str(out),
                                  "batch_size": batch_size, "lr": 1e-5, **flags})
    manifest = open_store(store)
    columns = ["prompt_ids", "completion_ids", *store_columns(manifest)]
    stream = GroupStream(store, manifest, [s["name"] for s in manifest["shards"]], columns, 0, 64)
    batches = [stream.take_rows(batch_size) for _ in range(steps + 1)]
    torch.manual_seed(0)
    model = models.load_model(student, torch.device("cpu"), torch.float32)
    objective = lookup("lightning-opd")(student_temperature(params, sampling_of(manifest)), steps)
    trainer = Trainer(cfg, objective, model, TrainData(store_columns(manifest), 32, 32000), steps + 1)
    trainer.step(batches[0], 1)  # warm-up
    start = time.perf_counter()
    for i, groups in enumerate(batches[1:], start=2):
        trainer.step(groups, i)
    return (time.perf_counter() - start) / steps


def main() -> None:
    release_freed_memory()
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        student, _, store = bench_world(tmp, "store")
        seconds = {name: step_seconds(student, store, flags, args.steps, args.batch_size, tmp / "unused")
                   for name, flags in SELECTIONS.items()}
        memory = {}
        for i, (name, flags) in enumerate(SELECTIONS.items()):
            command = [sys.executable, "-m", "lightopd", "train", "--student", str(student), "--data", str(store),
                       "--out", str(tmp / f"run{i}"), "--steps", str(args.steps), "--batch-size",
                       str(args.batch_size), "--device", "cpu"]
            command += [x for key, value in flags.items() for x in (f"--{key.replace('_', '-')}", str(value))]
            memory[name] = peak_rss_mb(command)
    print(json.dumps({
        "bench": "selection", "machine": machine(), "steps": args.steps, "batch_size": args.batch_size,
        "step_seconds": {k: round(v, 3) for k, v in seconds.items()},
        "step_time_over_all": {k: round(v / seconds["all"], 3) for k, v in seconds.items()},
        "peak_rss_mb": {k: round(v, 1) for k, v in memory.items()},
        "peak_rss_over_all": {k: round(v / memory["all"], 3) for k, v in memory.items()},
    }))


if __name__ == "__main__":
    main()
