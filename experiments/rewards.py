"""Which rollouts get the teacher, and how much: the reward-aware objectives on the demo's task.

For each seed this runs the demo's SFT, the SFT student's rollouts (with rewards: exact match of
the sum, the auto checker) and the teacher's scoring once; then, from the same SFT student with
the demo's OPD budget (steps, batch, learning rate), each method below; and reports held-out
accuracy (one sample per prompt, T = 1). `redi` trains on the teacher's own samples with their
rewards (the SFT data), the paper's setting; every other method on the student's rollouts.

    python experiments/rewards.py --out runs/rewards [--seeds 0 1 2]
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from common import D, demo_until_opd, heldout_prompts, seeds

from lightopd.stages import demo

METHODS = {  # name: (objective, --set pairs, the store it trains on)
    "lightning-opd": ("lightning-opd", (), "teacher-store"),
    "opd-seq": ("opd-seq", (), "teacher-store"),
    "grpo": ("grpo", (), "teacher-store"),
    "kdrl": ("kdrl", (), "teacher-store"),
    "uni-opd": ("uni-opd", (), "teacher-store"),
    "rlad": ("rlad", (), "teacher-store"),
    "scope": ("scope", (), "teacher-store"),
    "srpo": ("srpo", (), "teacher-store"),
    "lightning-opd + paced": ("lightning-opd", (("objective.row_weight", "paced"),), "teacher-store"),
    "redi (teacher samples)": ("redi", (), "sft-data"),
}


def run_seed(seed: int, out: Path, heldout: Path, device: str) -> dict:
    work = out / f"seed{seed}"
    demo_until_opd(work, seed, device, D.student_dropout)
    result = {"seed": seed, "sft": demo.evaluate(work / "sft", heldout, device, seed)["accuracy"]}
    for i, (name, (objective, sets, store)) in enumerate(METHODS.items()):
        demo.train_student(work / "sft", work / store, work / f"m{i}", objective, D.opd_steps, D.opd_lr,
                           D.opd_batch_size, seed, device, sets=sets, dropout=D.student_dropout)
        result[name] = demo.evaluate(work / f"m{i}", heldout, device, seed)["accuracy"]
    return result


def main() -> None:
    args, by_seed, started = seeds(__doc__, "rewards", lambda seed, out, device: run_seed(
        seed, out, heldout_prompts(out, seed), device))
    rows = list(by_seed.values())
    names = ["sft", *METHODS]
    print("| method | " + " | ".join(f"seed {r['seed']}" for r in rows) + " | mean |")
    print("|---|" + "---|" * (len(rows) + 1))
    for name in names:
        values = [r[name] for r in rows]
        print(f"| {name} | " + " | ".join(f"{v:.1%}" for v in values) + f" | {statistics.mean(values):.1%} |")
    print(json.dumps({"experiment": "rewards", "seeds": args.seeds, "rows": rows,
                      "mean_accuracy": {n: statistics.mean(r[n] for r in rows) for n in names},
                      "seconds": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
