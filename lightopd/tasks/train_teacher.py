"""Train a teacher for a bundled task (addition, or reversal) from a fixed seed; this is how the
shipped teachers in `lightopd/tasks/teachers/` were made.

    python -m lightopd.tasks.train_teacher OUT [--task addition] [--formats worked,direct] [--tagged worked]
    python -m lightopd.tasks.train_teacher OUT --task reversal --formats plain

Each step draws `--batch-size` pairs from the train pool (never a held-out pair) and, for each, one
of `--formats` uniformly; with `--tagged FORMATS`, half of the pairs carry the tag in front of the
prompt and one of those formats instead (a teacher that follows the tag); the loss is the cross-
entropy of the solution tokens and the end token (not the prompt). AdamW with a linear warmup and
cosine decay. Prints the held-out exact match (greedy) of every format at the end, as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from lightopd.tasks import addition as A
from lightopd.tasks import reversal as R

# each task's module and its held-out items (every task shares addition's tokenizer and model shape)
TASKS = {"addition": (A, A.pairs), "reversal": (R, R.numbers)}


def batch(tokenizer, rng: random.Random, size: int, formats: list[str], tagged: list[str] | None = None,
          task: str = "addition") -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and a mask of the positions whose next token is trained on."""
    seqs, starts = [], []
    for _ in range(size):
        module = TASKS[task][0]
        item = module.draw(rng, "train")
        tag = bool(tagged) and rng.random() < 0.5
        p = tokenizer((A.TAG if tag else "") + module.prompt(*item))["input_ids"]
        s = tokenizer(module.solution(*item, rng.choice(tagged if tag else formats)),
                      add_special_tokens=False)["input_ids"]
        seqs.append(p + s + [tokenizer.eos_token_id])
        starts.append(len(p))
    width = max(map(len, seqs))
    ids = torch.full((size, width), tokenizer.pad_token_id)
    trained = torch.zeros((size, width - 1), dtype=torch.bool)
    for i, (seq, start) in enumerate(zip(seqs, starts, strict=True)):
        ids[i, : len(seq)] = torch.tensor(seq)
        trained[i, start - 1: len(seq) - 1] = True  # position t predicts token t + 1
    return ids, trained


@torch.no_grad()
def heldout_accuracy(model, tokenizer, fmt: str, count: int = 500, task: str = "addition") -> float:
    """Exact match of greedy solutions, forced to start in `fmt` (its first token is given)."""
    correct = 0
    module, heldout = TASKS[task]
    for item in heldout(count, "heldout", 0):
        target = module.solution(*item, fmt)
        ids = tokenizer(module.prompt(*item) + target[0], return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        text = target[0] + tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        correct += text == target
    return correct / count


def train(out: Path, formats: list[str], seed: int, steps: int, batch_size: int, lr: float, hidden: int,
          layers: int, heads: int, tagged: list[str] | None = None, task: str = "addition") -> dict:
    from transformers import AutoModelForCausalLM

    A.make_model(out, hidden, layers, heads, seed)
    tokenizer = A.make_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(out)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    start = time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        ids, trained = batch(tokenizer, rng, batch_size, formats, tagged, task)
        logits = model(input_ids=ids).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits[trained], ids[:, 1:][trained])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 250 == 0:
            print(json.dumps({"step": step, "loss": round(float(loss.detach()), 5)}), flush=True)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    result = {"model": str(out), "task": task, "formats": formats, "tagged": tagged, "seed": seed, "steps": steps,
              "parameters": sum(p.numel() for p in model.parameters()),
              "seconds": round(time.perf_counter() - start, 1),
              "heldout_exact_match": {f: heldout_accuracy(model, tokenizer, f, task=task) for f in formats}}
    (out / "training.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--task", default="addition", choices=sorted(TASKS))
    ap.add_argument("--formats", default="worked,direct",
                    help=f"comma-separated: addition's from {', '.join(A.FORMATS)}; reversal's {', '.join(R.FORMATS)}")
    ap.add_argument("--tagged", default=None, help="formats of the tagged half of each batch (default: no tags)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=2750)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    args = ap.parse_args()
    formats = args.formats.split(",")
    tagged = args.tagged.split(",") if args.tagged else None
    known = TASKS[args.task][0].FORMATS
    for f in formats + (tagged or []):
        if f not in known:
            ap.error(f"--formats: unknown format {f!r} of {args.task}; choose from {', '.join(known)}")
    if tagged and args.task != "addition":
        ap.error("--tagged: only the addition task has a tag")
    print(json.dumps(train(args.out, formats, args.seed, args.steps, args.batch_size, args.lr, args.hidden,
                           args.layers, args.heads, tagged, args.task)))


if __name__ == "__main__":
    main()
