"""The training loop: steps from the stream, one metrics line per step, checkpoints, the final model.

`OUT/metrics.jsonl` gets one JSON object per optimizer step (step, loss, lr, tokens, rows,
grad_norm, the diagnostics, what the objective reports, tokens_per_s), and the `--report-to`
trackers (trackers.py) get the same numbers; a resumed run first drops
the lines of steps after its checkpoint. A step with a non-finite loss or gradient stops the run
with TrainingError naming the last good checkpoint, and no final model is written. The final model
is moved into OUT with its lightopd.json last (checkpoints.publish_model). Under torchrun every
rank runs the loop; rank 0 alone writes.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lightopd.data.fields import finite
from lightopd.data.stream import StepStream
from lightopd.errors import InputError, TrainingError
from lightopd.progress import StageProgress, console, warn
from lightopd.provenance import write_provenance
from lightopd.stopping import StopRule
from lightopd.training import lora
from lightopd.training.checkpoints import (
    SHARDED,
    latest_checkpoint,
    prune_checkpoints,
    publish,
    publish_model,
    save_checkpoint,
    save_model,
    staged,
    staging,
    trainer_state,
)
from lightopd.training.trackers import Trackers
from lightopd.training.trainer import Trainer


@dataclass
class Run:
    """What the loop writes and where it starts."""

    out: Path
    tokenizer: object
    provenance: dict  # lightopd.json of every model written (plus "steps")
    total_steps: int
    batch_size: int  # rows a step takes from the stream (over all ranks)
    save_every: int
    start_step: int = 0  # > 0 when resuming
    trackers: tuple[str, ...] = ()  # --report-to (training/trackers.py)
    keep_checkpoints: int | None = None  # the newest N kept (None: all)
    dtype: torch.dtype = torch.float32  # of the final model's weights: the student's own
    peft: object | None = None  # the peft model around the student, with --lora-rank
    merge_lora: bool = False
    load_base: Callable[[], object] | None = None  # the base student, read again on the CPU (a merge under FSDP)
    stop_when: str | None = None  # --stop-when NAME<X or NAME>X: end early, at the first step whose metric crosses
    stop_window: int = 1  # --stop-window: the rule reads the mean of the last N steps' metric


def open_metrics(run: Run, main: bool) -> Path:
    """OUT/metrics.jsonl, emptied for a new run or cut back to the checkpoint's step for a resumed one
    (a last line cut short by a kill is dropped; damage elsewhere is an InputError naming the line)."""
    path = run.out / "metrics.jsonl"
    if main:
        run.out.mkdir(parents=True, exist_ok=True)
        if run.start_step:  # cut back atomically: a kill here leaves the old file or the new, never half
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(line + "\n" for line in kept_metrics(path, run.start_step)))
            os.replace(tmp, path)
        else:
            path.unlink(missing_ok=True)
    return path


def kept_metrics(path: Path, step: int) -> list[str]:
    """The lines of `path` of steps up to `step`."""
    lines = path.read_text().splitlines() if path.exists() else []
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            recorded = record["step"]
        except (json.JSONDecodeError, TypeError, KeyError):
            if number == len(lines):
                break  # the line a killed run was writing
            raise InputError(f"{path} line {number}: not a metrics record; remove the damaged line to resume") from None
        if recorded <= step:
            kept.append(line)
    return kept


def fit(trainer: Trainer, stream: StepStream, run: Run) -> dict:
    """Train from `run.start_step` to `run.total_steps`; returns tokens, the last record and seconds."""
    world = trainer.world
    metrics_path = open_metrics(run, world.main)
    try:
        return _fit(trainer, stream, run, metrics_path)
    except BaseException:
        if world.main and not run.start_step and _steps_logged(metrics_path) == 0:
            metrics_path.unlink(missing_ok=True)  # failed before its first step: leave --out as it was
            shutil.rmtree(run.out / "tensorboard", ignore_errors=True)
        raise


def _steps_logged(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _fit(trainer: Trainer, stream: StepStream, run: Run, metrics_path: Path) -> dict:
    world = trainer.world
    started = time.perf_counter()
    trackers = Trackers(run.trackers if world.main else (), run.out, run.provenance, run.start_step)
    try:
        return _steps(trainer, stream, run, metrics_path, trackers, started)
    finally:
        trackers.close()


def _steps(trainer: Trainer, stream: StepStream, run: Run, metrics_path: Path, trackers: Trackers,
           started: float) -> dict:
    world = trainer.world
    total_tokens, last, zero, final_step = 0, None, 0, run.total_steps
    rule = None if run.stop_when is None else StopRule(run.stop_when, run.stop_window, (
        json.loads(line) for line in kept_metrics(metrics_path, run.start_step)) if run.start_step else ())
    with StageProgress("train", total=run.total_steps, completed=run.start_step, disable=not world.main) as bar, \
            open(metrics_path if world.main else os.devnull, "a") as metrics:
        for step in range(run.start_step + 1, run.total_steps + 1):
            t0 = time.perf_counter()
            groups = stream.take_step(run.batch_size)
            try:
                record = trainer.step(groups, step)
            except TrainingError as e:
                kept = latest_checkpoint(run.out)
                raise TrainingError(f"step {step}: {e}; training stopped. "
                                    + (f"The last good checkpoint is {kept}." if kept else "No checkpoint was saved.")
                                    ) from None
            seconds = time.perf_counter() - t0
            record.update(trainer.objective.finish_step(step, record["loss"]))
            record = {"step": step, **record, "tokens_per_s": round(record["tokens"] / seconds, 1)}
            metrics.write(json.dumps(finite(record), allow_nan=False) + "\n")  # a NaN diagnostic is null
            metrics.flush()
            trackers.log(step, record)
            total_tokens += record["tokens"]
            last = record
            if record["grad_norm"] == 0:
                zero += 1
                if zero == 1 and world.main:
                    warn(zero_gradient(step, record))
            bar.advance(items=1, tokens=record["tokens"], status=f"loss {record['loss']:.4f}")
            # every rank decides alike (a metric one rank measures alone, tokens_per_s, could differ)
            stop = rule is not None and world.max(torch.tensor(float(rule.crossed(record)))) > 0
            if stop and step < run.total_steps:
                final_step = step  # the store has gone stale: the model of this step is the run's
                if world.main:
                    over = f" (mean of {run.stop_window} steps)" if run.stop_window > 1 else ""
                    console.print(f"--stop-when {run.stop_when}: crossed at step {step} "
                                  f"({rule.name} {rule.value:.4g}{over}); training stops here", highlight=False)
                break
            if run.save_every and step % run.save_every == 0 and step < run.total_steps:
                _save(trainer, stream, run, step, final=False)
    # an early stop writes no checkpoint at its step: a run killed before its final model resumes from
    # the last checkpoint and reaches the same crossing again, instead of training on past it
    _save(trainer, stream, run, final_step, final=True, checkpoint=final_step == run.total_steps)
    if zero > 1 and world.main:
        warn(f"{zero} of {final_step - run.start_step} steps had a zero gradient (grad_norm in {metrics_path})")
    return {"tokens": total_tokens, "last": last, "seconds": time.perf_counter() - started, "steps": final_step,
            "metrics": str(metrics_path), "zero_gradient_steps": zero}


def zero_gradient(step: int, record: dict) -> str:
    """The warning for a step whose gradient is zero at every position."""
    return (f"step {step}: the gradient is zero (loss {record['loss']:.4g}): this step changed nothing. No position "
            "carried a learning signal: the teacher store may have been scored by the student itself, or every "
            "advantage cancelled (see k1 and top1_agree in the metrics)")


def _save(trainer: Trainer, stream: StepStream, run: Run, step: int, final: bool, checkpoint: bool = True) -> None:
    """A checkpoint at `step` (every save_every steps, and at the end if checkpointing), and at the
    end the final model in OUT. These are collectives; rank 0 writes all but FSDP's shards."""
    world = trainer.world
    if run.save_every and checkpoint:
        state = trainer_state(trainer, step, stream.cursor())
        provenance = {**run.provenance, "steps": step}
        if trainer.parallel.fsdp:  # every rank writes its shards into the staged directory
            if world.main:
                staging(run.out, step)
            world.barrier()
            tmp = staged(run.out, step)
            try:
                trainer.parallel.save_sharded(trainer.optimizer, tmp / SHARDED)
                world.barrier()
                if world.main:
                    trainer.model.config.save_pretrained(tmp)
                    run.tokenizer.save_pretrained(tmp)
                    write_provenance(tmp, provenance)
                    publish(run.out, step, state)
            except BaseException:
                if world.main:
                    shutil.rmtree(tmp, ignore_errors=True)
                raise
        elif world.main:
            save_checkpoint(run.out, step, lambda d: _write_model(trainer, run, None, d, provenance, False), state)
        if world.main:
            prune_checkpoints(run.out, run.keep_checkpoints)
    if final:
        weights = trainer.parallel.model_state()
        if world.main:
            publish_model(run.out, lambda d: _write_model(trainer, run, weights, d, {**run.provenance, "steps": step},
                                                          True))


def _write_model(trainer: Trainer, run: Run, weights: dict | None, directory: Path, provenance: dict,
                 final: bool) -> None:
    """The model files of a checkpoint (float32, or the adapter) or of the output (the student's
    dtype; with LoRA the adapter, or with --merge-lora the merged model)."""
    if run.peft is None:
        save_model(directory, trainer.model, run.tokenizer, provenance, weights,
                   run.dtype if final else torch.float32)
    elif final and run.merge_lora:
        merged = lora.merged(run.peft) if weights is None else lora.merged_from(run.load_base(), run.peft, weights)
        save_model(directory, merged, run.tokenizer, provenance, None, run.dtype)
    else:
        lora.save_adapter(run.peft, directory, weights)
        run.tokenizer.save_pretrained(directory)
        write_provenance(directory, provenance)
