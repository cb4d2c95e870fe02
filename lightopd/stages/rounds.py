"""Stage `rounds`: rollout → score-teacher → train, and a held-out check, round after round in one
process, from fully offline (one round) to nearly online (a round per step).

Round r samples the current student (the `--student` in round 1, round r−1's trained student
after) on the prompts with seed `--seed + r − 1`, the teacher scores those rollouts once, and the
student trains on them for `--steps-per-round` steps, or until `--refresh-when`'s metric crosses
its threshold (the store has gone stale), after which the next round samples the new student. The
rounds go on until `--rounds × --steps-per-round` steps are trained (at most `--rounds` rounds
without a refresh rule). Each round's stores, student, metrics and held-out check stay under
OUT/round-r/ with their provenance, so the plain commands can inspect, re-run or reuse any of
them: round r's rollouts name round r−1's student as their model.

Every stage resumes on its own (a complete store is left as it is, an unfinished one is finished,
training resumes from its newest checkpoint, a finished student is kept), so a run killed at any
point and started again with the same options goes on where it stopped, losing and duplicating
nothing. In this one process (imports once), the student a round trains is handed in memory to the
next round's sampling and training (engine/held.py; its directory is still written and checked,
and is read instead after a restart, or where the handed-over copy cannot serve the load); the
teacher is loaded once for every round (`--keep-teacher`, the default, holds its memory while the
student trains), and tokenizers are read once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path

from lightopd.config import RolloutConfig, ScoreConfig
from lightopd.data.lock import LOCK, exclusive
from lightopd.data.reader import iter_batches
from lightopd.data.store import open_store, store_columns
from lightopd.engine import held
from lightopd.errors import InputError
from lightopd.layering import train_settings
from lightopd.progress import console
from lightopd.rounds_config import RoundsConfig
from lightopd.specs import SourceSpec
from lightopd.stages import rollout, score, train
from lightopd.stages.prompts import mapped, write_records
from lightopd.training import distributed
from lightopd.training.distributed import World
from lightopd.training.resume import finished_steps


def _rollout(cfg: RoundsConfig, model: Path | str, prompts: SourceSpec, out: Path, n: int, seed: int,
             limit: int | None, worker: str) -> Path:
    spec = dataclasses.replace(cfg.student, path=str(model))
    sampling = dataclasses.replace(cfg.sampling, n=n, seed=seed)
    rollout.run(RolloutConfig(model=spec, prompts=prompts, render=cfg.render, out=str(out), sampling=sampling,
                              engine=cfg.engine, checking=cfg.checking, limit=limit,
                              generation_batch_size=cfg.generation_batch_size, worker=worker))
    return out


def _score(cfg: RoundsConfig, rollouts: Path, out: Path, loaded: dict | None, worker: str) -> Path:
    spec = dataclasses.replace(cfg.student, path=cfg.teacher)
    score.run(ScoreConfig(teacher=spec, data=str(rollouts), out=str(out), top_k=cfg.teacher_top_k,
                          engine=cfg.engine, worker=worker), loaded)
    return out


def _prompts(cfg: RoundsConfig, records: list[dict] | None, r: int, work: Path, world: World) -> SourceSpec:
    """Round r's prompts: the source itself, or (--prompts-per-round N) the next N of its records,
    cycling, written once to OUT/round-r/prompts.jsonl (as `lightopd prompts` writes them)."""
    if records is None:
        return cfg.prompts
    path, n = work / "prompts.jsonl", cfg.prompts_per_round
    chosen = [records[(i + (r - 1) * n) % len(records)] for i in range(n)]
    if world.main and (not path.is_file() or [json.loads(line) for line in path.read_text().splitlines()] != chosen):
        work.mkdir(parents=True, exist_ok=True)
        write_records(path, chosen)  # (a file from a run with other options is replaced)
    world.barrier()
    return SourceSpec(source=str(path))


def _train(cfg: RoundsConfig, model: Path | str, store: Path, out: Path, steps: int,
           sets: list[tuple[str, object]], world: World) -> int:
    """Train round's student (or keep it, if it is finished); returns the steps it was trained."""
    done = finished_steps(out) if out.is_dir() else None
    resume = out.is_dir() and any(p.name != LOCK for p in out.iterdir())
    world.barrier()  # every rank has looked before rank 0 writes (ranks decide alike)
    if done is not None:
        return done
    flags = {"student": str(model), "data": str(store), "out": str(out), "objective": cfg.objective, "lr": cfg.lr,
             "batch_size": cfg.batch_size, "steps": steps, "seed": cfg.sampling.seed,
             "save_every": cfg.save_every if steps > cfg.save_every else 0,  # (a round's last checkpoint: unread)
             "resume": resume, "stop_when": cfg.refresh_when,
             "stop_window": cfg.refresh_window,
             "device": cfg.student.device, "dtype": cfg.student.dtype,
             "trust_remote_code": cfg.student.trust_remote_code, "attn_implementation": cfg.student.attn_implementation}
    result = train.run(*train_settings(flags, None, sets))
    return result["steps"] if result is not None else finished_steps(out)  # (other ranks: rank 0 has written it)


def _metrics(student: Path) -> list[dict]:
    path = student / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _heldout(store: Path) -> dict:
    """Accuracy (mean reward, where the prompts have answers) and the KL of the student to the teacher
    on its own held-out samples: the mean over their tokens of ℓθ − ℓT (ℓθ: the untruncated policy)."""
    manifest = open_store(store)
    columns = [c for c in ("reward", "behavior_logprobs", "policy_logprobs", "teacher_logprobs")
               if c in store_columns(manifest)]
    rewards, gap, tokens = [], 0.0, 0
    for batch in iter_batches(store, columns=columns, manifest=manifest):
        for row in batch.to_pylist():
            if row.get("reward") is not None:
                rewards.append(row["reward"])
            own = row.get("policy_logprobs") or row["behavior_logprobs"]
            gap += sum(a - b for a, b in zip(own, row["teacher_logprobs"], strict=True))
            tokens += len(own)
    return {"heldout_accuracy": sum(rewards) / len(rewards) if rewards else None,
            "heldout_kl": gap / tokens if tokens else None}


def _summary(r: int, work: Path, model: Path | str, planned: int, steps: int, heldout: dict | None) -> dict:
    lines = _metrics(work / "student")
    last = lines[-1] if lines else {}
    rollouts = open_store(work / "rollouts")
    return {"round": r, "sampled_by": str(model), "steps": steps,
            "ended": "refresh_when" if steps < planned else "steps",
            "sampled_tokens": rollouts["tokens"], "scored_tokens": open_store(work / "teacher-store")["tokens"],
            "trained_tokens": sum(m["tokens"] for m in lines),
            **{name: last[name] for name in ("loss", "k1", "is_ess", "rollout_kl", "clip_fraction") if name in last},
            **(heldout or {})}


def run(cfg: RoundsConfig, sets: list[tuple[str, object]] = ()) -> dict | None:
    """Run (or resume) every round into `cfg.out`; returns the JSON summary (None on ranks other than
    0 under torchrun, where every rank samples and scores its share of each store, as `--worker
    RANK/SIZE` would, and trains with the others as `train` does)."""
    world, _ = distributed.join(cfg.student.device)
    try:
        if not world.main:
            console.quiet = True  # rank 0 speaks for the run
        # the student is handed on in memory when the teacher stays loaded too: with --no-keep-teacher
        # (the two do not fit together) nothing of the student is held while the teacher scores
        with exclusive(Path(cfg.out), f"--out {cfg.out}") if world.main else contextlib.nullcontext(), \
                held.handing_over() if cfg.keep_teacher else contextlib.nullcontext():
            result = _run(cfg, list(sets), world)
    except BaseException:
        distributed.leave(world, clean=False)
        raise
    distributed.leave(world)
    return result if world.main else None


def _run(cfg: RoundsConfig, sets: list[tuple[str, object]], world: World) -> dict:
    out, worker = Path(cfg.out), f"{world.rank}/{world.size}"
    started = time.perf_counter()
    heldout_prompts = None if cfg.heldout is None else SourceSpec(source=cfg.heldout)
    model: Path | str = cfg.student.path
    done, rounds = 0, []
    loaded: dict | None = {} if cfg.keep_teacher else None  # the teacher, loaded once for every round
    records = mapped(cfg.prompts, cfg.limit) if cfg.prompts_per_round else None
    if records is not None and len(records) < cfg.prompts_per_round:
        raise InputError(f"--prompts-per-round {cfg.prompts_per_round}: more than the {len(records)} records of "
                         f"--prompts {cfg.prompts.source} (a round's prompts must be distinct)")
    for r in range(1, cfg.budget + 1):
        if done >= cfg.budget or (cfg.refresh_when is None and r > cfg.rounds):
            break
        work = out / f"round-{r}"
        planned = min(cfg.steps_per_round, cfg.budget - done)
        console.print(f"[bold]round {r}[/bold]: {done} of {cfg.budget} steps trained; sampling {model}")
        prompts = _prompts(cfg, records, r, work, world)
        rollouts = _rollout(cfg, model, prompts, work / "rollouts", cfg.sampling.n, cfg.sampling.seed + r - 1,
                            cfg.limit, worker)
        world.barrier()  # every rank's shards are written: the store is whole
        store = _score(cfg, rollouts, work / "teacher-store", loaded, worker)
        world.barrier()
        steps = _train(cfg, model, store, work / "student", planned, sets, world)
        heldout = None
        if heldout_prompts is not None:
            checked = _rollout(cfg, work / "student", heldout_prompts, work / "heldout-rollouts", 1,
                               cfg.sampling.seed, None, worker)
            world.barrier()
            scored = _score(cfg, checked, work / "heldout-store", loaded, worker)
            world.barrier()
            heldout = _heldout(scored)
        rounds.append(_summary(r, work, model, planned, steps, heldout))
        if world.main:
            (out / "rounds.jsonl").write_text("".join(json.dumps(line) + "\n" for line in rounds))
        done += steps
        model = work / "student"
    return {"command": "rounds", "out": str(out), "model": str(model), "rounds": len(rounds), "steps": done,
            "sampled_tokens": sum(x["sampled_tokens"] for x in rounds),
            "scored_tokens": sum(x["scored_tokens"] for x in rounds),
            "trained_tokens": sum(x["trained_tokens"] for x in rounds),
            "last_round": rounds[-1], "summary": str(out / "rounds.jsonl"),
            "seconds": round(time.perf_counter() - started, 3)}
