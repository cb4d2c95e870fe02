"""Checkpoints and the final model: plain Hugging Face model directories, written atomically.

`OUT/checkpoints/step-N/` holds the model (safetensors, config, tokenizer, lightopd.json) and the
state that makes `--resume` reproduce the uninterrupted run: optimizer, scheduler, the objective's
carried state, the data cursor and every rank's RNG states. A checkpoint is written to a
temporary directory and renamed into place, so a kill -9 never leaves half of one; a write that
fails removes its temporary directory. The final model goes into OUT itself, its lightopd.json
last (publish_model), so a kill -9 never leaves a model that looks finished. A run that holds
OUT's lock removes the temporaries a killed run left there (remove_leftovers). resume.py reads
checkpoints back and decides which one may be trusted.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from lightopd.errors import InputError
from lightopd.provenance import PROVENANCE, write_provenance

STATE = "trainer_state.pt"
SHARDED = "sharded"  # under FSDP: every rank's shards of weights and optimizer (torch.distributed.checkpoint)
SHARD_SIZE = "5GB"  # safetensors files of the saved models
MODEL_STAGING = ".model.tmp"  # in OUT: the final model's files before they are moved into place
RUN_FILES = ("metrics.jsonl",)  # files of OUT that are the run's, not its model's


def saved_dtype(model_dir: Path) -> torch.dtype:
    """The dtype a model directory's weights are stored in (its config's `dtype`), float32 if unsaid."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return torch.float32
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def save_model(directory: Path, model, tokenizer, provenance: dict, weights: dict | None = None,
               dtype: torch.dtype = torch.float32) -> None:
    """An HF model directory, its floating-point weights in `dtype` (the student's own, for the
    final model; float32 in checkpoints, which resume from them exactly), in safetensors files of
    at most SHARD_SIZE; `weights`: the full state dict when the model itself is sharded."""
    if weights is not None:  # a gathered copy: tied weights are separate tensors in it, and are saved once
        weights = {k: v for k, v in weights.items() if k not in _tied_names(model)}
    if dtype != torch.float32:
        weights = {k: v.to("cpu", dtype) if v.is_floating_point() else v
                   for k, v in (weights if weights is not None else model.state_dict()).items()}
    model.save_pretrained(directory, safe_serialization=True, state_dict=weights, max_shard_size=SHARD_SIZE)
    if dtype != torch.float32:  # save_pretrained records the dtype of the model in memory (float32)
        config = json.loads((directory / "config.json").read_text())
        config["dtype"] = str(dtype).removeprefix("torch.")
        (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(directory)
    write_provenance(directory, provenance)


def _tied_names(model) -> set[str]:
    """Names of parameters that are another name's parameter (a tied output layer)."""
    seen, tied = set(), set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen.add(id(p))
    return tied


def checkpoint_dirs(out: Path) -> list[tuple[int, Path]]:
    """The `step-N` directories of `out`'s checkpoints, oldest first (whole or not)."""
    found = [(int(p.name[5:]), p) for p in (out / "checkpoints").glob("step-*") if p.name[5:].isdigit() and p.is_dir()]
    return sorted(found)


def remove(path: Path) -> None:
    """Removes a checkpoint directory, or only the link when it is a symbolic link (never what it points to)."""
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def prune_checkpoints(out: Path, keep: int | None) -> None:
    """Deletes all but the newest `keep` checkpoints (None: keeps them all)."""
    if not keep:
        return
    for _, path in checkpoint_dirs(out)[:-keep]:
        remove(path)


def staged(out: Path, step: int) -> Path:
    """The temporary directory a checkpoint of `step` is written into before it is renamed."""
    return out / "checkpoints" / f".step-{step}.tmp"


def staging(out: Path, step: int) -> Path:
    """Makes the (empty) staged directory of `step`'s checkpoint; rank 0 calls it."""
    tmp = staged(out, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def publish(out: Path, step: int, state: dict) -> Path:
    """Writes the trainer state into the staged checkpoint and renames it into place."""
    final = out / "checkpoints" / f"step-{step}"
    tmp = staged(out, step)
    torch.save(state, tmp / STATE)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def save_checkpoint(out: Path, step: int, write: Callable[[Path], None], state: dict) -> Path:
    """OUT/checkpoints/step-N: the model files `write(directory)` writes, and the trainer state;
    written to a temporary directory and renamed: never half a checkpoint. A write that fails (a full
    disk) removes the temporary directory before the error goes on."""
    try:
        write(staging(out, step))
        return publish(out, step, state)
    except BaseException:
        shutil.rmtree(staged(out, step), ignore_errors=True)
        raise


def latest_checkpoint(out: Path) -> Path | None:
    """The newest checkpoint directory (for messages; resume.choose picks the newest whole one)."""
    found = checkpoint_dirs(out)
    return found[-1][1] if found else None


def publish_model(out: Path, write: Callable[[Path], None]) -> None:
    """The final model in OUT, as atomic as a checkpoint although OUT also holds the run's metrics and
    checkpoints. `write(directory)` writes every file of the model, lightopd.json included, into
    OUT/.model.tmp; then OUT's lightopd.json goes (OUT is an unfinished run from here on), the model's
    files are renamed into OUT, files of an earlier final model that the new one lacks are removed,
    and lightopd.json is renamed in last. So OUT holds lightopd.json only beside a whole model of its
    own, and a kill at any moment leaves either the earlier state or a run that model loading reports
    as unfinished (engine.models.unfinished_run), never a model that looks finished. A write that
    fails removes OUT/.model.tmp before the error goes on."""
    tmp = out / MODEL_STAGING
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        (out / PROVENANCE).unlink(missing_ok=True)
        new = {p.name for p in tmp.iterdir()}
        for path in out.iterdir():
            if path.is_file() and path.name not in new and path.name not in RUN_FILES and not path.name.startswith("."):
                path.unlink()  # of an earlier final model (a finished run resumed to more steps, now merged, ...)
        for name in sorted(new - {PROVENANCE}):
            if (out / name).is_dir():
                shutil.rmtree(out / name)
            (tmp / name).replace(out / name)
        (tmp / PROVENANCE).replace(out / PROVENANCE)
        tmp.rmdir()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_leftovers(out: Path) -> None:
    """Removes the temporaries (a staged checkpoint, a staged final model) that a killed run left in
    `out`. Only a run that holds `out`'s lock calls it: the run that made them is then dead."""
    shutil.rmtree(out / MODEL_STAGING, ignore_errors=True)
    for tmp in (out / "checkpoints").glob(".step-*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)


def trainer_state(trainer, step: int, cursor: int) -> dict:
    """Everything needed to resume; a collective: every rank calls it, rank 0 saves the result.
    The optimizer and the data cursor are the same on every rank; RNG states are per rank."""
    mine = {
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python_rng": random.getstate(),
    }
    return {
        "step": step,
        "world_size": trainer.world.size,
        "cursor": cursor,
        "ranks": trainer.world.gather(mine),
        "fsdp": trainer.parallel.fsdp,
        # under FSDP every rank writes its own shards of the weights and optimizer (SHARDED)
        "optimizer": None if trainer.parallel.fsdp else trainer.parallel.optimizer_state(trainer.optimizer),
        "scheduler": trainer.scheduler.state_dict(),
        "objective": trainer.objective.state_dict(),
    }


def restore(trainer, state: dict, checkpoint: Path) -> int:
    """Restores this rank's share of `state` (and, under FSDP, of the checkpoint's shards: weights
    and optimizer) into `trainer`; returns the data cursor. A rank the checkpoint's run did not
    have takes rank 0's RNG states (see resume.check_resumable). A state that does not fit the
    trainer (another model's optimizer state, a malformed RNG state) is an InputError naming it."""
    try:
        if state["optimizer"] is None:
            trainer.parallel.load_sharded(trainer.optimizer, checkpoint / SHARDED)
        else:
            trainer.parallel.load_optimizer_state(trainer.optimizer, state["optimizer"])
        trainer.scheduler.load_state_dict(state["scheduler"])
        ranks = state["ranks"]
        mine = ranks[trainer.world.rank] if trainer.world.rank < len(ranks) else ranks[0]
        torch.set_rng_state(mine["torch_rng"])
        if mine["cuda_rng"]:
            torch.cuda.set_rng_state_all(mine["cuda_rng"])
        random.setstate(tuple(mine["python_rng"]))
        trainer.objective.load_state_dict(state["objective"])
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
        raise InputError(f"--resume: checkpoint {checkpoint.name} does not fit this run: its {STATE} cannot be "
                         f"restored ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None
    return state["cursor"]
