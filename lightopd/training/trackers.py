"""Experiment trackers beside metrics.jsonl (`train --report-to`): TensorBoard, Weights & Biases,
Trackio and MLflow, each an optional extra imported only when asked for.

Each gets the run's settings once (lightopd.json's contents) and, every optimizer step, the same
numbers as the step's metrics.jsonl line. Only rank 0 reports. Each works offline as it does
elsewhere: TensorBoard writes event files under OUT/tensorboard; W&B honours WANDB_MODE=offline;
Trackio keeps a local database; MLflow writes to MLFLOW_TRACKING_URI (default ./mlruns). A
resumed run drops the TensorBoard events of steps after its checkpoint, as metrics.jsonl drops
their lines.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from lightopd.config import REPORT_TO
from lightopd.errors import InputError

PROJECT = "lightopd"  # the W&B / Trackio project, unless WANDB_PROJECT says otherwise


def trackers_of(value: str) -> tuple[str, ...]:
    """The trackers `--report-to` names (config.py checked the names): `none`, a comma-separated
    list, or `all` (every installed one)."""
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    if names in ((), ("none",)):
        return ()
    if names == ("all",):
        return tuple(n for n in REPORT_TO if importlib.util.find_spec(n) is not None)  # each's module is its name
    return names


def check_installed(names: tuple[str, ...]) -> None:
    """Exit 2 before any work when a tracker's package is missing."""
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise InputError(f"--report-to {name}: the {name} package is not installed; "
                             f"pip install 'lightopd[{name}]'")


def _numbers(record: dict, prefix: str = "") -> dict[str, float]:
    """A metrics record's numbers but the step, their names prefixed."""
    return {prefix + k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))
            and not isinstance(v, bool)}


class TensorBoard:
    def __init__(self, out: Path, run: str, config: dict, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events of steps after the checkpoint, from the run that died, are dropped
        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        if not start_step:
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```")

    def log(self, step: int, record: dict) -> None:
        for name, value in _numbers(record, "train/").items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, out: Path, run: str, config: dict, start_step: int):
        import os

        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=run, config=config, dir=str(out),
                              resume="allow" if start_step else None)

    def log(self, step: int, record: dict) -> None:
        self.run.log(_numbers(record, "train/"), step=step)

    def close(self) -> None:
        self.run.finish()


class Trackio:
    def __init__(self, out: Path, run: str, config: dict, start_step: int):
        import trackio

        self.trackio = trackio
        trackio.init(project=PROJECT, name=run, config=config, resume="allow" if start_step else "never")

    def log(self, step: int, record: dict) -> None:
        self.trackio.log(_numbers(record, "train/"), step=step)

    def close(self) -> None:
        self.trackio.finish()


class MLflow:
    def __init__(self, out: Path, run: str, config: dict, start_step: int):
        import mlflow

        self.mlflow = mlflow
        mlflow.start_run(run_name=run)
        flat = {k: json.dumps(v, default=str)[:500] for k, v in config.get("train", {}).items()}
        mlflow.log_params({**flat, "objective": json.dumps(config.get("objective"), default=str)[:500]})

    def log(self, step: int, record: dict) -> None:
        self.mlflow.log_metrics(_numbers(record), step=step)

    def close(self) -> None:
        self.mlflow.end_run()


KINDS = {"tensorboard": TensorBoard, "wandb": WandB, "trackio": Trackio, "mlflow": MLflow}


class Trackers:
    """The trackers of a run (none on ranks other than 0), reported to together."""

    def __init__(self, names: tuple[str, ...], out: Path, config: dict, start_step: int):
        self.open = [KINDS[name](out, out.resolve().name, config, start_step) for name in names]

    def log(self, step: int, record: dict) -> None:
        for tracker in self.open:
            tracker.log(step, record)

    def close(self) -> None:
        for tracker in self.open:
            tracker.close()
