"""Benchmark `lightopd rollout` against naive one-sample-at-a-time generation; prints JSON.

Both sides draw the same number of samples of the same prompts from the same 32k-vocabulary
model with the same settings, in one process, so the ratio is meaningful on a noisy machine.
The naive side is what a first script would do: `model.generate` for one sample at a time.
`--engine vllm` times the vLLM engine instead of the transformers loop, and `--engine both`
times both and reports vllm_over_hf (the figure that matters on a GPU; needs vLLM installed).
The first engine also samples at Qwen3's card settings (T 0.6, top-p 0.95, top-k 20, whose
truncation also stores each token's untruncated log-prob): card_over_plain is its tokens/s over
the plain sampler's (T 1, the whole vocabulary).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, make_bench_model  # noqa: E402

from lightopd.config import RolloutConfig  # noqa: E402
from lightopd.data.reader import iter_batches  # noqa: E402
from lightopd.memory import release_freed_memory  # noqa: E402
from lightopd.stages import rollout  # noqa: E402


def main() -> None:
    release_freed_memory()  # as the CLI does
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--engine", choices=["hf", "vllm", "both"], default="hf")
    args = ap.parse_args()
    engines = ["hf", "vllm"] if args.engine == "both" else [args.engine]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = make_bench_model(tmp / "model")
        rng = random.Random(0)
        prompts = tmp / "prompts.jsonl"
        prompts.write_text("".join(
            json.dumps({"prompt": " ".join(f"w{rng.randrange(31990)}" for _ in range(rng.randint(8, 96)))}) + "\n"
            for _ in range(args.prompts)
        ))

        timed = {}
        card = dict(temperature=0.6, top_p=0.95, top_k=20)
        for engine, settings in [*((e, {}) for e in engines), (f"{engines[0]}-card", card)]:
            cfg = RolloutConfig.of(model=str(model_dir), prompts=str(prompts), out=str(tmp / engine), n=args.n,
                                   max_new_tokens=args.max_new_tokens, generation_batch_size=args.batch_size,
                                   device="cpu", engine=engine.removesuffix("-card"), **settings)
            start = time.perf_counter()
            result = rollout.run(cfg)  # its "seconds": sampling, without loading the model
            timed[engine] = (result["tokens"], result["seconds"], time.perf_counter() - start)
        card_tokens, card_seconds, _ = timed.pop(f"{engines[0]}-card")
        rows = [r for b in iter_batches(tmp / engines[0], columns=["prompt_ids"]) for r in b.to_pylist()]

        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        naive_tokens = 0
        start = time.perf_counter()
        with torch.inference_mode():
            for row in rows:  # the same prompts, one sample at a time
                out = model.generate(torch.tensor([row["prompt_ids"]]), do_sample=True, temperature=1.0, top_p=1.0,
                                     top_k=0, max_new_tokens=args.max_new_tokens, output_scores=True,
                                     return_dict_in_generate=True, pad_token_id=0)
                naive_tokens += out.sequences.shape[1] - len(row["prompt_ids"])
        naive_s = time.perf_counter() - start

    naive_tps = naive_tokens / naive_s
    report = {
        "benchmark": "rollout",
        "machine": machine(),
        "model": {"vocab": 32000, "hidden": 256, "layers": 4, "params_m": round(sum(
            p.numel() for p in model.parameters()) / 1e6, 2)},
        "workload": {"prompts": args.prompts, "n": args.n, "max_new_tokens": args.max_new_tokens,
                     "batch_size": args.batch_size},
        "naive_generate_one_at_a_time": {"tokens": naive_tokens, "seconds": round(naive_s, 2),
                                         "tokens_per_s": round(naive_tps, 1)},
    }
    for engine, (tokens, seconds, wall) in timed.items():
        report["lightopd" if engine == "hf" else "lightopd_vllm"] = {
            "tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
            "seconds_with_model_load": round(wall, 2), "speedup_over_naive": round(tokens / seconds / naive_tps, 2)}
    plain_tokens, plain_seconds, _ = timed[engines[0]]
    report["card"] = {"settings": card, "tokens": card_tokens, "seconds": round(card_seconds, 2),
                      "tokens_per_s": round(card_tokens / card_seconds, 1),
                      "card_over_plain": round((card_tokens / card_seconds) / (plain_tokens / plain_seconds), 2)}
    if len(timed) == 2:
        (ht, hs, _), (vt, vs, _) = timed["hf"], timed["vllm"]
        report["vllm_over_hf"] = round((vt / vs) / (ht / hs), 2)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
