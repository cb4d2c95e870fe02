"""End to end against TRL's online distillation trainer: the same student, teacher, prompts and steps.

Both runs train 32 steps of 8 prompts over 256 prompts (every prompt once; one completion each,
T = 1, up to 16 new tokens, scored by the teacher):
- lightopd: `lightopd rounds --steps-per-round M --prompts-per-round 8M` (rollout, score-teacher
  and train each round, in one process): M = 1 samples before every step (on-policy, as TRL),
  M = 8 every 8 steps;
- TRL: `DistillationTrainer` with the teacher in memory (on-policy, reverse KL, beta = 1).
Each is timed as a fresh process, from start to exit (imports, model loads and checks included),
on the tiny models of `lightopd.tiny` (a 2-layer, 64-wide student; a 3-layer, 96-wide teacher), on
the CPU. Prints one JSON line: each side's seconds and their ratio. Skips with a reason when TRL is
not installed (it is not a lightopd dependency: `pip install trl`).

    python bench/trl_rounds.py [--prompts 256] [--batch 8] [--out runs/bench-trl]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

TRL_SCRIPT = """
import sys, datasets
from trl import DistillationConfig, DistillationTrainer
from transformers import AutoModelForCausalLM, AutoTokenizer
student, teacher, prompts, out, batch = sys.argv[1:6]
records = [{"prompt": [{"role": "user", "content": line}]} for line in open(prompts).read().splitlines()]
args = DistillationConfig(output_dir=out, per_device_train_batch_size=int(batch), gradient_accumulation_steps=1,
                          num_train_epochs=1, learning_rate=1e-4, max_completion_length=16, temperature=1.0,
                          beta=1.0, disable_dropout=True, logging_steps=100, save_strategy="no", report_to="none",
                          use_cpu=True, bf16=False, seed=0)
tokenizer = AutoTokenizer.from_pretrained(student)
trainer = DistillationTrainer(model=AutoModelForCausalLM.from_pretrained(student),
                              teacher_model=AutoModelForCausalLM.from_pretrained(teacher), args=args,
                              train_dataset=datasets.Dataset.from_list(records), processing_class=tokenizer)
trainer.train()
print(trainer.state.global_step)
"""


def timed(argv: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv[:4])}... failed:\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("runs/bench-trl"))
    ap.add_argument("--steps-per-round", type=int, nargs="+", default=[1, 8], help="lightopd's M values")
    args = ap.parse_args()
    try:
        import trl
    except ImportError:
        print(json.dumps({"bench": "trl_rounds", "skipped": "TRL is not installed (pip install trl)"}))
        return
    from lightopd.provenance import model_fingerprint, write_provenance
    from lightopd.tiny import make_model

    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    words = [f"w{i}" for i in range(40)]
    student = make_model(args.out / "student", words, hidden=64, layers=2, seed=0)
    teacher = make_model(args.out / "teacher", words, hidden=96, layers=3, seed=7, logit_scale=20.0)
    write_provenance(student, {"sft_teacher": {"path": str(teacher), "fingerprint": model_fingerprint(teacher)}})
    lines = [" ".join(words[(i + j) % 40] for j in range(2 + i % 4)) for i in range(args.prompts)]
    (args.out / "prompts.txt").write_text("\n".join(lines) + "\n")
    (args.out / "prompts.jsonl").write_text("".join(json.dumps({"id": f"p{i}", "prompt": line}) + "\n"
                                                    for i, line in enumerate(lines)))
    steps = args.prompts // args.batch
    trl_s, out = timed([sys.executable, "-c", TRL_SCRIPT, str(student), str(teacher), str(args.out / "prompts.txt"),
                        str(args.out / "trl"), str(args.batch)])
    assert int(out.splitlines()[-1]) == steps, out
    result = {"bench": "trl_rounds", "prompts": args.prompts, "steps": steps, "batch": args.batch,
              "trl_version": trl.__version__, "trl_seconds": round(trl_s, 1)}
    for m in args.steps_per_round:
        seconds, out = timed([sys.executable, "-m", "lightopd", "rounds", "--student", str(student), "--teacher",
                              str(teacher), "--prompts", str(args.out / "prompts.jsonl"), "--out",
                              str(args.out / f"lightopd-{m}"), "--rounds", str(steps // m), "--steps-per-round",
                              str(m), "--prompts-per-round", str(args.batch * m), "--n", "1", "--max-new-tokens",
                              "16", "--batch-size", str(args.batch), "--objective", "rkl", "--lr", "1e-4",
                              "--teacher-top-k", "32", "--device", "cpu", "--chat", "always"])
        assert json.loads(out.splitlines()[-1])["steps"] == steps
        result[f"lightopd_every_{m}_seconds"] = round(seconds, 1)
        result[f"speedup_every_{m}"] = round(trl_s / seconds, 2)  # > 1: lightopd is faster
    print(json.dumps(result))


if __name__ == "__main__":
    main()
