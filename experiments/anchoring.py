"""What should opd-seq's ratio be anchored to? The demo's recipe, both ways, over three seeds.

opd-seq trains on rollouts sampled once from the SFT student. `anchor = "rollout"` takes the PPO
ratio to that rollout policy for the whole run and clips it to [1 − ε, 1 + ε]: once the student
has moved, clipped tokens get no gradient. `anchor = "current"` takes the gradient of the current
student with a truncated importance weight to the rollout policy instead. For each seed this
runs the demo's SFT, rollouts and scoring once, then the demo's OPD step with each anchor, and
reports held-out accuracy (one sample per prompt, T = 1) and the mean clip fraction.

    python experiments/anchoring.py --out runs/anchoring [--seeds 0 1 2] [--dropout on|off]
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from common import D, arguments, demo_until_opd, fresh_out, heldout_prompts

from lightopd.stages import demo

ANCHORS = ("rollout", "current")


def run_seed(seed: int, out: Path, heldout: Path, device: str, dropout: bool) -> dict:
    work = out / f"seed{seed}"
    store = demo_until_opd(work, seed, device, dropout)["teacher-store"]
    result = {"seed": seed, "sft": demo.evaluate(work / "sft", heldout, device, seed)["accuracy"]}
    for anchor in ANCHORS:
        demo.train_student(work / "sft", store, work / f"opd-{anchor}", D.objective, D.opd_steps, D.opd_lr,
                           D.opd_batch_size, seed, device, sets=(("objective.anchor", anchor),), dropout=dropout)
        lines = [json.loads(line) for line in (work / f"opd-{anchor}" / "metrics.jsonl").read_text().splitlines()]
        result[anchor] = {"accuracy": demo.evaluate(work / f"opd-{anchor}", heldout, device, seed)["accuracy"],
                          "clip_fraction": statistics.mean(m["clip_fraction"] for m in lines),
                          "clip_fraction_last_100": statistics.mean(m["clip_fraction"] for m in lines[-100:])}
    return result


def main() -> None:
    ap = arguments(__doc__, "anchoring")
    ap.add_argument("--dropout", choices=("on", "off"), default="on" if D.student_dropout else "off",
                    help="the student's dropout in SFT and OPD (the demo's default: on)")
    args = ap.parse_args()
    fresh_out(ap, args.out)
    started = time.perf_counter()
    rows = []
    for seed in args.seeds:
        heldout = heldout_prompts(args.out, seed)
        rows.append(run_seed(seed, args.out, heldout, args.device, args.dropout == "on"))
    print("| seed | SFT | opd-seq, anchor rollout (clip fraction) | opd-seq, anchor current |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['sft']:.1%} | {r['rollout']['accuracy']:.1%} ({r['rollout']['clip_fraction']:.1%}) "
              f"| {r['current']['accuracy']:.1%} |")
    means = {a: statistics.mean(r[a]["accuracy"] for r in rows) for a in ANCHORS}
    print(f"| mean | {statistics.mean(r['sft'] for r in rows):.1%} | {means['rollout']:.1%} | {means['current']:.1%} |")
    print(json.dumps({"experiment": "anchoring", "seeds": args.seeds, "dropout": args.dropout, "rows": rows,
                      "mean_accuracy": means,
                      "seconds": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
