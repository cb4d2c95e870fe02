"""How often to refresh an offline store: `lightopd rounds` from one round to a round per step.

Per seed, the demo's SFT student (the demo's steps 1–4), then, for reverse and forward KL on the
teacher's top-k (`rkl`, `fkl`: AsyncOPD's comparison) and the demo's `opd-seq`, the same budget
of 200 optimizer steps (batch 32: 8 prompts × 4 samples, lr 3·10⁻⁴, dropout on) spent five ways:
- offline: one round over all 2,000 OPD prompts (Lightning OPD);
- every 50 / every 10 steps: rounds of 50 or 10 steps, each sampling the next 400 or 80 prompts;
- drift: rounds of up to 50 steps that end early when the step's rollout_kl exceeds 0.1, or when
  its mean over the round's last 5 steps does (--refresh-window 5);
- every step: 200 rounds of one step, each sampling 8 fresh prompts (on-policy).
Held-out accuracy of the final student (2,000 pairs, one sample each at T = 1), and the tokens
sampled, scored and trained. Writes OUT/rounds.json and OUT/rounds.png (needs matplotlib).

    python experiments/rounds.py --out runs/rounds [--seeds 0 1 2]
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from common import D, demo_until_opd, heldout_prompts, seeds

from lightopd.rounds_config import RoundsConfig
from lightopd.stages import demo, rounds

BUDGET, BATCH_PROMPTS = 200, 8  # steps, and prompts per step (8 × 4 samples = 32 rows)
REGIMES = {  # name: (steps per round, prompts per round (None: all), refresh rule, its window)
    "offline": (BUDGET, None, None, 1),
    "every 50 steps": (50, 50 * BATCH_PROMPTS, None, 1),
    "every 10 steps": (10, 10 * BATCH_PROMPTS, None, 1),
    "drift (rollout_kl > 0.1)": (50, 50 * BATCH_PROMPTS, "rollout_kl>0.1", 1),
    "drift, 5-step mean (rollout_kl > 0.1)": (50, 50 * BATCH_PROMPTS, "rollout_kl>0.1", 5),
    "every step": (1, BATCH_PROMPTS, None, 1),
}
OBJECTIVES = ("rkl", "fkl", "opd-seq")  # AsyncOPD's pair, and the demo's objective


def run_seed(seed: int, out: Path, device: str) -> dict:
    work = out / f"seed{seed}"
    paths = demo_until_opd(work / "demo", seed, device, D.student_dropout)
    heldout = heldout_prompts(work, seed)
    rows = {"sft": {"accuracy": demo.evaluate(paths["sft"], heldout, device, seed)["accuracy"]}}
    for objective in OBJECTIVES:
        for name, (steps, per_round, rule, window) in REGIMES.items():
            cfg = RoundsConfig.of(student=str(paths["sft"]), teacher=str(demo.TEACHER),
                                  prompts=str(work / "demo" / "prompts-opd.jsonl"),
                                  out=str(work / f"{objective}-{steps}-{rule is not None}-{window}"),
                                  rounds=BUDGET // steps, steps_per_round=steps, prompts_per_round=per_round,
                                  refresh_when=rule, refresh_window=window, n=D.opd_samples,
                                  max_new_tokens=demo.MAX_NEW_TOKENS,
                                  teacher_top_k=D.top_k, objective=objective, lr=D.opd_lr,
                                  batch_size=D.opd_batch_size, seed=seed, device=device, save_every=BUDGET)
            started = time.perf_counter()
            result = rounds.run(cfg, [("dropout", D.student_dropout)])
            rows[f"{objective}, {name}"] = {
                "accuracy": demo.evaluate(Path(result["model"]), heldout, device, seed)["accuracy"],
                **{k: result[k] for k in ("rounds", "steps", "sampled_tokens", "scored_tokens", "trained_tokens")},
                "seconds": round(time.perf_counter() - started, 1)}
    return rows


def chart(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(OBJECTIVES), figsize=(15, 4.2), sharey=True)
    sft = statistics.mean(rows[s]["sft"]["accuracy"] for s in rows)
    for ax, objective in zip(axes, OBJECTIVES, strict=True):
        for name in REGIMES:
            key = f"{objective}, {name}"
            compute = [sum(rows[s][key][k] for k in ("sampled_tokens", "scored_tokens", "trained_tokens")) / 1e6
                       for s in rows]
            accuracy = [100 * rows[s][key]["accuracy"] for s in rows]
            ax.errorbar(statistics.mean(compute), statistics.mean(accuracy), yerr=[
                [statistics.mean(accuracy) - min(accuracy)], [max(accuracy) - statistics.mean(accuracy)]],
                fmt="o", capsize=3, label=name)
        ax.axhline(100 * sft, color="grey", linestyle=":", label="SFT (the start)")
        ax.set_title(f"{objective}: {BUDGET} steps, refreshed how often")
        ax.set_xlabel("tokens sampled + scored + trained (millions)")
    axes[0].set_ylabel("held-out accuracy (%), mean and min–max of 3 seeds")
    axes[-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    args, rows, started = seeds(__doc__, "rounds", run_seed)
    names = list(next(iter(rows.values())))
    print("| run | " + " | ".join(f"seed {s}" for s in rows) + " | mean | rounds | tokens sampled | tokens trained |")
    print("|---|" + "---|" * (len(rows) + 4))
    for name in names:
        acc = [rows[s][name]["accuracy"] for s in rows]
        first = rows[next(iter(rows))][name]
        extra = (f" | {statistics.mean(rows[s][name]['rounds'] for s in rows):g} | {first['sampled_tokens']:,} | "
                 f"{first['trained_tokens']:,}") if "rounds" in first else " | - | - | -"
        print(f"| {name} | " + " | ".join(f"{a:.1%}" for a in acc) + f" | {statistics.mean(acc):.1%}{extra} |")
    result = {"experiment": "rounds", "seeds": args.seeds, "rows": rows,
              "seconds": round(time.perf_counter() - started, 1)}
    (args.out / "rounds.json").write_text(json.dumps(result, indent=1) + "\n")
    chart(rows, args.out / "rounds.png")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
