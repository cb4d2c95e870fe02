"""Many teachers, one student: two bundled tasks, each with its own expert, distilled offline.

The tasks share one vocabulary: addition (`123+456=`, the bundled two-format teacher) and digit
reversal (`58213=` → `31285`, the bundled reversal teacher, `train_teacher --task reversal`). Each
prompt carries its task in a metadata field (`task`). Per seed:
1. Each teacher answers the demo's count of its own task's SFT prompts; a fresh student (the demo's)
   is SFT-trained on both teachers' data at once (`train --data A --data B`: an SFT mixture, which
   records both teachers) for twice the demo's SFT steps, so each task gets the demo's exposure
   (with half of them, addition stays near 1%).
2. The SFT student samples the demo's count of OPD prompts of each task; the rollouts are scored
   - routed: the addition teacher on `--where task=addition`, the reversal teacher on
     `--where task=reversal`, each scoring only its rows; trained together with `--data A --data B`;
   - by each teacher alone, on every row (the single-teacher baselines);
3. every student trains twice the demo's OPD steps (objective opd-seq, the demo's), and the SFT
   student also continues SFT on both teachers' data for as many steps (SFT on both: the control).
Held-out accuracy on each task, one sample each at T = 1, and the tokens each teacher scored.

    python experiments/teachers.py --out runs/teachers [--seeds 0 1 2]
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from common import D, seeds

from lightopd.data.store import open_store
from lightopd.stages import demo
from lightopd.tasks import addition as A
from lightopd.tasks import reversal as R

TEACHERS = {"addition": demo.TEACHER, "reversal": A.TEACHERS / "reversal"}
OBJECTIVE = "opd-seq"


def prompts(work: Path, name: str, count: int, split: str, seed: int) -> dict[str, Path]:
    """{task: prompt file} of `count` prompts per task, each record tagged with its task."""
    return {"addition": A.write_prompts(work / f"{name}-addition.jsonl", count, split, seed,
                                        metadata={"task": "addition"}),
            "reversal": R.write_prompts(work / f"{name}-reversal.jsonl", count, split, seed,
                                        metadata={"task": "reversal"})}


def mixed(work: Path, files: dict[str, Path]) -> Path:
    path = work / "prompts-opd.jsonl"
    path.write_text("".join(f.read_text() for f in files.values()))
    return path


def run_seed(seed: int, out: Path, device: str) -> dict:
    work = out / f"seed{seed}"
    work.mkdir(parents=True)
    sft_prompts = prompts(work, "sft", D.sft_prompts, "train", seed)
    opd_prompts = mixed(work, prompts(work, "opd", D.opd_prompts, "train", seed + 10_000))
    heldout = prompts(work, "heldout", D.heldout_prompts // 2, "heldout", seed)
    A.make_model(work / "base", D.student_hidden, D.student_layers, D.student_heads, seed, D.student_arch)
    sft_data = tuple(demo.sample(TEACHERS[t], sft_prompts[t], work / f"sft-data-{t}", 1, seed, device)
                     for t in TEACHERS)
    demo.train_student(work / "base", sft_data, work / "sft", "sft", 2 * D.sft_steps, D.sft_lr, D.sft_batch_size,
                       seed, device, dropout=D.student_dropout)
    rollouts = demo.sample(work / "sft", opd_prompts, work / "rollouts", D.opd_samples, seed, device)
    routed = tuple(demo.score_once(rollouts, work / f"routed-{t}", D.top_k, device, TEACHERS[t],
                                   where=(f"task={t}",), name=t) for t in TEACHERS)
    alone = {t: demo.score_once(rollouts, work / f"alone-{t}", D.top_k, device, TEACHERS[t], name=t) for t in TEACHERS}
    runs = {"routed, both teachers": routed, **{f"{t} teacher alone": (store,) for t, store in alone.items()}}
    scored = {name: {open_store(s)["teacher"]["name"]: open_store(s)["tokens"] for s in stores}
              for name, stores in runs.items()}
    models = {"sft": work / "sft"}
    demo.train_student(work / "sft", sft_data, work / "sft-more", "sft", 2 * D.opd_steps, D.sft_lr,
                       D.sft_batch_size, seed, device, dropout=D.student_dropout)
    models["sft on both, more steps"] = work / "sft-more"
    for i, (name, stores) in enumerate(runs.items()):
        demo.train_student(work / "sft", stores, work / f"opd-{i}", OBJECTIVE, 2 * D.opd_steps, D.opd_lr,
                           D.opd_batch_size, seed, device, dropout=D.student_dropout)
        models[name] = work / f"opd-{i}"
    rows = {}
    for name, model in models.items():
        rows[name] = {t: demo.evaluate(model, heldout[t], device, seed)["accuracy"] for t in TEACHERS}
        rows[name]["scored_tokens"] = scored.get(name, {})
    return rows


def main() -> None:
    args, rows, started = seeds(__doc__, "teachers", run_seed)
    names = list(next(iter(rows.values())))
    print("| student | addition (mean) | reversal (mean) | both (mean) | per seed (addition / reversal) | "
          "tokens scored per teacher |")
    print("|---|---|---|---|---|---|")
    for name in names:
        add = [rows[s][name]["addition"] for s in rows]
        rev = [rows[s][name]["reversal"] for s in rows]
        both = statistics.mean((a + r) / 2 for a, r in zip(add, rev, strict=True))
        per_seed = ", ".join(f"{a:.1%} / {r:.1%}" for a, r in zip(add, rev, strict=True))
        tokens = rows[next(iter(rows))][name]["scored_tokens"]
        cost = ", ".join(f"{t} {n:,}" for t, n in tokens.items()) or "-"
        means = f"{statistics.mean(add):.1%} | {statistics.mean(rev):.1%} | {both:.1%}"
        print(f"| {name} | {means} | {per_seed} | {cost} |")
    print(json.dumps({"experiment": "teachers", "seeds": args.seeds, "rows": rows,
                      "seconds": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
