"""Stage `train`: stream a store into a student, with no teacher in memory.

Every check runs before the student is loaded: the store is complete and offers what the
objective requires (its columns, enough samples per prompt, sampled rather than greedy rollouts
when the objective reads behaviour probabilities), the student's vocabulary is the store's, the
teacher-consistency gate passes, an on-policy objective trains on the student's own rollouts (a
warning otherwise), `--out` is new (or `--resume` finds a whole checkpoint made the same way, and
continues a finished run only to more steps: training/resume.py). The student's softmax
temperature defaults to the store's sampling temperature and its policy is cut to the store's
top-p, so before any update lq_y = ℓμ. Then the trainer (training/trainer.py) runs the loop
(training/loop.py). Under torchrun every rank runs this; rank 0 alone writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
from pathlib import Path

import torch

from lightopd import __version__
from lightopd.config import TrainConfig
from lightopd.data.lock import LOCK, exclusive
from lightopd.data.store import (
    policy_is_behavior,
    sampling_of,
    store_columns,
)
from lightopd.data.stream import StepStream, check_batch
from lightopd.engine import held, models
from lightopd.errors import InputError
from lightopd.hub import locate
from lightopd.objectives import Objective, ObjectiveParams, lookup
from lightopd.objectives.span_losses import with_span_losses
from lightopd.options import flatten, options
from lightopd.progress import console, warn
from lightopd.provenance import (
    eos_mismatch,
    model_fingerprint,
    read_provenance,
    tokenizer_fingerprint,
)
from lightopd.stages.train_data import check_on_policy, check_spans, mixture, sft_teachers
from lightopd.training import distributed
from lightopd.training.checkpoints import remove, remove_leftovers, restore, saved_dtype
from lightopd.training.distributed import World
from lightopd.training.loop import Run, fit
from lightopd.training.lora import add_adapters, check_lora
from lightopd.training.lora import settings as lora_settings
from lightopd.training.parallel import Source
from lightopd.training.resume import check_resumable, choose, finished_steps, n_steps
from lightopd.training.trackers import check_installed, trackers_of
from lightopd.training.trainer import TrainData, Trainer


def total_steps(cfg: TrainConfig, rows: int) -> int:
    if cfg.steps is not None:
        return cfg.steps
    return max(1, math.ceil((cfg.epochs or 1.0) * rows / cfg.batch_size))


def student_temperature(params: ObjectiveParams, sampling: dict, default: float | None = None) -> ObjectiveParams:
    """The parameters with τ resolved: as given, else the objective's own `default` (sft's 1), else
    the store's sampling temperature (1 if greedy)."""
    if params.temperature is not None:
        return params
    return dataclasses.replace(params, temperature=default or float(sampling["temperature"]) or 1.0)


# settings that may differ when a run is resumed; any other difference changes what is trained
# (how the same computation is laid out in memory may change: that is how a run that ran out of memory goes on)
MAY_CHANGE_ON_RESUME = ("steps", "epochs", "save_every", "micro_batch_tokens", "packing", "loss_chunk_tokens",
                        "gradient_checkpointing", "attn_implementation", "device", "allow_teacher_mismatch",
                        "allow_off_policy", "report_to", "keep_checkpoints", "merge_lora", "allow_unrouted")


def resume_differences(checkpoint: dict, now: dict, at_step: int, total: int) -> list[str]:
    """Every difference between a checkpoint's provenance and this run's that would change the result."""
    out = []
    old, new = checkpoint.get("train", {}), now["train"]
    defaults = {o.key: list(o.default) if isinstance(o.default, tuple) else o.default  # what a key added since
                for o in options(TrainConfig) if not o.required}                         # an older run had
    for key in sorted(set(old) | set(new)):
        if key not in MAY_CHANGE_ON_RESUME and old.get(key, defaults.get(key)) != new.get(key):
            out.append(f"--{key.replace('_', '-')}: {old.get(key)!r} in the checkpoint, {new.get(key)!r} now")
    fingerprint = lambda record, block: (record.get(block) or {}).get("fingerprint")  # noqa: E731
    for what, a, b in (("the objective", checkpoint.get("objective"), now["objective"]),
                       ("--data (its manifest)", fingerprint(checkpoint, "data"), fingerprint(now, "data")),
                       ("--student", fingerprint(checkpoint, "parent"), fingerprint(now, "parent"))):
        if a != b:
            out.append(f"{what}: {a} in the checkpoint, {b} now")
    if total < at_step:
        out.append(f"--steps: the checkpoint is at step {at_step}, past the {total} steps asked for")
    return out


def for_store(params: ObjectiveParams, sampling: dict) -> ObjectiveParams:
    """`params` with a fixed length left unset (opd-seq's max_length) at the store's longest completion."""
    if getattr(params, "max_length", 0) is None:
        return dataclasses.replace(params, max_length=int(sampling["max_new_tokens"]))
    return params


def run(cfg: TrainConfig, params: ObjectiveParams) -> dict | None:
    """Train; returns the result on rank 0 (None on other ranks). Rank 0 holds --out for the run."""
    world, device = distributed.join(cfg.student.device)
    try:
        with exclusive(cfg.out, f"--out {cfg.out}") if world.main else contextlib.nullcontext():
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
    kind = lookup(cfg.objective)
    mix = mixture(cfg, cfg.objective,
                  with_span_losses(kind(params), cfg.selection, lookup, lambda c: c.Params()).needs())
    manifest = mix.manifest
    sampling = sampling_of(manifest)
    params = for_store(student_temperature(params, sampling, kind.default_temperature), sampling)
    tokenizer = models.load_tokenizer(student_dir, spec.trust_remote_code, "--student")
    if tokenizer_fingerprint(tokenizer) != manifest["tokenizer"]["fingerprint"]:
        raise InputError(
            f"--student {spec.path}: its vocabulary ({tokenizer_fingerprint(tokenizer)}) differs from the "
            f"one --data {cfg.data[0]} was sampled with ({manifest['tokenizer']['fingerprint']}); the stored token "
            "ids would mean different tokens"
        )
    spans = None  # every row's spans, read (and their file, if any) and checked once, before the student loads
    if cfg.selection.reads_spans:
        spans = check_spans(cfg.selection, mix, lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
    info = models.model_info(student_dir, tokenizer, spec.trust_remote_code, "--student")
    mismatch = eos_mismatch(manifest["tokenizer"]["eos_token_ids"], info.eos_ids, spec.path, "the student")
    if mismatch:
        warn(mismatch)
    compute_dtype = models.resolve_dtype(spec.dtype, device)
    parent = read_provenance(student_dir)
    objective: Objective = with_span_losses(  # a span kind's loss takes --objective's τ
        kind(params, total_steps(cfg, mix.rows)), cfg.selection, lookup,
        lambda c: dataclasses.replace(for_store(c.Params(), sampling), temperature=params.temperature))
    needs = objective.needs()
    student = {"path": str(student_dir.resolve()), **locate(spec.path).record(),
               "fingerprint": model_fingerprint(student_dir)}
    own = (student["fingerprint"], ((parent or {}).get("parent") or {}).get("fingerprint"))
    sft_teacher, sft_mixture = sft_teachers(mix, needs.teacher, spec.path, cfg.sft_teacher, parent,
                                            cfg.allow_teacher_mismatch, own)
    if needs.on_policy:
        for path, store in zip(mix.paths, mix.manifests, strict=True):
            check_on_policy(cfg, objective.name, path, store, student, parent)
    out = Path(cfg.out)
    if world.main:
        remove_leftovers(out)  # this run holds --out's lock: the run that left them is dead
    finished = finished_steps(out) if cfg.resume else None
    choice = choose(out) if cfg.resume else None
    resume_from = choice.path if choice is not None else None
    if cfg.resume and choice is None:
        if finished is not None:
            raise InputError(f"--resume: {out} holds a finished run of {n_steps(finished)} (its model is {out} itself) "
                             "and no checkpoint to continue it from; train into a new --out")
        warn(f"--resume: no checkpoint in {out}/checkpoints; starting from the beginning")
    for skipped, problem in choice.skipped if choice is not None else ():
        warn(f"--resume: checkpoint {skipped.name} {problem}; resuming from {resume_from.name} instead "
             f"({skipped.name} is removed when training starts)")
    if not cfg.resume and out.exists() and any(p.name != LOCK for p in out.iterdir()):
        raise InputError(f"--out {out}: already holds files; pass --resume to continue its run, "
                         "or choose another --out")
    check_batch(cfg.batch_size, int(sampling.get("n", 1)), world.size, mix.rows)
    if cfg.selection.token_select in ("divergence", "confident-wrong", "tip") and not needs.teacher \
            and "teacher_logprobs" not in store_columns(manifest):
        raise InputError(f"--token-select {cfg.selection.token_select}: ranks positions by the student's divergence "
                         f"from the teacher, and --data {cfg.data[0]} is a rollout store (no teacher's log-probs)")
    trackers = trackers_of(cfg.report_to)
    check_installed(trackers)  # before the student is loaded
    check_lora(cfg)
    if cfg.fsdp and not world.active:
        warn("--fsdp shards the student over torchrun's ranks; in a single process it does nothing")
    top_k = manifest.get("scoring", {}).get("top_k")
    data = TrainData(store_columns(manifest), top_k, info.vocab, policy_is_behavior(manifest), mix.names,
                     mix.weights)
    provenance = {
        "lightopd_version": __version__,
        "parent": {**student, "sft_teacher": (parent or {}).get("sft_teacher")},
        "sft_teacher": sft_teacher,
        **({"sft_teachers": sft_mixture} if sft_mixture else {}),
        "data": mix.record(),
        "objective": {"name": objective.name, "params": dataclasses.asdict(params)},
        "train": {**{k: list(v) if isinstance(v, tuple) else v  # as the JSON record reads back
                     for k, v in flatten(cfg).items() if k not in ("student", "data", "out", "resume")},
                  "compute_dtype": str(compute_dtype).removeprefix("torch.")},
        "parallel": {"world_size": world.size, "fsdp": cfg.fsdp and world.active},
        "lora": lora_settings(cfg) if cfg.lora_rank else None,
    }
    state = None
    if choice is not None:
        state = choice.state
        other_world = check_resumable(state, resume_from, world, cfg.fsdp and world.active)
        if other_world and world.main:
            warn(other_world)
        differences = resume_differences(read_provenance(resume_from) or {}, provenance, state["step"],
                                         objective.total_steps)
        if differences:
            raise InputError(f"--resume: {resume_from} was made with other settings ({'; '.join(differences)}). "
                             "Resume with the checkpoint's settings, or train into a new --out; only "
                             f"{', '.join('--' + k.replace('_', '-') for k in MAY_CHANGE_ON_RESUME)} may change")
        if finished is not None and objective.total_steps <= finished:
            raise InputError(f"--resume: {out} holds a finished run of {n_steps(finished)} (its model is {out} "
                             f"itself); raise --steps or --epochs past {finished} to continue it from "
                             f"{resume_from.name}, or train into a new --out")
    world.barrier()  # every rank has passed every check before rank 0 writes anything
    if world.main and choice is not None:
        for skipped, _ in choice.skipped:  # else pruning could keep them in place of whole checkpoints
            remove(skipped)

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    # with LoRA the base weights are the student's, and a checkpoint holds the adapter alone
    # (and under FSDP a checkpoint holds shards, loaded after the model is sharded)
    sharded = state is not None and state["optimizer"] is None
    weights_from = student_dir if cfg.lora_rank or sharded else (resume_from or student_dir)
    fsdp = cfg.fsdp and world.active
    # full training keeps float32 master weights; under LoRA the frozen base stays in the compute dtype
    # (peft keeps the adapters in float32), except under FSDP, whose float32 shards are small
    dtype = compute_dtype if cfg.lora_rank and not fsdp else torch.float32
    source = full = None
    if fsdp:  # built empty and sharded first; rank 0 alone reads the weights, on the CPU (training/parallel.py)
        model = models.empty_model(student_dir, spec.trust_remote_code, "--student", spec.attn_implementation)
        full = (models.load_model(weights_from, torch.device("cpu"), dtype, spec.trust_remote_code, "--student",
                                  spec.attn_implementation) if world.main else None)
        peft_model = add_adapters(model, cfg) if cfg.lora_rank else None  # (a checkpoint's: after sharding)
        if peft_model is not None:
            model = peft_model.get_base_model()
            full = add_adapters(full, cfg, quiet=True).get_base_model() if full is not None else None
        source = Source(device, full)
    else:
        model = models.load_model(weights_from, device, dtype, spec.trust_remote_code, "--student",
                                  spec.attn_implementation, trains=True)
        peft_model = add_adapters(model, cfg, resume_from) if cfg.lora_rank else None
        if peft_model is not None:
            model = peft_model.get_base_model()  # the student, its linear layers carrying the adapters
    trainer = Trainer(cfg, objective, model, data, objective.total_steps, world, source, spans)
    source = full = None  # rank 0's full copy is in the shards now
    stream = StepStream(list(zip(mix.paths, mix.manifests, strict=True)), list(trainer.read_columns), cfg.seed,
                        cfg.shuffle_buffer, world.rank, world.size, mix.names)
    start_step = 0
    if state is not None:
        stream.skip(restore(trainer, state, resume_from))
        start_step = state["step"]
        console.print(f"resuming {out} from {resume_from.name}")
    written = saved_dtype(student_dir)  # the final model's dtype: the student's own
    loop = Run(out, tokenizer, provenance, objective.total_steps, cfg.batch_size, cfg.save_every, start_step,
               trackers, cfg.keep_checkpoints, written, peft_model, cfg.merge_lora,
               lambda: models.load_model(student_dir, torch.device("cpu"), torch.float32, spec.trust_remote_code),
               cfg.stop_when, cfg.stop_window)
    done = fit(trainer, stream, loop)
    if world.size == 1 and not cfg.lora_rank:  # OUT's weights, for the next stage of `lightopd rounds`
        held.hold(out, model, written)
    last = done["last"]
    return {
        "command": "train",
        "model": str(out),
        "objective": objective.name,
        "steps": done["steps"],
        "resumed_from": None if resume_from is None else resume_from.name,
        "tokens": done["tokens"],
        "final_loss": None if last is None else last["loss"],
        "seconds": round(done["seconds"], 3),
        "tokens_per_s": round(done["tokens"] / done["seconds"], 1) if done["tokens"] else None,
        "metrics": done["metrics"],
        "zero_gradient_steps": done["zero_gradient_steps"],
        **({"teachers": mix.cost()} if mix.names else {}),
    }
