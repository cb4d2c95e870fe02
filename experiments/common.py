"""What the demo-task experiments share: a fresh output directory, and one seed's demo pipeline up
to the OPD step (task prompts, the SFT student, its rollouts with rewards, the teacher's scores)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lightopd.demo_config import DemoConfig
from lightopd.memory import release_freed_memory
from lightopd.stages import demo
from lightopd.tasks import addition as A

D = DemoConfig  # the demo's sizes and learning rates


def arguments(doc: str, name: str) -> argparse.ArgumentParser:
    """The options every experiment takes: --out (runs/NAME), --seeds (0 1 2), --device."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(f"runs/{name}"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--device", default="auto")
    return ap


def seeds(doc: str, name: str, run_seed) -> tuple[argparse.Namespace, dict, float]:
    """Parse the options, make a fresh --out and run `run_seed(seed, out, device)` for each seed:
    (the options, {seed: its result}, the start time)."""
    ap = arguments(doc, name)
    args = ap.parse_args()
    fresh_out(ap, args.out)
    started = time.perf_counter()
    return args, {seed: run_seed(seed, args.out, args.device) for seed in args.seeds}, started


def heldout_prompts(out: Path, seed: int) -> Path:
    """The seed's held-out prompts file under `out` (the demo's count)."""
    return A.write_prompts(out / f"prompts-heldout-{seed}.jsonl", D.heldout_prompts, "heldout", seed)


def fresh_out(ap: argparse.ArgumentParser, out: Path) -> None:
    """Refuse an `out` that holds files; create it."""
    if out.exists() and any(out.iterdir()):
        ap.error(f"--out {out}: already holds files")
    release_freed_memory()
    out.mkdir(parents=True, exist_ok=True)


def demo_until_opd(work: Path, seed: int, device: str, dropout: bool) -> dict[str, Path]:
    """The demo's steps 1–4 for `seed` under `work`: {"sft-data", "sft", "rollouts", "teacher-store"}."""
    work.mkdir(parents=True)
    sft_prompts = A.write_prompts(work / "prompts-sft.jsonl", D.sft_prompts, "train", seed)
    opd_prompts = A.write_prompts(work / "prompts-opd.jsonl", D.opd_prompts, "train", seed + 10_000)
    A.make_model(work / "base", D.student_hidden, D.student_layers, D.student_heads, seed, D.student_arch)
    data = demo.sample(demo.TEACHER, sft_prompts, work / "sft-data", 1, seed, device)
    demo.train_student(work / "base", data, work / "sft", "sft", D.sft_steps, D.sft_lr, D.sft_batch_size, seed,
                       device, dropout=dropout)
    rollouts = demo.sample(work / "sft", opd_prompts, work / "rollouts", D.opd_samples, seed, device)
    store = demo.score_once(rollouts, work / "teacher-store", D.top_k, device)
    return {"sft-data": data, "sft": work / "sft", "rollouts": rollouts, "teacher-store": store}
