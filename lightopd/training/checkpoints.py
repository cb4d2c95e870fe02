"""Checkpoints: plain Hugging Face model directories plus `trainer_state.pt`, written atomically.

`OUT/checkpoints/step-N/` holds the model (safetensors, config, tokenizer, lightopd.json) and the
state that makes `--resume` reproduce the uninterrupted run: optimizer, scheduler, the objective's
carried state, and every rank's RNG states and data cursors. A checkpoint is written to a
temporary directory and renamed into place, so a kill -9 never leaves half of one. The state is
read back with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import torch

from lightopd.errors import InputError
from lightopd.provenance import write_provenance
from lightopd.training.distributed import World

STATE = "trainer_state.pt"


def save_model(directory: Path, model, tokenizer, provenance: dict, weights: dict | None = None) -> None:
    """An HF model directory; `weights`: the full state dict when the model itself is sharded."""
    model.save_pretrained(directory, safe_serialization=True, state_dict=weights)
    tokenizer.save_pretrained(directory)
    write_provenance(directory, provenance)


def save_checkpoint(out: Path, step: int, model, tokenizer, provenance: dict, state: dict,
                    weights: dict | None = None) -> Path:
    """OUT/checkpoints/step-N, written to a temporary directory and renamed: never half a checkpoint."""
    final = out / "checkpoints" / f"step-{step}"
    tmp = out / "checkpoints" / f".step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(tmp, model, tokenizer, {**provenance, "steps": step}, weights)
    torch.save(state, tmp / STATE)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def latest_checkpoint(out: Path) -> Path | None:
    found = []
    for path in (out / "checkpoints").glob("step-*"):
        if path.name[5:].isdigit() and (path / STATE).is_file():
            found.append((int(path.name[5:]), path))
    return max(found)[1] if found else None


def load_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / STATE, weights_only=True, map_location="cpu")


def trainer_state(trainer, step: int, cursors: dict[int, int], data_parts: int) -> dict:
    """Everything needed to resume; a collective: every rank calls it, rank 0 saves the result.
    The optimizer is the same on every rank (DDP); RNG states and data cursors are per rank."""
    mine = {
        "cursors": cursors,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python_rng": random.getstate(),
    }
    return {
        "step": step,
        "world_size": trainer.world.size,
        "data_parts": data_parts,
        "ranks": trainer.world.gather(mine),
        "fsdp": trainer.parallel.fsdp,
        "optimizer": trainer.parallel.optimizer_state(trainer.optimizer),
        "scheduler": trainer.scheduler.state_dict(),
        "objective": trainer.objective.state_dict(),
    }


def restore(trainer, state: dict) -> dict[int, int]:
    """Restores this rank's share of `state` into `trainer`; returns its data cursors."""
    trainer.parallel.load_optimizer_state(trainer.optimizer, state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    mine = state["ranks"][trainer.world.rank]
    torch.set_rng_state(mine["torch_rng"])
    if mine["cuda_rng"]:
        torch.cuda.set_rng_state_all(mine["cuda_rng"])
    random.setstate(mine["python_rng"])
    trainer.objective.load_state_dict(state["objective"])
    return mine["cursors"]


def check_resumable(state: dict, checkpoint: Path, world: World, parts: int, fsdp: bool) -> None:
    if (state["world_size"], state["data_parts"]) != (world.size, parts):
        raise InputError(
            f"--resume: {checkpoint} was written by a run of {state['world_size']} rank(s) reading "
            f"{state['data_parts']} data part(s); this run has {world.size} rank(s) and {parts} part(s). Resume with "
            f"the same world size (torchrun --nproc-per-node x --nnodes = {state['world_size']}) and data_parts, "
            "so every rank continues its own parts, RNG and cursor"
        )
    if state["fsdp"] != fsdp:
        raise InputError(f"--resume: {checkpoint} was written {'with' if state['fsdp'] else 'without'} --fsdp; "
                         "resume it the same way (its optimizer state is laid out for that)")
