"""Stage `train`: stream a store into a student, with no teacher in memory.

Every check runs before the student is loaded: the store is complete and offers what the
objective requires (its columns, enough samples per prompt), the student's vocabulary is the
store's, the teacher-consistency gate passes, `--out` is new (or `--resume` finds a checkpoint
made the same way). Then the trainer (training/trainer.py) runs the loop (training/loop.py).
Under torchrun every rank runs this; rank 0 alone writes, and returns the summary.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict
from pathlib import Path

import torch

from lightopd import __version__
from lightopd.config import TrainConfig
from lightopd.data.store import ROLLOUT_FORMAT, TEACHER_FORMAT, manifest_fingerprint, open_store, store_columns
from lightopd.data.stream import StepStream, data_parts_for
from lightopd.engine import models
from lightopd.errors import InputError
from lightopd.objectives import Objective, ObjectiveParams, lookup
from lightopd.options import flatten
from lightopd.progress import console, warn
from lightopd.provenance import model_fingerprint, read_provenance, sft_teacher_of, tokenizer_fingerprint
from lightopd.training import distributed
from lightopd.training.checkpoints import check_resumable, latest_checkpoint, load_state, restore
from lightopd.training.distributed import World
from lightopd.training.loop import Run, fit
from lightopd.training.trainer import Trainer


def check_data(cfg: TrainConfig, objective: Objective) -> dict:
    """The store's manifest, after checking it offers what the objective requires."""
    manifest = open_store(cfg.data, formats=(ROLLOUT_FORMAT, TEACHER_FORMAT))
    needs = objective.requirements()
    missing = [c for c in needs.columns if c not in store_columns(manifest)]
    if missing:
        raise InputError(
            f"--data {cfg.data}: a rollout store has no teacher columns, and --objective {objective.name} needs "
            f"them ({', '.join(missing)}); run `lightopd score-teacher` on it first (or use --objective sft)"
        )
    sampling = manifest["sampling"] if manifest["format"] == ROLLOUT_FORMAT else manifest["rollouts"]["sampling"]
    if sampling["n"] < needs.min_samples:
        raise InputError(f"--data {cfg.data}: holds {sampling['n']} sample(s) per prompt, and --objective "
                         f"{objective.name} needs at least {needs.min_samples}: {needs.why}. Sample more with "
                         f"`lightopd rollout --n {needs.min_samples}`")
    if manifest["rows"] == 0:
        raise InputError(f"--data {cfg.data}: the store holds no rows")
    return manifest


def total_steps(cfg: TrainConfig, manifest: dict) -> int:
    if cfg.steps is not None:
        return cfg.steps
    return max(1, math.ceil((cfg.epochs or 1.0) * manifest["rows"] / cfg.batch_size))


def run(cfg: TrainConfig, params: ObjectiveParams) -> dict | None:
    """Train; returns the result on rank 0 (None on other ranks)."""
    world, device = distributed.join(cfg.student.device)
    try:
        result = _run(cfg, params, world, device)
    except BaseException:
        distributed.leave(world, clean=False)
        raise
    distributed.leave(world)
    return result if world.main else None


def _run(cfg: TrainConfig, params: ObjectiveParams, world: World, device: torch.device) -> dict:
    if not world.main:
        console.quiet = True  # rank 0 speaks for the run
    spec = cfg.student
    student_dir = models.check_model_dir(spec.path, "--student")
    manifest = check_data(cfg, lookup(cfg.objective)(params))
    tokenizer = models.load_tokenizer(student_dir, spec.trust_remote_code)
    if tokenizer_fingerprint(tokenizer) != manifest["tokenizer"]["fingerprint"]:
        raise InputError(
            f"--student {spec.path}: its vocabulary ({tokenizer_fingerprint(tokenizer)}) differs from the "
            f"one --data {cfg.data} was sampled with ({manifest['tokenizer']['fingerprint']}); the stored token "
            "ids would mean different tokens"
        )
    parent = read_provenance(student_dir)
    objective = lookup(cfg.objective)(params, total_steps(cfg, manifest))
    sft_teacher = sft_teacher_of(manifest, objective.requirements().teacher, spec.path, cfg.sft_teacher, parent,
                                 cfg.allow_teacher_mismatch)
    out = Path(cfg.out)
    resume_from = latest_checkpoint(out) if cfg.resume else None
    if cfg.resume and resume_from is None:
        warn(f"--resume: no checkpoint in {out}/checkpoints; starting from the beginning")
    if not cfg.resume and out.exists() and any(out.iterdir()):
        raise InputError(f"--out {out}: already holds files; pass --resume to continue its run, "
                         "or choose another --out")
    parts = data_parts_for(cfg.batch_size, cfg.data_parts, manifest, world.size, cfg.data)
    if cfg.fsdp and not world.active:
        warn("--fsdp shards the student over torchrun's ranks; in a single process it does nothing")
    provenance = {
        "lightopd_version": __version__,
        "parent": {"path": str(student_dir.resolve()), "fingerprint": model_fingerprint(student_dir),
                   "sft_teacher": (parent or {}).get("sft_teacher")},
        "sft_teacher": sft_teacher,
        "data": {"path": str(Path(cfg.data).resolve()), "format": manifest["format"],
                 "fingerprint": manifest_fingerprint(cfg.data), "teacher": manifest.get("teacher")},
        "objective": {"name": objective.name, "params": asdict(params)},
        "train": {k: v for k, v in flatten(cfg).items() if k not in ("student", "data", "out", "resume")},
        "parallel": {"world_size": world.size, "data_parts": parts, "fsdp": cfg.fsdp and world.active},
    }
    state = None
    if resume_from is not None:
        state = load_state(resume_from)
        check_resumable(state, resume_from, world, parts, cfg.fsdp and world.active)
    world.barrier()  # every rank has passed every check before rank 0 writes anything

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model = models.load_model(resume_from or student_dir, device, torch.float32, spec.trust_remote_code)
    k = manifest.get("scoring", {}).get("top_k")
    trainer = Trainer(cfg, objective, model, store_columns(manifest), k, objective.total_steps, world)
    stream = StepStream(cfg.data, manifest, ["prompt_ids", "completion_ids", *trainer.columns], cfg.seed,
                        cfg.shuffle_buffer, parts, world.rank, world.size)
    start_step = 0
    if state is not None:
        stream.skip(restore(trainer, state))
        start_step = state["step"]
        console.print(f"resuming {out} from {resume_from.name}")
    loop = Run(out, tokenizer, provenance, objective.total_steps, cfg.batch_size // parts, parts, cfg.save_every,
               start_step)
    done = fit(trainer, stream, loop)
    last = done["last"]
    return {
        "command": "train",
        "model": str(out),
        "objective": objective.name,
        "steps": objective.total_steps,
        "resumed_from": None if resume_from is None else resume_from.name,
        "tokens": done["tokens"],
        "final_loss": None if last is None else last["loss"],
        "seconds": round(done["seconds"], 3),
        "tokens_per_s": round(done["tokens"] / done["seconds"], 1) if done["tokens"] else None,
        "metrics": done["metrics"],
    }
