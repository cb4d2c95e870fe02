"""Benchmark one `lightopd train` step on a GPU at Qwen3-1.7B's shape; prints JSON.

A Qwen3-1.7B-shaped student with random weights (built from a config: nothing is downloaded),
float32 weights and AdamW state, bfloat16 autocast, activation checkpointing on, one sequence of
256 prompt tokens and 4k or 16k completion tokens. lightopd's step (rkl on a top-32 teacher
store, the loss chunked over the 151,936-entry vocabulary) is timed against a plain HF SFT step on
the same sequence (`labels=`, the model's full logits, the same AdamW). Reported: completion
tokens/s, MFU (model FLOPs per second over the GPU's bf16 dense peak, with 6 x parameters x tokens
plus causal attention, the same FLOPs for both) and peak GPU memory.

Without CUDA it exits saying so; `--dry-run` runs the same code on the CPU at a tiny shape.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

PROMPT, K = 256, 32
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}


def qwen3_config(dry_run: bool):
    from transformers import Qwen3Config

    if dry_run:
        return Qwen3Config(vocab_size=2048, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                           tie_word_embeddings=True)
    return Qwen3Config(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                       tie_word_embeddings=True, rope_theta=1_000_000)


def model_flops(config, tokens: int) -> float:
    """Training FLOPs of one sequence: 6 x non-embedding parameters (plus the output layer) x tokens,
    plus causal attention (QK^T and AV, forward and backward: 6 x layers x heads x head_dim x T^2)."""
    d, layers, heads, head_dim = (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
                                  config.head_dim)
    kv = config.num_key_value_heads
    per_layer = d * heads * head_dim * 2 + d * kv * head_dim * 2 + 3 * d * config.intermediate_size
    params = layers * per_layer + config.vocab_size * d
    return 6 * params * tokens + 6 * layers * heads * head_dim * tokens * tokens


def synthetic_group(vocab: int, completion: int):
    import pyarrow as pa

    from lightopd.data.store import teacher_schema

    g = torch.Generator().manual_seed(completion)
    ids = lambda n: torch.randint(10, vocab, (n,), generator=g).tolist()  # noqa: E731
    lp = lambda n: (-torch.rand(n, generator=g) * 5).tolist()  # noqa: E731
    row = {"prompt_id": "p0", "sample_index": 0, "prompt_ids": ids(PROMPT), "completion_ids": ids(completion),
           "behavior_logprobs": lp(completion), "finish_reason": "length", "teacher_logprobs": lp(completion),
           "topk_ids": ids(completion * K), "topk_logprobs": pa.array(sorted(lp(completion * K)), pa.float16()),
           "teacher_log_tail": lp(completion), "teacher_entropy": lp(completion)}
    schema = teacher_schema()
    return pa.RecordBatch.from_pylist([{name: row.get(name) for name in schema.names}], schema=schema)


def timed(fn, device, repeats: int) -> tuple[float, float | None]:
    """(seconds per call after one warm-up call, peak memory in GB over the timed calls)."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None
    return (time.perf_counter() - start) / repeats, peak


def lightopd_step(config, device, completion: int):
    from transformers import AutoModelForCausalLM

    from lightopd.data.store import teacher_schema
    from lightopd.layering import train_settings
    from lightopd.objectives import lookup
    from lightopd.training.trainer import TrainData, Trainer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device)
    cfg, params = train_settings({"student": "random", "data": "unused", "out": "unused", "objective": "rkl",
                                  "lr": 1e-5, "gradient_checkpointing": True, "device": str(device),
                                  "micro_batch_tokens": PROMPT + completion})
    objective = lookup("rkl")(params.__class__(**{**params.__dict__, "temperature": 1.0}), 100)
    columns = tuple(n for n in teacher_schema().names if n != "reference_logprobs")
    trainer = Trainer(cfg, objective, model, TrainData(columns, K, config.vocab_size), 100)
    group = [synthetic_group(config.vocab_size, completion)]
    return lambda: trainer.step(group)


def sft_step(config, device, completion: int):
    from transformers import AutoModelForCausalLM

    from lightopd.training.trainer import checkpointing

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device)
    checkpointing(model)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(10, config.vocab_size, (1, PROMPT + completion), device=device)
    labels = ids.clone()
    labels[:, :PROMPT] = -100
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(input_ids=ids, labels=labels, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure(make, config, device, completion: int, repeats: int, peak_flops: float | None) -> dict:
    try:
        seconds, memory = timed(make(config, device, completion), device, repeats)
    except torch.OutOfMemoryError:
        return {"result": "out of memory"}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    flops = model_flops(config, PROMPT + completion) / seconds
    return {"seconds_per_step": round(seconds, 3), "completion_tokens_per_s": round(completion / seconds, 1),
            "tflops": round(flops / 1e12, 1), "mfu": round(flops / peak_flops, 3) if peak_flops else None,
            "peak_memory_gb": None if memory is None else round(memory, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dry-run", action="store_true", help="a tiny shape on the CPU, to check the script runs")
    ap.add_argument("--lengths", default="4096,16384", help="completion tokens, comma-separated")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    if not torch.cuda.is_available() and not args.dry_run:
        print(json.dumps({"benchmark": "gpu", "machine": machine(), "result": "skipped: no CUDA device"}))
        return
    device = torch.device("cpu" if args.dry_run else "cuda")
    config = qwen3_config(args.dry_run)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    lengths = [int(x) for x in args.lengths.split(",")] if not args.dry_run else [64, 256]
    results = {str(n): {"lightopd": measure(lightopd_step, config, device, n, args.repeats, peak),
                        "plain_sft": measure(sft_step, config, device, n, args.repeats, peak)} for n in lengths}
    for r in results.values():
        a, b = r["lightopd"], r["plain_sft"]
        if "seconds_per_step" in a and "seconds_per_step" in b:
            r["lightopd_time_over_sft"] = round(a["seconds_per_step"] / b["seconds_per_step"], 2)
    print(json.dumps({"benchmark": "gpu", "machine": machine(), "device": name, "peak_bf16_flops": peak,
                      "student": "Qwen3-1.7B shape, random weights" if not args.dry_run else "tiny Qwen3 (dry run)",
                      "prompt_tokens": PROMPT, "top_k": K, "results": results}))


if __name__ == "__main__":
    main()
