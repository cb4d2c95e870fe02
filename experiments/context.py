"""Self-distillation and context distillation on the demo's task: a tag the student will not see.

A tag in front of a prompt (`+123+456=`) asks for the worked format (the sum's digits from the least
significant one, then the sum), which a small student gets right more often than the direct format.
The bundled tagged teacher (`tasks/teachers/tagged`, trained with half of its data tagged:
`train_teacher --tagged worked`) writes the SFT data, half of it tagged, so the SFT student learns
both: untagged, it mixes the formats as the teacher does; tagged, it works the sum out. Then the
SFT student samples untagged prompts, and the SFT student itself scores them with the tag in front
(`score-teacher --teacher SFT --teacher-prompt '+{prompt}'`): offline self-distillation of a
context, which the student then trains on without ever seeing the tag. Held-out accuracy, untagged
unless named, one sample each at T = 1. `lightopd demo --context --seed S --objective NAME` runs
one seed of it.

    python experiments/context.py --out runs/context [--seeds 0 1 2]
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from common import D, seeds

from lightopd.stages import demo
from lightopd.tasks import addition as A

OBJECTIVES = ("jsd", "lightning-opd", "opd-seq")  # OPSD's default divergence, its sampled-token form, the demo's


def run_seed(seed: int, out: Path, device: str) -> dict:
    work = out / f"seed{seed}"
    work.mkdir(parents=True)
    sft_prompts = A.write_prompts(work / "prompts-sft.jsonl", D.sft_prompts, "train", seed, tagged=0.5)
    opd_prompts = A.write_prompts(work / "prompts-opd.jsonl", D.opd_prompts, "train", seed + 10_000)
    heldout = A.write_prompts(work / "heldout.jsonl", D.heldout_prompts, "heldout", seed)
    heldout_tagged = A.write_prompts(work / "heldout-tagged.jsonl", D.heldout_prompts, "heldout", seed, tagged=1.0)
    A.make_model(work / "base", D.student_hidden, D.student_layers, D.student_heads, seed, D.student_arch)
    data = demo.sample(demo.TAGGED_TEACHER, sft_prompts, work / "sft-data", 1, seed, device)
    demo.train_student(work / "base", data, work / "sft", "sft", D.sft_steps, D.sft_lr, D.sft_batch_size, seed,
                       device, dropout=D.student_dropout)
    rollouts = demo.sample(work / "sft", opd_prompts, work / "rollouts", D.opd_samples, seed, device)
    demo.score_once(rollouts, work / "self-store", D.top_k, device, work / "sft", A.TAG + "{prompt}")
    evaluate = lambda model, prompts: demo.evaluate(model, prompts, device, seed)  # noqa: E731
    results = {"sft": evaluate(work / "sft", heldout),
               "sft, tagged (the ceiling)": evaluate(work / "sft", heldout_tagged)}
    for objective in OBJECTIVES:
        demo.train_student(work / "sft", work / "self-store", work / objective, objective, D.opd_steps, D.opd_lr,
                           D.opd_batch_size, seed, device, dropout=D.student_dropout)
        results[f"self-distilled, {objective}"] = evaluate(work / objective, heldout)
    return {name: {"accuracy": r["accuracy"], "worked_share": r["format_share"].get("worked", 0.0)}
            for name, r in results.items()}


def main() -> None:
    args, rows, started = seeds(__doc__, "context", run_seed)
    names = list(next(iter(rows.values())))
    print("| model | " + " | ".join(f"seed {s}" for s in rows) + " | mean | worked format (mean) |")
    print("|---|" + "---|" * (len(rows) + 2))
    for name in names:
        acc = [rows[s][name]["accuracy"] for s in rows]
        worked = statistics.mean(rows[s][name]["worked_share"] for s in rows)
        print(f"| {name} | " + " | ".join(f"{a:.1%}" for a in acc) + f" | {statistics.mean(acc):.1%} | {worked:.1%} |")
    print(json.dumps({"experiment": "context", "seeds": args.seeds, "rows": rows,
                      "seconds": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
