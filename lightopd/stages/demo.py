"""Stage `demo`: the Lightning OPD recipe end to end on the bundled addition task and teacher.

1. The bundled teacher (two solution formats, `tasks/teachers/two-format`) answers the SFT
   prompts once each at temperature 1: the SFT data (`rollout`).
2. A small random student is SFT-trained on it (`train --objective sft`).
3. The SFT student answers the OPD prompts several times each (`rollout`), and the teacher
   scores those rollouts once (`score-teacher`).
4. The SFT student trains on the stored signal (`train`, opd-seq by default), and, as the
   control, the SFT student spends the same number of steps on more SFT.
5. base, SFT, SFT-more, OPD and the teacher answer held-out pairs, one sample each at
   temperature 1 (the policy itself, not its argmax): accuracy, and the share and accuracy of
   each solution format, so it is visible what OPD changed.

With `--context`, the same steps distill a context instead of a bigger teacher: the tagged teacher
(`tasks/teachers/tagged`) writes SFT data half of whose prompts carry the tag `+` (asking for the
worked format), and in step 4 the SFT student itself scores its untagged rollouts with the tag in
front of each prompt (`score-teacher --teacher-prompt '+{prompt}'`); the table adds the SFT
student evaluated with the tag (`sft_tagged`), the ceiling self-distillation aims at.

Every step is the real command's stage function on real stores under `--out`, so each
intermediate store and model can be inspected or reused afterwards.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

from lightopd.config import EvalConfig, RolloutConfig, ScoreConfig
from lightopd.demo_config import DemoConfig
from lightopd.engine import models
from lightopd.engine.samplers import open_sampler
from lightopd.errors import InputError
from lightopd.layering import train_settings
from lightopd.progress import console
from lightopd.report import render_demo
from lightopd.stages import rollout, score, train
from lightopd.stages.evaluate import read_checked_prompts, sample_and_check
from lightopd.tasks import addition as A
from lightopd.tasks.verifiers import open_verifier

TEACHER = A.TEACHERS / "two-format"
TAGGED_TEACHER = A.TEACHERS / "tagged"  # follows the tag: worked format when tagged, either format otherwise
MAX_NEW_TOKENS = 12  # the longest solution, 4 reversed digits + "|" + 4 digits, and the end token fit
MODELS = ("base", "sft", "sft_more", "opd", "teacher")
EVAL_TEMPERATURE = 1.0


def _stage(number: int, title: str) -> None:
    console.print(f"[bold]demo {number}/7[/bold] {title}")


def evaluate(model_dir: Path, prompts: Path, device_name: str = "auto", seed: int = 0) -> dict:
    """Accuracy of one sample (T = 1) per held-out prompt, and each solution format's share and accuracy."""
    eval_cfg = EvalConfig.of(model=str(model_dir), prompts=str(prompts), temperature=EVAL_TEMPERATURE,
                             max_new_tokens=MAX_NEW_TOKENS, generation_batch_size=256, seed=seed, device=device_name)
    tokenizer = models.load_tokenizer(model_dir)
    info = models.model_info(model_dir, tokenizer)
    prompts = read_checked_prompts(eval_cfg, tokenizer, info)
    sampler = open_sampler(model_dir, eval_cfg.model, eval_cfg.engine, info, eval_cfg.generation_batch_size,
                           eval_cfg.kv_cache_tokens, seed)
    with open_verifier(eval_cfg.checking.checker, eval_cfg.checking.checker_timeout) as verify:
        samples = sample_and_check(sampler, tokenizer, prompts, eval_cfg, verify)
    formats = Counter()
    correct = Counter()
    for texts, results in zip(samples.texts, samples.results, strict=True):
        fmt = A.format_of(texts[0])
        formats[fmt] += 1
        correct[fmt] += results[0][0]
    total = len(prompts.records)
    return {
        "accuracy": samples.metrics(1)["accuracy"],
        "format_share": {f: formats[f] / total for f in (*A.FORMATS, "other") if formats[f]},
        "format_accuracy": {f: correct[f] / formats[f] for f in (*A.FORMATS, "other") if formats[f]},
    }


def sample(model: Path, prompts: Path, out: Path, n: int, seed: int, device: str) -> Path:
    """`lightopd rollout` of `model` on task prompts, at temperature 1: the rollout store `out`."""
    rollout.run(RolloutConfig.of(model=str(model), prompts=str(prompts), out=str(out), n=n,
                                 max_new_tokens=MAX_NEW_TOKENS, temperature=1.0, seed=seed, generation_batch_size=512,
                                 device=device))
    return out


def score_once(rollouts: Path, out: Path, top_k: int, device: str, teacher: Path = TEACHER,
               template: str | None = None, where: tuple[str, ...] = (), name: str | None = None) -> Path:
    """`lightopd score-teacher` (the bundled two-format teacher by default; `template` its
    --teacher-prompt, `where` its route, `name` its --teacher-name): the teacher store `out`."""
    score.run(ScoreConfig.of(teacher=str(teacher), data=str(rollouts), out=str(out), top_k=top_k, device=device,
                             teacher_prompt=template, where=where, teacher_name=name))
    return out


def train_student(student: Path, data: Path | tuple[Path, ...], out: Path, objective: str, steps: int, lr: float,
                  batch_size: int, seed: int, device: str, sets: tuple[tuple[str, object], ...] = (), **flags) -> dict:
    """`lightopd train` with these settings (`data` one store or several; any other training keys in
    `flags`, `--set` pairs in `sets`)."""
    stores = tuple(map(str, data)) if isinstance(data, tuple) else str(data)
    settings = {"student": str(student), "data": stores, "out": str(out), "objective": objective, "steps": steps,
                "lr": lr, "batch_size": batch_size, "seed": seed, "device": device, **flags}
    return train.run(*train_settings(settings, None, list(sets)))


def run(cfg: DemoConfig) -> dict:
    teacher = TAGGED_TEACHER if cfg.context else TEACHER
    if not (teacher / "model.safetensors").is_file():
        raise InputError(f"the bundled teacher is missing from {teacher}; reinstall lightopd")
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()):
        raise InputError(f"--out {out}: already holds files; choose another directory (the demo starts fresh)")
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    started = time.perf_counter()

    def timed(name: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        value = fn(*args, **kwargs)
        seconds[name] = round(time.perf_counter() - t0, 1)
        return value

    prompts = {
        "sft": A.write_prompts(out / "prompts-sft.jsonl", cfg.sft_prompts, "train", cfg.seed,
                               tagged=0.5 if cfg.context else 0.0),
        "opd": A.write_prompts(out / "prompts-opd.jsonl", cfg.opd_prompts, "train", cfg.seed + 10_000),
        "heldout": A.write_prompts(out / "prompts-heldout.jsonl", cfg.heldout_prompts, "heldout", cfg.seed),
    }
    paths = {"base": out / "base", "sft": out / "sft", "sft_more": out / "sft-more", "opd": out / "opd",
             "teacher": teacher}
    models = MODELS
    if cfg.context:
        prompts["heldout_tagged"] = A.write_prompts(out / "prompts-heldout-tagged.jsonl", cfg.heldout_prompts,
                                                    "heldout", cfg.seed, tagged=1.0)
        models = ("base", "sft", "sft_tagged", "sft_more", "opd", "teacher")
    A.make_model(paths["base"], cfg.student_hidden, cfg.student_layers, cfg.student_heads, cfg.seed,
                 cfg.student_arch)

    _stage(1, "the teacher writes the SFT data")
    timed("rollout_teacher", sample, teacher, prompts["sft"], out / "sft-data", 1, cfg.seed, cfg.device)
    _stage(2, "SFT of the student on the teacher's samples")
    timed("sft", train_student, paths["base"], out / "sft-data", paths["sft"], "sft", cfg.sft_steps, cfg.sft_lr,
          cfg.sft_batch_size, cfg.seed, cfg.device, dropout=cfg.student_dropout)
    _stage(3, "the SFT student is rolled out")
    timed("rollout_student", sample, paths["sft"], prompts["opd"], out / "rollouts", cfg.opd_samples, cfg.seed,
          cfg.device)
    if cfg.context:
        _stage(4, "the SFT student scores its own rollouts as if each prompt were tagged")
        timed("score_teacher", score_once, out / "rollouts", out / "teacher-store", cfg.top_k, cfg.device,
              paths["sft"], A.TAG + "{prompt}")
    else:
        _stage(4, "the teacher scores the rollouts once")
        timed("score_teacher", score_once, out / "rollouts", out / "teacher-store", cfg.top_k, cfg.device)
    _stage(5, f"offline OPD ({cfg.objective}) from the SFT student")
    timed("opd", train_student, paths["sft"], out / "teacher-store", paths["opd"], cfg.objective, cfg.opd_steps,
          cfg.opd_lr, cfg.opd_batch_size, cfg.seed, cfg.device, dropout=cfg.student_dropout)
    _stage(6, "control: the same steps of more SFT")
    timed("sft_more", train_student, paths["sft"], out / "sft-data", paths["sft_more"], "sft", cfg.opd_steps,
          cfg.sft_lr, cfg.sft_batch_size, cfg.seed, cfg.device, dropout=cfg.student_dropout)
    _stage(7, "held-out evaluation")
    t0 = time.perf_counter()
    results = {name: evaluate(paths[name], prompts["heldout"], cfg.device, cfg.seed) for name in MODELS}
    if cfg.context:
        results["sft_tagged"] = evaluate(paths["sft"], prompts["heldout_tagged"], cfg.device, cfg.seed)
    seconds["eval"] = round(time.perf_counter() - t0, 1)
    seconds["total"] = round(time.perf_counter() - started, 1)
    render_demo(results, models, (*A.FORMATS, "other"))
    summary = {
        "command": "demo",
        "out": str(out),
        "seed": cfg.seed,
        "objective": cfg.objective,
        "variant": "context self-distillation" if cfg.context else "teacher",
        "heldout_prompts": cfg.heldout_prompts,
        "accuracy": {name: results[name]["accuracy"] for name in models},
        "format_share": {name: results[name]["format_share"] for name in models},
        "format_accuracy": {name: results[name]["format_accuracy"] for name in models},
        "seconds": seconds,
    }
    (out / "demo.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return summary

