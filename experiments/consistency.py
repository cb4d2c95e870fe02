"""Teacher consistency, in miniature, on the bundled addition task (`make experiment`).

Two teachers are equally accurate on held-out pairs. Teacher A (`two-format`) writes worked or
direct solutions; teacher B (`plain`) writes the bare sum. A 1-layer student is SFT-trained on
samples from A or from B, and then trained with OPD against A in one of two ways:
- offline: one rollout set of the SFT student, scored by A once;
- refreshed: every `--round-steps` steps the current student is rolled out again and re-scored
  by A. This approaches online OPD, with an optimizer that restarts each round.
SFT from A followed by OPD against A is the consistent setting. SFT from B followed by OPD
against A is the inconsistent one: the teacher that scores is not the teacher the student
imitated. Held-out accuracy (one sample per prompt at T = 1) is measured every `--eval-every` steps.

Output: a JSON file of every curve, a PNG of the mean over seeds (with the min-max band), and a
Markdown table on stdout.

    python experiments/consistency.py --out runs/consistency --seeds 0 1 2 --png docs/consistency.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from lightopd.demo_config import DemoConfig
from lightopd.memory import release_freed_memory
from lightopd.stages import demo
from lightopd.tasks import addition as A

TEACHERS = {"A": demo.TEACHER, "B": demo.TEACHER.parent / "plain"}
D = DemoConfig  # the demo's sizes and learning rates are this experiment's too


def opd(student: Path, data: Path, out: Path, steps: int, seed: int, device: str, save_every: int = 0) -> Path:
    demo.train_student(student, data, out, D.objective, steps, D.opd_lr, D.opd_batch_size, seed, device,
                       save_every=save_every, allow_teacher_mismatch=True)
    return out


def offline(sft: Path, work: Path, args, seed: int) -> list[tuple[int, float]]:
    work.mkdir(parents=True)
    prompts = A.write_prompts(work / "prompts-opd.jsonl", D.opd_prompts, "train", seed + 10_000)
    rollouts = demo.sample(sft, prompts, work / "rollouts", D.opd_samples, seed, args.device)
    data = demo.score_once(rollouts, work / "teacher", D.top_k, args.device)
    opd(sft, data, work / "opd", args.steps, seed, args.device, save_every=args.eval_every)
    return [(step, demo.evaluate(work / "opd" / "checkpoints" / f"step-{step}", args.heldout,
                                 args.device)["accuracy"])
            for step in range(args.eval_every, args.steps + 1, args.eval_every)]


def refreshed(sft: Path, work: Path, args, seed: int) -> list[tuple[int, float]]:
    work.mkdir(parents=True)
    rows = args.round_steps * D.opd_batch_size  # one pass over a fresh rollout set per round
    student, curve = sft, []
    for r, step in enumerate(range(args.round_steps, args.steps + 1, args.round_steps)):
        prompts = A.write_prompts(work / f"prompts-{r}.jsonl", rows // D.opd_samples, "train", seed + 20_000 + r)
        rollouts = demo.sample(student, prompts, work / f"rollouts-{r}", D.opd_samples, seed * 1000 + r,
                               args.device)
        data = demo.score_once(rollouts, work / f"teacher-{r}", D.top_k, args.device)
        student = opd(student, data, work / f"opd-{r}", args.round_steps, seed + r, args.device)
        if step % args.eval_every == 0:
            curve.append((step, demo.evaluate(student, args.heldout, args.device)["accuracy"]))
    return curve


def run_seed(seed: int, args) -> dict[str, list[tuple[int, float]]]:
    curves = {}
    for source in ("A", "B"):
        work = args.out / f"seed{seed}" / f"sft-from-{source}"
        work.mkdir(parents=True, exist_ok=True)
        prompts = A.write_prompts(work / "prompts-sft.jsonl", D.sft_prompts, "train", seed)
        data = demo.sample(TEACHERS[source], prompts, work / "sft-data", 1, seed, args.device)
        A.make_model(work / "base", D.student_hidden, D.student_layers, D.student_heads, seed, D.student_arch)
        demo.train_student(work / "base", data, work / "sft", "sft", D.sft_steps, D.sft_lr, D.sft_batch_size, seed,
                           args.device)
        start = (0, demo.evaluate(work / "sft", args.heldout, args.device)["accuracy"])
        curves[f"SFT from {source}, offline OPD"] = [start, *offline(work / "sft", work / "offline", args, seed)]
        curves[f"SFT from {source}, refreshed OPD"] = [start, *refreshed(work / "sft", work / "refreshed", args,
                                                                         seed)]
        print(json.dumps({"seed": seed, "source": source,
                          **{k: v for k, v in curves.items() if k.startswith(f"SFT from {source}")}}),
              file=sys.stderr, flush=True)
    return curves


def summarise(by_seed: dict[int, dict]) -> dict[str, list[tuple[int, float, float, float]]]:
    """Per arm and step: (step, mean, min, max) over seeds."""
    arms = next(iter(by_seed.values())).keys()
    out = {}
    for arm in arms:
        steps = [s for s, _ in next(iter(by_seed.values()))[arm]]
        out[arm] = []
        for i, step in enumerate(steps):
            values = [curves[arm][i][1] for curves in by_seed.values()]
            out[arm].append((step, statistics.mean(values), min(values), max(values)))
    return out


def table(summary: dict, seeds: list[int]) -> str:
    steps = [p[0] for p in next(iter(summary.values()))]
    lines = ["| arm | " + " | ".join(f"step {s}" for s in steps) + " |",
             "|---|" + "---|" * len(steps)]
    for arm, points in summary.items():
        cells = [f"{m:.1%}" + (f" ({lo:.0%}–{hi:.0%})" if len(seeds) > 1 else "") for _, m, lo, hi in points]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/consistency"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=D.opd_steps)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--round-steps", type=int, default=100, help="refreshed OPD: steps per rollout set")
    ap.add_argument("--heldout-prompts", type=int, default=1000)
    ap.add_argument("--png", type=Path, default=Path("docs/consistency.png"))
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    if args.out.exists() and any(args.out.iterdir()):
        ap.error(f"--out {args.out}: already holds files")
    if args.eval_every % args.round_steps or args.steps % args.eval_every:
        ap.error("--eval-every must be a multiple of --round-steps, and --steps of --eval-every")
    release_freed_memory()
    args.out.mkdir(parents=True, exist_ok=True)
    args.heldout = A.write_prompts(args.out / "prompts-heldout.jsonl", args.heldout_prompts, "heldout", 0)
    started = time.perf_counter()
    by_seed = {seed: run_seed(seed, args) for seed in args.seeds}
    summary = summarise(by_seed)
    teachers = {name: demo.evaluate(path, args.heldout, args.device) for name, path in TEACHERS.items()}
    result = {"seeds": args.seeds, "steps": args.steps, "round_steps": args.round_steps,
              "heldout_prompts": args.heldout_prompts, "teachers": teachers, "curves": by_seed,
              "summary": summary, "seconds": round(time.perf_counter() - started, 1)}
    (args.out / "consistency.json").write_text(json.dumps(result, indent=2) + "\n")
    from lightopd.plots import curves

    curves(args.png, summary,
           f"OPD against teacher A, held-out accuracy (seeds {', '.join(map(str, args.seeds))})",
           "OPD step", "accuracy")
    print(table(summary, args.seeds))
    print(f"\nteachers: A {teachers['A']['accuracy']:.1%}, B {teachers['B']['accuracy']:.1%}; "
          f"{result['seconds']:.0f} s; {args.out / 'consistency.json'}, {args.png}")


if __name__ == "__main__":
    main()
