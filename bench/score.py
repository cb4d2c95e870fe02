"""Benchmark `lightopd score-teacher` on a 32k-vocabulary teacher; prints JSON.

In one process, on the same rollout store and the same token-budget batches:
- lightopd's scoring throughput (completion tokens/s, the rate its progress bar shows);
- a bare forward of the teacher over those batches (the model's own forward with full logits and
  nothing computed from them: the physical limit);
- a naive implementation: one row at a time, full-vocabulary log_softmax, top-k and entropy.
Then bytes per completion token on disk at k = 8, 32, 128 in the default encoding (and at k = 32
with float32 log-probs and in the former descending layout), the default's bytes per column and
its fidelity (bench/store_encodings.py: each top-k objective against float64, on 24 rows), and the peak
resident memory of a `lightopd score-teacher` process (k = 32).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, make_bench_model, peak_rss_mb  # noqa: E402
from store_encodings import bytes_per_token, fidelity, references  # noqa: E402

from lightopd.config import RolloutConfig, ScoreConfig  # noqa: E402
from lightopd.data.batching import pack_by_tokens  # noqa: E402
from lightopd.data.reader import iter_batches  # noqa: E402
from lightopd.data.store import TEACHER_COLUMNS, open_store  # noqa: E402
from lightopd.data.store_stats import column_bytes  # noqa: E402
from lightopd.memory import release_freed_memory  # noqa: E402
from lightopd.stages import rollout, score  # noqa: E402


def teacher_column_bytes(store: Path) -> int:
    sizes = column_bytes([store / shard["name"] for shard in open_store(store)["shards"]])
    return sum(size for name, size in sizes.items() if name in TEACHER_COLUMNS)


def main() -> None:
    release_freed_memory()  # as the CLI does
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--naive-rows", type=int, default=32, help="rows timed for the naive implementation")
    args = ap.parse_args()
    cfg_defaults = ScoreConfig.of(teacher="", data="", out="")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        student = make_bench_model(tmp / "student", seed=0)
        teacher = make_bench_model(tmp / "teacher", seed=1, layers=6)
        rng = random.Random(0)
        prompts = tmp / "prompts.jsonl"
        prompts.write_text("".join(
            json.dumps({"prompt": " ".join(f"w{rng.randrange(31990)}" for _ in range(rng.randint(16, 128)))}) + "\n"
            for _ in range(args.prompts)
        ))
        rollouts = tmp / "rollouts"
        rollout.run(RolloutConfig.of(model=str(student), prompts=str(prompts), out=str(rollouts), n=args.n,
                                     max_new_tokens=args.max_new_tokens, prompts_per_shard=16, device="cpu"))

        scored = score.run(ScoreConfig.of(teacher=str(teacher), data=str(rollouts), out=str(tmp / "t32"),
                                          top_k=32, device="cpu"))

        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
        rows = []
        for shard in open_store(rollouts)["shards"]:
            rows += pq.read_table(rollouts / shard["name"], columns=["prompt_ids", "completion_ids"]).to_pylist()
        lengths = [len(r["prompt_ids"]) + len(r["completion_ids"]) for r in rows]
        completion_tokens = sum(len(r["completion_ids"]) for r in rows)
        start = time.perf_counter()
        with torch.inference_mode():
            for batch in pack_by_tokens(lengths, cfg_defaults.micro_batch_tokens):
                width = max(lengths[i] for i in batch)
                ids = torch.zeros((len(batch), width), dtype=torch.long)
                mask = torch.zeros_like(ids)
                for j, i in enumerate(batch):
                    seq = rows[i]["prompt_ids"] + rows[i]["completion_ids"]
                    ids[j, : len(seq)] = torch.tensor(seq)
                    mask[j, : len(seq)] = 1
                model(input_ids=ids, attention_mask=mask)
        bare_s = time.perf_counter() - start

        naive_rows = rows[: args.naive_rows]
        naive_tokens = 0
        start = time.perf_counter()
        with torch.inference_mode():
            for r in naive_rows:
                seq = torch.tensor([r["prompt_ids"] + r["completion_ids"]])
                logits = model(input_ids=seq).logits[0, len(r["prompt_ids"]) - 1: -1].float()
                lp = torch.log_softmax(logits, dim=-1)
                y = torch.tensor(r["completion_ids"])
                out = (lp.gather(-1, y[:, None]).tolist(), lp.topk(32, dim=-1), (-(lp.exp() * lp).sum(-1)).tolist())
                del out
                naive_tokens += len(r["completion_ids"])
        naive_s = time.perf_counter() - start

        storage = {}
        layouts = {"": {}, "_float32": {"topk_dtype": "float32"}, "_descending": {"topk_order": "logprob"}}
        for k, layout in ((8, ""), (32, ""), (128, ""), (32, "_float32"), (32, "_descending")):
            name = f"k{k}{layout}"
            store = tmp / ("t32" if name == "k32" else name)
            if name != "k32":
                score.run(ScoreConfig.of(teacher=str(teacher), data=str(rollouts), out=str(store), top_k=k,
                                         device="cpu", **layouts[layout]))
            m = open_store(store)
            storage[name] = {
                "bytes_per_token": round(sum(s["bytes"] for s in m["shards"]) / m["tokens"], 1),
                "teacher_columns_bytes_per_token": round(teacher_column_bytes(store) / m["tokens"], 1),
                # raw: k ids (int32) and k log-probs (float32), the sampled log-prob, tail and entropy (float32)
                "raw_float32_bytes_per_token": 8 * k + 12,
                "scoring": {key: m["scoring"][key] for key in ("topk_logprobs_dtype", "topk_order", "topk_bits")},
            }
        storage["k32"]["columns"] = bytes_per_token(tmp / "t32")["columns"]
        checked = [r for b in iter_batches(tmp / "t32") for r in b.to_pylist()][:24]  # the default, against float64
        storage["k32"]["fidelity"] = fidelity(checked, references(student, teacher, checked))

        peak_mb = peak_rss_mb([sys.executable, "-m", "lightopd", "score-teacher", "--teacher", str(teacher),
                               "--data", str(rollouts), "--out", str(tmp / "rss"), "--top-k", "32",
                               "--device", "cpu"])

    lightopd_tps = scored["tokens_per_s"]
    bare_tps = completion_tokens / bare_s
    naive_tps = naive_tokens / naive_s
    print(json.dumps({
        "benchmark": "score-teacher",
        "machine": machine(),
        "teacher": {"vocab": 32000, "hidden": 256, "layers": 6,
                    "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)},
        "workload": {"rows": len(rows), "completion_tokens": completion_tokens,
                     "padded_tokens_per_batch": cfg_defaults.micro_batch_tokens, "top_k": 32},
        "lightopd_tokens_per_s": lightopd_tps,
        "bare_forward_tokens_per_s": round(bare_tps, 1),
        "naive_per_row_tokens_per_s": round(naive_tps, 1),
        "ratio_vs_bare_forward": round(lightopd_tps / bare_tps, 2),
        "speedup_vs_naive": round(lightopd_tps / naive_tps, 2),
        "storage": storage,
        "peak_rss_mb_score_teacher_process": round(peak_mb, 1),
    }))


if __name__ == "__main__":
    main()
