"""The sampled support against the top-k at comparable bytes (score-teacher --support-samples M
against --top-k K); prints JSON.

The bench world's rollouts (--prompts prompts × 2 samples of 128 tokens from a 32k-vocabulary
student) are scored by three teachers: the bench teacher, the same teacher made confident (its
output layer scaled until the median mass outside its top-32 is about 1e-6, as bench/tail.py
does) and made flat (scaled until that mass is about 0.3), each into stores that hold a top-k of
K and M draws per position at once, in the default encoding (float16 log-probs at 7 bits). For
each (K, M) pair it reports:
- bytes per completion token of the top-k's columns (ids, log-probs, the tail mass) and of the
  sampled support's (ids, log-probs), from the Parquet metadata, and the distinct tokens drawn;
- for fkl on each support (the top-k with its tail bucket; the draws), over the first --rows rows
  taken as one batch, against float64 full-vocabulary values from both models' logits:
  `loss_error`, the relative error of the batch's mean loss; `angle`, the angle in degrees between
  the batch's gradient with respect to the student's logits and the full divergence's; and
  `norm_ratio`, their norms' ratio (1 and 0° are exact). The top-k's error is all bias and stays
  whatever the batch; the draws' is all variance (tests/test_sampled_support.py checks they are
  unbiased), so it shrinks as batches and steps average it;
- `rkl_importance_sampled`: the same figures for the reverse KL estimated from the same draws by
  importance sampling, (1/M) Σ_j (q/p)(y_j)·(lq − ℓT)(y_j), written out here (lightopd does not
  offer it: see docs/objectives.md), beside rkl on the top-k with its tail bucket.

    python bench/sampled_support.py [--prompts 32] [--rows 16]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402
from tail import bench_world, log_softmax64, logits64  # noqa: E402

from lightopd import objectives as O  # noqa: E402
from lightopd.config import ScoreConfig  # noqa: E402
from lightopd.data.reader import iter_batches  # noqa: E402
from lightopd.data.store import open_store  # noqa: E402
from lightopd.data.store_stats import column_bytes  # noqa: E402
from lightopd.objectives.stats import logprob_stats  # noqa: E402
from lightopd.stages import score  # noqa: E402

PAIRS = [(4, 8), (8, 16), (16, 32), (32, 64)]  # (K, M)
TOPK_COLUMNS = ("topk_ids", "topk_logprobs", "teacher_log_tail")
SUPPORT_COLUMNS = ("support_ids", "support_logprobs")


def bytes_per_token(store: Path) -> dict:
    manifest = open_store(store)
    columns = column_bytes([store / shard["name"] for shard in manifest["shards"]])
    return {"top_k": round(sum(columns[c] for c in TOPK_COLUMNS) / manifest["tokens"], 1),
            "sampled": round(sum(columns[c] for c in SUPPORT_COLUMNS) / manifest["tokens"], 1)}


def importance_sampled_rkl(view, support_logprobs):
    """[n] (1/M) Σ_j w_j (lq − ℓT)(y_j), w = q/p: unbiased for KL(q ‖ p), by hand."""
    log_ratio = view.at_support - support_logprobs.double()
    return (log_ratio.exp() * log_ratio).mean(-1)


def exact(name: str, lq: np.ndarray, lp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[n] the full divergence in float64 and [n, V] its gradient with respect to the student's logits."""
    q, p = np.exp(lq), np.exp(lp)
    if name == "fkl":
        return (p * (lp - lq)).sum(-1), q - p
    value = (q * (lq - lp)).sum(-1)
    return value, q * ((lq - lp) - value[:, None])


def fidelity(rows: list[dict], refs: list[tuple[np.ndarray, np.ndarray]], k: int, m: int) -> dict:
    sums = {(name, support): np.zeros(5) for name in ("fkl", "rkl") for support in ("tail", "sampled")}
    positions = 0
    for row, (lq, lp) in zip(rows, refs, strict=True):
        n = len(row["completion_ids"])
        positions += n
        ids = torch.tensor(row["topk_ids"]).view(n, k)
        drawn = torch.tensor(row["support_ids"]).view(n, m)
        for (name, support), acc in sums.items():
            logits = torch.from_numpy(lq).requires_grad_()
            view = logprob_stats(logits, torch.tensor(row["completion_ids"]), at=ids, support=drawn)
            inputs = O.Inputs(view, topk_ids=ids, topk_logprobs=torch.tensor(row["topk_logprobs"]).view(n, k),
                              teacher_log_tail=torch.tensor(row["teacher_log_tail"]), support_ids=drawn,
                              support_logprobs=torch.tensor(row["support_logprobs"]).view(n, m))
            if name == "rkl" and support == "sampled":
                loss = importance_sampled_rkl(view, inputs.support_logprobs)
            else:
                loss = O.OBJECTIVES[name](O.OBJECTIVES[name].Params(support=support)).loss(inputs)
            loss.sum().backward()
            got = logits.grad.numpy()
            value, grad = exact(name, lq, lp)
            acc += [loss.detach().sum().item(), value.sum(), (got * grad).sum(), (got * got).sum(), (grad * grad).sum()]
    out = {"positions": positions}
    for (name, support), (got, want, dot, gg, ww) in sums.items():
        label = "rkl_importance_sampled" if (name, support) == ("rkl", "sampled") else f"{name}_{support}"
        out[label] = {
            "loss_error": round(abs(got - want) / abs(want), 4),
            "angle": round(float(np.degrees(np.arccos(np.clip(dot / np.sqrt(gg * ww), -1, 1)))), 1),
            "norm_ratio": round(float(np.sqrt(gg / ww)), 3)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--rows", type=int, default=16, help="rows checked against float64 per store")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        student, teachers, rollouts = bench_world(tmp, args.prompts, {"confident": 1e-6, "flat": 0.3})
        from transformers import AutoModelForCausalLM

        s64 = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float64).eval()
        result = {"benchmark": "sampled_support", "machine": machine(), "teachers": {}}
        for teacher_name, teacher in teachers.items():
            t64 = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float64).eval()
            refs, per_pair = None, []
            for k, m in PAIRS:
                store = tmp / f"{teacher_name}-{k}-{m}"
                score.run(ScoreConfig.of(teacher=str(teacher), data=str(rollouts), out=str(store), top_k=k,
                                         support_samples=m, device="cpu"))
                rows = [r for b in iter_batches(store) for r in b.to_pylist()][: args.rows]
                refs = refs if refs is not None else [
                    (log_softmax64(logits64(s64, r["prompt_ids"], r["completion_ids"])),
                     log_softmax64(logits64(t64, r["prompt_ids"], r["completion_ids"]))) for r in rows]
                distinct = np.mean([len(set(row["support_ids"][i: i + m]))
                                    for row in rows for i in range(0, len(row["support_ids"]), m)])
                per_pair.append({"k": k, "m": m, "distinct_drawn": round(float(distinct), 1),
                                 "bytes_per_token": bytes_per_token(store), **fidelity(rows, refs, k, m)})
            result["teachers"][teacher_name] = per_pair
    print(json.dumps(result))


if __name__ == "__main__":
    main()
