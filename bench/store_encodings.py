"""Bytes and fidelity of each top-k encoding of a teacher store (score-teacher's --topk-dtype,
--topk-bits and --topk-order); prints JSON.

The bench world's rollouts (48 prompts × 2 samples of 128 tokens from a 32k-vocabulary student)
are scored at k = 32 by two teachers: the bench teacher, and the same teacher made confident (its
output layer scaled until the median mass outside its top-32 is about 1e-6, as bench/tail.py does).
For each encoding it reports:
- bytes per completion token: whole shards, and per column (compressed, Parquet metadata);
- fidelity on the first --rows rows: every objective that reads the top-k (rkl, fkl, jsd, skew-fkl,
  skew-rkl, taid on the tail-bucket support, and vopd, whose baseline is −rkl), computed by the
  objectives from the columns as a reader gets them and the student's float32 logits, against its
  value in float64 from both models' full logits. `mean` is the relative error of the loss averaged
  over every position (what a training step sees); `median` and `worst` are per position, relative
  to max(|value|, 1e-3). The policy-gradient objectives that read only the sampled token's teacher
  log-prob (lightning-opd, opd-seq, g-opd, ...) read a column no encoding changes.

    python bench/store_encodings.py [--rows 24]
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
from tail import NAMES, bench_world, log_softmax64, logits64, reference  # noqa: E402

from lightopd import objectives as O  # noqa: E402
from lightopd.config import ScoreConfig  # noqa: E402
from lightopd.data.reader import iter_batches  # noqa: E402
from lightopd.data.store import open_store  # noqa: E402
from lightopd.data.store_stats import column_bytes  # noqa: E402
from lightopd.objectives.stats import logprob_stats  # noqa: E402
from lightopd.stages import score  # noqa: E402

K = 32
ENCODINGS = {
    "float32, descending": {"topk_dtype": "float32", "topk_order": "logprob"},
    "float16, descending (before)": {"topk_order": "logprob", "topk_bits": 11},
    "float16, by id": {"topk_order": "id", "topk_bits": 11},
    "9 bits, by id": {"topk_order": "id", "topk_bits": 9},
    "8 bits, by id": {"topk_order": "id", "topk_bits": 8},
    "7 bits, by id (the default)": {"topk_order": "id", "topk_bits": 7},
}


def bytes_per_token(store: Path) -> dict:
    manifest = open_store(store)
    columns = column_bytes([store / shard["name"] for shard in manifest["shards"]])
    tokens = manifest["tokens"]
    return {"bytes_per_token": round(sum(s["bytes"] for s in manifest["shards"]) / tokens, 1),
            "columns": {name: round(size / tokens, 2) for name, size in columns.items() if size / tokens >= 0.05}}


def references(student: Path, teacher: Path, rows: list[dict]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each row's float64 full-vocabulary log-probs of the student and the teacher."""
    from transformers import AutoModelForCausalLM

    s64 = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float64).eval()
    t64 = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float64).eval()
    return [(log_softmax64(logits64(s64, r["prompt_ids"], r["completion_ids"])),
             log_softmax64(logits64(t64, r["prompt_ids"], r["completion_ids"]))) for r in rows]


def fidelity(rows: list[dict], refs: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    """Each top-k objective's errors against float64 (see the module doc)."""
    got_all: dict[str, list] = {n: [] for n in [*NAMES, "vopd"]}
    want_all: dict[str, list] = {n: [] for n in got_all}
    for row, (lq, lp) in zip(rows, refs, strict=True):
        n = len(row["completion_ids"])
        ids = np.array(row["topk_ids"]).reshape(n, K)
        y = np.array(row["completion_ids"])
        view = logprob_stats(torch.from_numpy(lq).float(), torch.from_numpy(y), at=torch.from_numpy(ids))
        inputs = O.Inputs(view, topk_ids=torch.from_numpy(ids),
                          topk_logprobs=torch.tensor(row["topk_logprobs"]).view(n, K),
                          teacher_log_tail=torch.tensor(row["teacher_log_tail"]),
                          teacher_logprobs=torch.tensor(row["teacher_logprobs"]))
        for name, params in NAMES.items():
            objective = O.OBJECTIVES[name](O.OBJECTIVES[name].Params(**params))
            got_all[name].append(objective.loss(inputs).detach().double().numpy())
            want_all[name].append(reference(name, lq, lp, ids))
        vopd = O.OBJECTIVES["vopd"](O.OBJECTIVES["vopd"].Params())
        got_all["vopd"].append(vopd.loss(inputs).detach().double().numpy())
        lq_y, lt_y = lq[np.arange(n), y], lp[np.arange(n), y]
        want_all["vopd"].append(-(lt_y - lq_y + reference("rkl", lq, lp, ids)) * lq_y)  # A = ℓT − lq_y − V, V = −rkl
    out = {}
    for name in got_all:
        got, want = np.concatenate(got_all[name]), np.concatenate(want_all[name])
        per = np.abs(got - want) / np.maximum(np.abs(want), 1e-3)
        out[name] = {"mean": float(abs(got.mean() - want.mean()) / max(abs(want.mean()), 1e-3)),
                     "median": float(np.median(per)), "worst": float(per.max())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--rows", type=int, default=24, help="rows checked against float64 per teacher")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        student, teachers, rollouts = bench_world(tmp, args.prompts, {"confident": 1e-6})
        result = {"benchmark": "store_encodings", "machine": machine(), "top_k": K, "teachers": {}}
        for teacher_name, teacher in teachers.items():
            refs, per_encoding = None, {}
            for label, options in ENCODINGS.items():
                store = tmp / f"{teacher_name}-{label.replace(' ', '_').replace(',', '')}"
                score.run(ScoreConfig.of(teacher=str(teacher), data=str(rollouts), out=str(store), top_k=K,
                                         device="cpu", **options))
                rows = [r for b in iter_batches(store) for r in b.to_pylist()][: args.rows]
                refs = refs if refs is not None else references(student, teacher, rows)
                per_encoding[label] = {**bytes_per_token(store), "fidelity": fidelity(rows, refs)}
            result["teachers"][teacher_name] = per_encoding
    print(json.dumps(result))


if __name__ == "__main__":
    main()
