"""Which tokens teach: the token selections on the demo's task, with the demo's objective and budget.

For each seed this runs the demo's steps once (the SFT student, its rollouts, the teacher's
scores); then, from the same SFT student with the demo's OPD budget (opd-seq, 600 steps, batch 32,
lr 3·10⁻⁴, dropout on), each selection below; and reports held-out accuracy (one sample per
prompt, T = 1) and the mean share of completion tokens the selection kept.

    python experiments/tokens.py --out runs/tokens [--seeds 0 1 2]
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from common import D, demo_until_opd, heldout_prompts, seeds

from lightopd.stages import demo

METHODS = {  # name: the train flags of its selection
    "all tokens": {},
    "entropy, top 50%": {"token_select": "entropy", "token_keep": 0.5},
    "confident-wrong (TIP), 10%": {"token_select": "confident-wrong", "token_keep": 0.1},
    "random 50%": {"token_select": "random", "token_keep": 0.5},
    "position, first 30%": {"token_select": "position", "token_keep": 0.3},
    "curriculum (TCOD), 30% to all": {"token_select": "curriculum", "token_keep": 0.3},
}


def run_seed(seed: int, out: Path, heldout: Path, device: str) -> dict:
    work = out / f"seed{seed}"
    demo_until_opd(work, seed, device, D.student_dropout)
    result = {"sft": {"accuracy": demo.evaluate(work / "sft", heldout, device, seed)["accuracy"], "kept": None}}
    for i, (name, flags) in enumerate(METHODS.items()):
        model = work / f"t{i}"
        demo.train_student(work / "sft", work / "teacher-store", model, "opd-seq", D.opd_steps, D.opd_lr,
                           D.opd_batch_size, seed, device, dropout=D.student_dropout, **flags)
        lines = [json.loads(line) for line in (model / "metrics.jsonl").read_text().splitlines()]
        kept = statistics.mean(line.get("kept_fraction", 1.0) for line in lines)
        result[name] = {"accuracy": demo.evaluate(model, heldout, device, seed)["accuracy"], "kept": kept}
    return result


def main() -> None:
    args, by_seed, started = seeds(__doc__, "tokens", lambda seed, out, device: {
        "seed": seed, **run_seed(seed, out, heldout_prompts(out, seed), device)})
    rows = list(by_seed.values())
    names = ["sft", *METHODS]
    print("| selection | " + " | ".join(f"seed {r['seed']}" for r in rows) + " | mean | tokens kept |")
    print("|---|" + "---|" * (len(rows) + 2))
    for name in names:
        acc = [r[name]["accuracy"] for r in rows]
        kept = [r[name]["kept"] for r in rows if r[name]["kept"] is not None]
        share = f"{statistics.mean(kept):.1%}" if kept else "-"
        print(f"| {name} | " + " | ".join(f"{a:.1%}" for a in acc) + f" | {statistics.mean(acc):.1%} | {share} |")
    print(json.dumps({"experiment": "tokens", "seeds": args.seeds, "rows": rows,
                      "seconds": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
