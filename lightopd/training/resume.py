"""What `train --resume` may trust: the newest checkpoint that is whole, and whether the run is finished.

Nothing in `OUT` is taken on faith. A checkpoint is resumed only if its `trainer_state.pt` loads
with `torch.load(weights_only=True)` (a pickle of anything but tensors and plain data is refused
unread) and holds every key of a lightopd trainer state with the right type, and if the files its
model is read from are there and sound: `lightopd.json`, and the safetensors weights and config,
the adapter (LoRA), or the `sharded/` directory (FSDP). A checkpoint that fails is skipped with a
warning naming it and why, and the next older one is tried; the skipped ones are removed once the
run starts, so that pruning never keeps them in place of whole ones. Only when none is whole is it
exit 2, naming the newest one's problem.

A run is finished when `OUT/lightopd.json` is there: it is moved into place after every file of
the final model (checkpoints.publish_model), and records the steps trained. `--resume` continues a
finished run only from a checkpoint and only to more steps than it has.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lightopd.engine.models import safetensors_problem, weights_problem
from lightopd.errors import InputError
from lightopd.provenance import PROVENANCE, read_provenance
from lightopd.training.checkpoints import SHARDED, STATE, checkpoint_dirs
from lightopd.training.distributed import World


class NotACheckpoint(Exception):
    """A checkpoint that cannot be resumed; the message says what is wrong with it."""


@dataclass
class Choice:
    """The checkpoint to resume from, its trainer state, and the newer ones skipped (with why)."""

    path: Path
    state: dict
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def choose(out: Path) -> Choice | None:
    """The newest checkpoint of `out` that is whole (None if there is none at all); InputError naming the
    newest one's problem if none is."""
    skipped = []
    for _, path in reversed(checkpoint_dirs(out)):
        try:
            return Choice(path, read_checkpoint(path), skipped)
        except NotACheckpoint as e:
            skipped.append((path, str(e)))
    if not skipped:
        return None
    newest, problem = skipped[0]
    n = len(skipped) - 1
    older = f" (and the {n} older one{'s' if n > 1 else ''} cannot be resumed either)" if n else ""
    raise InputError(f"--resume: checkpoint {newest.name} {problem}{older}; no checkpoint in {out}/checkpoints can be "
                     "resumed. Restore it, or train into a new --out")


def read_checkpoint(path: Path) -> dict:
    """The checkpoint's trainer state, after checking it and the files resuming reads; NotACheckpoint if not whole."""
    state = read_state(path)
    if not (path / PROVENANCE).is_file():
        raise NotACheckpoint(f"is damaged (its {PROVENANCE} is missing)")
    try:
        record = read_provenance(path)
    except InputError as e:
        raise NotACheckpoint(f"is damaged ({e})") from None
    lora = record.get("lora") is not None  # its model is an adapter
    missing = [name for name in needed_files(state, lora) if not (path / name).exists()]
    if missing:
        raise NotACheckpoint(f"is damaged (its {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing)")
    if state["optimizer"] is not None:
        problem = (safetensors_problem(path / "adapter_model.safetensors") if lora else weights_problem(path))
        if problem:
            raise NotACheckpoint(f"is damaged ({'adapter_model.safetensors is ' if lora else ''}{problem})")
    return state


def needed_files(state: dict, lora: bool) -> tuple[str, ...]:
    """The files of a checkpoint that resuming reads besides the trainer state and lightopd.json."""
    if state["optimizer"] is None:  # FSDP: every rank's shards of the weights (or adapters) and optimizer
        return (f"{SHARDED}/.metadata",)
    return ("adapter_config.json", "adapter_model.safetensors") if lora else ("config.json",)


# key: the types a lightopd trainer state holds there (checkpoints.trainer_state)
STATE_KEYS = {"step": (int,), "world_size": (int,), "cursor": (int,), "ranks": (list, tuple), "fsdp": (bool,),
              "optimizer": (dict, type(None)), "scheduler": (dict,), "objective": (dict,)}
RANK_KEYS = {"torch_rng": (torch.Tensor,), "cuda_rng": (list, tuple), "python_rng": (tuple, list)}


def read_state(checkpoint: Path) -> dict:
    """`trainer_state.pt`, read with weights_only=True and checked key by key; NotACheckpoint otherwise."""
    file = checkpoint / STATE
    if not file.is_file():
        raise NotACheckpoint(f"is damaged (its {STATE} is missing)")
    try:
        state = torch.load(file, weights_only=True, map_location="cpu")
    except Exception as e:  # weights_only refuses with UnpicklingError; a truncated file is a RuntimeError, ...
        reason = _reason(e)
        if "GLOBAL" in reason:
            raise NotACheckpoint(f"is not a lightopd checkpoint (its {STATE} holds Python objects other than "
                                 f"tensors and plain data, refused unread: {reason})") from None
        raise NotACheckpoint(f"is not a lightopd checkpoint (its {STATE} cannot be read: {reason})") from None
    problem = state_problem(state, checkpoint)
    if problem:
        raise NotACheckpoint(f"is not a lightopd checkpoint (its {STATE} {problem})")
    return state


def state_problem(state, checkpoint: Path) -> str | None:
    """What keeps `state` from being a lightopd trainer state of `checkpoint` (None: nothing). The state
    of an earlier release, which no older checkpoint would mend, is an InputError at once."""
    if not isinstance(state, dict):
        return f"holds a {type(state).__name__}, not a trainer state"
    if "cursor" not in state and {"step", "ranks", "scheduler"} <= state.keys():
        raise InputError(f"--resume: {checkpoint} was written by an earlier lightopd whose data order depended on "
                         "the world size; resume it with that release, or train into a new --out")
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:
        return f"lacks {', '.join(missing)}"
    for key, types in STATE_KEYS.items():
        if not isinstance(state[key], types) or (bool in types) != isinstance(state[key], bool):
            return f"holds a {type(state[key]).__name__} as {key!r}"
    if f"step-{state['step']}" != checkpoint.name or state["world_size"] < 1 or state["cursor"] < 0:
        return f"says step {state['step']}, world size {state['world_size']}, cursor {state['cursor']}"
    if state["optimizer"] is None and not state["fsdp"]:
        return "has no optimizer state and no FSDP shards"
    ranks = state["ranks"]
    if not ranks or not all(isinstance(r, dict) and all(isinstance(r.get(k), t) for k, t in RANK_KEYS.items())
                            for r in ranks):
        return "holds no RNG states of its ranks"
    if state["optimizer"] is not None and not {"state", "param_groups"} <= state["optimizer"].keys():
        return "holds no optimizer state"
    return None


def _reason(error: Exception) -> str:
    """What a torch.load error says is wrong (the global or operand weights_only refused, else its first
    line), without its advice on weights_only."""
    text = str(error)
    refused = re.search(r"(?:Trying to load )?[Uu]nsupported [^\n]*", text)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    said = refused.group(0) if refused else (lines or [type(error).__name__])[0]
    return re.split(r"\.(?:\s|$)", said)[0][:200]  # its first sentence


def n_steps(n: int) -> str:
    """The count in words: 1 step, 4 steps."""
    return f"{n} step{'' if n == 1 else 's'}"


def finished_steps(out: Path) -> int | None:
    """The steps of the finished run in `out` (its lightopd.json), None if `out` holds no finished run."""
    record = read_provenance(out) if (out / PROVENANCE).is_file() else None
    if record is None:
        return None
    steps = record.get("steps")
    if not isinstance(steps, int) or isinstance(steps, bool):
        raise InputError(f"--out {out}: its {PROVENANCE} is not the record of a lightopd train run (no steps)")
    return steps


def check_resumable(state: dict, checkpoint: Path, world: World, fsdp: bool) -> str | None:
    """Refuses what cannot resume; returns a warning for what resumes differently (None: nothing)."""
    if state["fsdp"] != fsdp:
        raise InputError(f"--resume: {checkpoint} was written {'with' if state['fsdp'] else 'without'} --fsdp; "
                         "resume it the same way (its optimizer state is laid out for that)")
    if state["world_size"] != world.size:
        return (f"--resume: {checkpoint} was written by {state['world_size']} rank(s) and this run has {world.size}; "
                "the data order continues unchanged, but per-rank random streams cannot (they matter only with "
                "--dropout), and sums over ranks round differently, so the result is not bit-identical")
    return None
