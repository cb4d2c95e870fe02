"""Stage `train`: stream a store into a student, with no teacher in memory.

One optimizer step takes whole prompt groups from a seeded shuffle stream until it holds
`batch_size` rows, packs them longest-first into micro-batches within a token budget, and
accumulates gradients of (sum of per-token losses) / (completion tokens in the step), so the
loss is the token mean of the step whatever the micro-batching. Checkpoints hold the model, the
optimizer, the scheduler, RNG states and the data cursor, and are written to a temporary
directory renamed into place; `--resume` continues from the newest one and reproduces the
uninterrupted run.

Under torchrun every rank reads its own disjoint parts of the store (stream.StepStream), the
model is wrapped in DistributedDataParallel, and the loss stays the token mean of the whole
step: each rank scales its token-loss sum by world / (the step's tokens over all ranks), which
DDP's gradient average turns into the global mean. Rank 0 alone writes metrics, progress,
checkpoints (holding every rank's RNG states and data cursors) and the final model.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import torch

from lightopd import __version__, distributed, models
from lightopd import objectives as O
from lightopd.batching import pack_by_tokens, pack_rows, stored_tensors
from lightopd.config import TrainConfig
from lightopd.distributed import World
from lightopd.errors import InputError, TrainingError
from lightopd.forward import CompletionLogits
from lightopd.parallel import Parallel
from lightopd.progress import StageProgress, console
from lightopd.store import ROLLOUT_FORMAT, TEACHER_FORMAT, manifest_fingerprint, open_store
from lightopd.stream import Group, StepStream

STATE = "trainer_state.pt"
DIAGNOSTICS = ("k1", "teacher_topk_mass", "student_topk_mass", "top1_agree", "student_entropy", "is_ratio")

CONSISTENCY = (
    "Offline OPD reaches the same optimum as online OPD only under teacher consistency: the teacher that "
    "scored these rollouts must be the teacher whose outputs the student was SFT-trained on. Otherwise the "
    "student is pulled between two teachers and the stored signal no longer points at one target."
)


def _warn(message: str) -> None:
    from rich.text import Text

    console.print(Text("warning: ", style="yellow") + Text(message), soft_wrap=True)


# ---- set-up checks ----

def check_data(cfg: TrainConfig, objective: O.Objective) -> dict:
    manifest = open_store(cfg.data, formats=(ROLLOUT_FORMAT, TEACHER_FORMAT))
    if manifest["format"] == ROLLOUT_FORMAT and objective.needs_teacher:
        raise InputError(
            f"--data {cfg.data}: a rollout store has no teacher columns, and --objective {objective.name} needs "
            f"them ({', '.join(c for c in objective.columns if c != 'behavior_logprobs')}); run "
            "`lightopd score-teacher` on it first (or use --objective sft)"
        )
    if manifest["rows"] == 0:
        raise InputError(f"--data {cfg.data}: the store holds no rows")
    return manifest


def sft_teacher_of(cfg: TrainConfig, manifest: dict, objective: O.Objective, parent: dict | None) -> dict | None:
    """The SFT teacher to record in the trained model's provenance, after the consistency gate."""
    if not objective.needs_teacher:  # SFT on samples: the model that wrote them is the SFT teacher
        writer = manifest["model"] if manifest["format"] == ROLLOUT_FORMAT else manifest["rollouts"]["model"]
        return {"path": writer["path"], "fingerprint": writer["fingerprint"]}
    if cfg.sft_teacher is not None:
        path = models.check_model_dir(cfg.sft_teacher, "--sft-teacher")
        declared = {"path": str(path.resolve()), "fingerprint": models.model_fingerprint(path)}
    else:
        declared = (parent or {}).get("sft_teacher")
    teacher = manifest["teacher"]
    if declared is None:
        _warn(f"--student {cfg.student} has no recorded SFT teacher (no lightopd.json, no --sft-teacher), so "
              f"teacher consistency cannot be checked against the scoring teacher {teacher['path']}. "
              + CONSISTENCY)
        return None
    if declared["fingerprint"] != teacher["fingerprint"]:
        message = (f"the student's SFT teacher ({declared['path']}, {declared['fingerprint']}) is not the teacher "
                   f"that scored --data ({teacher['path']}, {teacher['fingerprint']}). " + CONSISTENCY)
        if not cfg.allow_teacher_mismatch:
            raise InputError(message + " Pass --allow-teacher-mismatch to train anyway.")
        _warn(message)
    return declared


# ---- one optimizer step ----

def seq_advantages(rows: list[dict], group_of: list[int], params, device, world: World) -> list[torch.Tensor]:
    """opd-seq advantages for every row of a step, from stored columns (no model needed)."""
    width = max(len(r["completion_ids"]) for r in rows)
    teacher = torch.zeros((len(rows), width), dtype=torch.float64, device=device)
    behavior, mask = torch.zeros_like(teacher), torch.zeros_like(teacher)
    for i, r in enumerate(rows):
        n = len(r["completion_ids"])
        teacher[i, :n] = torch.tensor(r["teacher_logprobs"], dtype=torch.float64)
        behavior[i, :n] = torch.tensor(r["behavior_logprobs"], dtype=torch.float64)
        mask[i, :n] = 1
    adv = O.opd_seq_advantages(teacher, behavior, mask, torch.tensor(group_of, device=device), params, world.sum)
    return [adv[i, : len(r["completion_ids"])].float() for i, r in enumerate(rows)]


class Trainer:
    def __init__(self, cfg: TrainConfig, params, objective: O.Objective, manifest: dict, model, k: int | None,
                 total_steps: int, world: World = distributed.SINGLE):
        self.cfg, self.params, self.objective, self.manifest = cfg, params, objective, manifest
        self.model, self.k, self.total_steps, self.world = model, k, total_steps, world
        # the objective's columns, plus every stored column the diagnostics can use
        stored = ("behavior_logprobs",) if manifest["format"] == ROLLOUT_FORMAT else \
            ("teacher_logprobs", "behavior_logprobs", "topk_ids", "topk_logprobs")
        self.columns = tuple(dict.fromkeys((*objective.columns, *stored)))
        self.device = next(model.parameters()).device
        self.parallel = Parallel(CompletionLogits(model), model, world, cfg.fsdp)  # before the optimizer sees
        self.head = self.parallel.module                                           # the (possibly sharded) weights
        self.autocast = self.device.type == "cuda" and models.resolve_dtype(cfg.dtype, self.device) != torch.float32
        self.amp_dtype = models.resolve_dtype(cfg.dtype, self.device)
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.taid = O.TaidSchedule(params, total_steps) if objective.name == "taid" else None

    def _lr_factor(self, step: int) -> float:
        cfg = self.cfg
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        span = max(1, self.total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return 1.0 - progress if cfg.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))

    def step(self, groups: list[Group]) -> dict:
        table = pa.Table.from_batches(groups)
        rows = table.select(["prompt_ids", "completion_ids"]).to_pylist()
        group_of = [i for i, g in enumerate(groups) for _ in range(g.num_rows)]
        local_tokens = sum(len(r["completion_ids"]) for r in rows)
        totals = self.world.sum(torch.tensor([local_tokens, len(rows)], dtype=torch.float64, device=self.device))
        tokens, step_rows = (int(x) for x in totals.tolist())  # over all ranks
        scale = self.world.size / max(tokens, 1)  # DDP averages over ranks: this makes it the global token mean
        advantages = None
        if self.objective.name == "opd-seq":
            scored = table.select(["teacher_logprobs", "behavior_logprobs"]).to_pylist()
            advantages = seq_advantages([{**r, **t} for r, t in zip(rows, scored, strict=True)], group_of,
                                        self.params, self.device, self.world)
        lengths = [len(r["prompt_ids"]) + len(r["completion_ids"]) for r in rows]
        packs = pack_by_tokens(lengths, self.cfg.micro_batch_tokens)
        # under DDP every rank must reach one synchronising backward, even one whose rows have no completion tokens
        micros = [m for m in packs if any(rows[i]["completion_ids"] for i in m)] or packs[:1]
        weights = [1.0] * len(micros)
        if self.parallel.pads:  # FSDP: as many forwards on every rank; the extra ones repeat a batch at weight 0
            extra = int(self.world.max(torch.tensor(len(micros), device=self.device))) - len(micros)
            micros, weights = micros + [micros[0]] * extra, weights + [0.0] * extra
        loss_sum = torch.zeros((), device=self.device)
        sums: dict[str, torch.Tensor] = {}
        ratio_max = torch.zeros((), device=self.device)
        self.model.train()
        for j, (micro, weight) in enumerate(zip(micros, weights, strict=True)):
            mrows = [rows[i] for i in micro]
            mtable = table.take(pa.array(micro))
            with self.parallel.sync(j == len(micros) - 1):
                ids, mask, prow, pcol, targets = pack_rows([r["prompt_ids"] for r in mrows],
                                                           [r["completion_ids"] for r in mrows], self.device)
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.autocast):
                    logits = self.head(ids, mask, prow, pcol)
                stored = stored_tensors(mtable, self.columns, self.k, self.device)
                view = O.student_view(logits, targets, stored.get("topk_ids"), self.params.temperature)
                del logits  # backward needs only the log-softmax: one float32 [tokens x vocab] copy stays
                inputs = O.Inputs(view, **stored, taid_t=None if self.taid is None else self.taid.t,
                                  advantages=None if advantages is None else
                                  torch.cat([advantages[i] for i in micro]))
                per_token = self.objective.loss(inputs, self.params)
                (per_token.sum() * (scale * weight)).backward()
            if not weight:
                continue
            loss_sum += per_token.detach().sum()
            for name, values in O.diagnostics(inputs).items():
                sums[name] = sums.get(name, 0.0) + values.sum()
                if name == "is_ratio" and values.numel():
                    ratio_max = torch.maximum(ratio_max, values.max())
        # sums over ranks, then one device-to-host transfer per step
        names = sorted(sums)
        totals = self.world.sum(torch.stack([loss_sum.double(), *(sums[n].double() for n in names)])).tolist()
        ratio_max = float(self.world.max(ratio_max))
        loss_sum, sums = totals[0], dict(zip(names, totals[1:], strict=True))
        loss = loss_sum / tokens if tokens else float("nan")
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = self.parallel.clip_grad_norm(clip)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingError(f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} "
                                f"(loss {loss}, grad norm {grad_norm})")
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        record = {"loss": loss, "lr": lr, "tokens": tokens, "rows": step_rows, "grad_norm": grad_norm}
        for name, total in sums.items():
            record["is_ratio_mean" if name == "is_ratio" else name] = total / tokens
        if "is_ratio" in sums:
            record["is_ratio_max"] = ratio_max
        if self.taid is not None:
            record["taid_t"] = self.taid.t
        return record

    # ---- checkpoints ----

    def state(self, step: int, cursors: dict[int, int], data_parts: int) -> dict:
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
            "world_size": self.world.size,
            "data_parts": data_parts,
            "ranks": self.world.gather(mine),
            "fsdp": self.parallel.fsdp,
            "optimizer": self.parallel.optimizer_state(self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "taid": None if self.taid is None else {"t": self.taid.t, "momentum": self.taid.momentum,
                                                    "previous_loss": self.taid.previous_loss},
        }

    def load_state(self, state: dict) -> dict[int, int]:
        """Restores this rank's share of `state`; returns its data cursors."""
        self.parallel.load_optimizer_state(self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        mine = state["ranks"][self.world.rank]
        torch.set_rng_state(mine["torch_rng"])
        if mine["cuda_rng"]:
            torch.cuda.set_rng_state_all(mine["cuda_rng"])
        random.setstate(mine["python_rng"])
        if self.taid is not None and state["taid"] is not None:
            self.taid.t = state["taid"]["t"]
            self.taid.momentum = state["taid"]["momentum"]
            self.taid.previous_loss = state["taid"]["previous_loss"]
        return mine["cursors"]


def save_model(directory: Path, model, tokenizer, provenance: dict, weights: dict | None = None) -> None:
    """An HF model directory; `weights`: the full state dict when the model itself is sharded."""
    model.save_pretrained(directory, safe_serialization=True, state_dict=weights)
    tokenizer.save_pretrained(directory)
    models.write_provenance(directory, provenance)


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


def _total_steps(cfg: TrainConfig, manifest: dict) -> int:
    if cfg.steps is not None:
        return cfg.steps
    return max(1, math.ceil((cfg.epochs or 1.0) * manifest["rows"] / cfg.batch_size))


def data_parts_of(cfg: TrainConfig, manifest: dict, world: World) -> int:
    """How many disjoint parts the store is read in (default: one per rank), after checking it fits."""
    parts = cfg.data_parts or world.size
    launch = "the world size (torchrun's --nnodes x --nproc-per-node)"
    if parts % world.size:
        raise InputError(f"data_parts {parts} is not a multiple of {launch}, {world.size}: every rank must own "
                         "the same number of parts")
    if cfg.batch_size % parts:
        what = f"data_parts {parts}" if cfg.data_parts else launch + f", {world.size}"
        raise InputError(f"--batch-size {cfg.batch_size} is not divisible by {what}: each part gives a step "
                         f"batch_size / {parts} rows. Choose a multiple of {parts}")
    if len(manifest["shards"]) < parts:
        raise InputError(f"--data {cfg.data}: {len(manifest['shards'])} shard(s) cannot be split into {parts} "
                         "disjoint parts (one or more shards per part); write the store with smaller shards "
                         "(rollout --prompts-per-shard) or train with fewer ranks")
    return parts


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


def run(cfg: TrainConfig, params) -> dict | None:
    """Train; returns the result on rank 0 (None on other ranks)."""
    world, device = distributed.join(cfg.device)
    try:
        result = _run(cfg, params, world, device)
    except BaseException:
        distributed.leave(world, clean=False)
        raise
    distributed.leave(world)
    return result if world.main else None


def _run(cfg: TrainConfig, params, world: World, device: torch.device) -> dict:
    if not world.main:
        console.quiet = True  # rank 0 speaks for the run
    objective = O.OBJECTIVES[cfg.objective]
    student_dir = models.check_model_dir(cfg.student, "--student")
    manifest = check_data(cfg, objective)
    tokenizer = models.load_tokenizer(student_dir, cfg.trust_remote_code)
    if models.tokenizer_fingerprint(tokenizer) != manifest["tokenizer"]["fingerprint"]:
        raise InputError(
            f"--student {cfg.student}: its vocabulary ({models.tokenizer_fingerprint(tokenizer)}) differs from the "
            f"one --data {cfg.data} was sampled with ({manifest['tokenizer']['fingerprint']}); the stored token "
            "ids would mean different tokens"
        )
    parent = models.read_provenance(student_dir)
    sft_teacher = sft_teacher_of(cfg, manifest, objective, parent)
    out = Path(cfg.out)
    resume_from = latest_checkpoint(out) if cfg.resume else None
    if cfg.resume and resume_from is None:
        _warn(f"--resume: no checkpoint in {out}/checkpoints; starting from the beginning")
    if not cfg.resume and out.exists() and any(out.iterdir()):
        raise InputError(f"--out {out}: already holds files; pass --resume to continue its run, "
                         "or choose another --out")
    total_steps = _total_steps(cfg, manifest)
    parts = data_parts_of(cfg, manifest, world)
    if cfg.fsdp and not world.active:
        _warn("--fsdp shards the student over torchrun's ranks; in a single process it does nothing")
    k = manifest.get("scoring", {}).get("top_k")
    provenance = {
        "lightopd_version": __version__,
        "parent": {"path": str(student_dir.resolve()), "fingerprint": models.model_fingerprint(student_dir),
                   "sft_teacher": (parent or {}).get("sft_teacher")},
        "sft_teacher": sft_teacher,
        "data": {"path": str(Path(cfg.data).resolve()), "format": manifest["format"],
                 "fingerprint": manifest_fingerprint(cfg.data),
                 "teacher": manifest.get("teacher")},
        "objective": {"name": objective.name, "params": asdict(params)},
        "train": {k_: v for k_, v in asdict(cfg).items() if k_ not in ("student", "data", "out", "resume")},
        "parallel": {"world_size": world.size, "data_parts": parts, "fsdp": cfg.fsdp and world.active},
    }
    state = None
    if resume_from is not None:
        state = torch.load(resume_from / STATE, weights_only=True, map_location="cpu")
        check_resumable(state, resume_from, world, parts, cfg.fsdp and world.active)
    world.barrier()  # every rank has passed every check before rank 0 writes anything

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model = models.load_model(resume_from or student_dir, device, torch.float32, cfg.trust_remote_code)
    trainer = Trainer(cfg, params, objective, manifest, model, k, total_steps, world)
    columns = ["prompt_ids", "completion_ids", *trainer.columns]
    stream = StepStream(cfg.data, manifest, columns, cfg.seed, cfg.shuffle_buffer, parts, world.rank, world.size)
    start_step = 0
    metrics_path = out / "metrics.jsonl"
    if state is not None:
        stream.skip(trainer.load_state(state))
        start_step = state["step"]
        console.print(f"resuming {out} from {resume_from.name}")
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        if state is not None:
            kept = [line for line in metrics_path.read_text().splitlines()
                    if json.loads(line)["step"] <= start_step] if metrics_path.exists() else []
            metrics_path.write_text("".join(line + "\n" for line in kept))
        else:
            metrics_path.unlink(missing_ok=True)

    started = time.perf_counter()
    total_tokens = 0
    last = None
    with StageProgress("train", total=total_steps, completed=start_step, disable=not world.main) as bar, \
            open(metrics_path if world.main else os.devnull, "a") as metrics:
        for step in range(start_step + 1, total_steps + 1):
            t0 = time.perf_counter()
            groups = stream.take_step(cfg.batch_size // parts)
            try:
                record = trainer.step(groups)
            except TrainingError as e:
                kept = latest_checkpoint(out)
                raise TrainingError(f"step {step}: {e}; training stopped. "
                                    + (f"The last good checkpoint is {kept}." if kept else "No checkpoint was saved.")
                                    ) from None
            seconds = time.perf_counter() - t0
            if trainer.taid is not None:
                trainer.taid.update(step, record["loss"])
            record = {"step": step, **record, "tokens_per_s": round(record["tokens"] / seconds, 1)}
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            total_tokens += record["tokens"]
            last = record
            bar.advance(items=1, tokens=record["tokens"], status=f"loss {record['loss']:.4f}")
            if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                state, weights = trainer.state(step, stream.cursors(), parts), trainer.parallel.model_state()
                if world.main:  # every rank took part in gathering the state; rank 0 writes it
                    save_checkpoint(out, step, model, tokenizer, provenance, state, weights)
    final = trainer.state(total_steps, stream.cursors(), parts) if cfg.save_every else None
    weights = trainer.parallel.model_state()
    if world.main:
        save_model(out, model, tokenizer, {**provenance, "steps": total_steps}, weights)
        if final is not None:
            save_checkpoint(out, total_steps, model, tokenizer, provenance, final, weights)
    seconds = time.perf_counter() - started
    return {
        "command": "train",
        "model": str(out),
        "objective": objective.name,
        "steps": total_steps,
        "resumed_from": None if resume_from is None else resume_from.name,
        "tokens": total_tokens,
        "final_loss": None if last is None else last["loss"],
        "seconds": round(seconds, 3),
        "tokens_per_s": round(total_tokens / seconds, 1) if total_tokens else None,
        "metrics": str(metrics_path),
    }
