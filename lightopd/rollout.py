"""Stage `rollout`: sample a model on a prompt file into a sharded rollout store.

Prompts are validated and tokenized before any model is loaded, so bad input fails in seconds
and leaves no store behind. Shard i holds the samples of prompts [i·P, (i+1)·P) in file order,
all samples of a prompt together. Every row's random stream is keyed by (seed, prompt id,
sample index), so an interrupted run resumed later, a run with another batch size, or N worker
processes (`--worker I/N` writes shards i with i % N == I into one shared store) write the same
rows; a re-run skips the shards the manifest lists as complete.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pyarrow as pa

from lightopd import models
from lightopd.config import RolloutConfig, parse_worker
from lightopd.generate import sample_prompts
from lightopd.progress import StageProgress, console
from lightopd.prompts import encode_all, file_fingerprint, read_prompts
from lightopd.store import ROLLOUT_FORMAT, ROLLOUT_SCHEMA, StoreWriter


def _shard_table(records, encoded, completions, keys_n: int) -> tuple[pa.Table, int]:
    columns = {name: [] for name in ROLLOUT_SCHEMA.names}
    tokens = 0
    for record, ids, samples in zip(records, encoded, completions, strict=True):
        for j in range(keys_n):
            c = samples[j]
            columns["prompt_id"].append(record.id)
            columns["sample_index"].append(j)
            columns["prompt_ids"].append(ids)
            columns["completion_ids"].append(c.ids)
            columns["behavior_logprobs"].append(c.logprobs)
            columns["finish_reason"].append(c.finish_reason)
            columns["answer"].append(record.answer)
            tokens += len(c.ids)
    return pa.Table.from_pydict(columns, schema=ROLLOUT_SCHEMA), tokens


def run(cfg: RolloutConfig) -> dict:
    """Write (or finish) the rollout store `cfg.out`; return the JSON summary."""
    model_dir = models.check_model_dir(cfg.model)
    records = read_prompts(cfg.prompts, cfg.limit)
    tokenizer = models.load_tokenizer(model_dir, cfg.trust_remote_code)
    context, eos_ids, pad_id = models.generation_setup(model_dir, tokenizer, cfg.trust_remote_code)
    encoded = encode_all(tokenizer, records, context)
    device = models.resolve_device(cfg.device)
    dtype = models.resolve_dtype(cfg.dtype, device)

    metadata = {
        "model": {
            "path": str(Path(cfg.model).resolve()),
            "fingerprint": models.model_fingerprint(model_dir),
            "dtype": str(dtype).removeprefix("torch."),
            "sft_teacher": (models.read_provenance(model_dir) or {}).get("sft_teacher"),
        },
        "tokenizer": {
            "fingerprint": models.tokenizer_fingerprint(tokenizer),
            "vocab_size": len(tokenizer),
            "eos_token_ids": eos_ids,
            "pad_token_id": pad_id,
        },
        "sampling": {
            "n": cfg.n,
            "temperature": cfg.temperature,
            "top_p": cfg.top_p,
            "max_new_tokens": cfg.max_new_tokens,
            "seed": cfg.seed,
        },
        "prompts": {
            "path": str(Path(cfg.prompts).resolve()),
            "fingerprint": file_fingerprint(cfg.prompts),
            "count": len(records),
            "limit": cfg.limit,
        },
        "prompts_per_shard": cfg.prompts_per_shard,
    }
    num_shards = math.ceil(len(records) / cfg.prompts_per_shard)
    writer = StoreWriter(cfg.out, ROLLOUT_FORMAT, metadata, num_shards)
    done = writer.completed()
    worker, workers = parse_worker(cfg.worker)
    mine = [i for i in range(num_shards) if i % workers == worker]
    todo = [i for i in mine if i not in done]
    start = time.perf_counter()
    new_tokens, sampling_seconds = 0, 0.0
    if todo:
        if len(todo) < len(mine):
            console.print(f"resuming {cfg.out}: {len(mine) - len(todo)} of this worker's {len(mine)} shards "
                          "already complete")
        model = models.load_model(model_dir, device, dtype, cfg.trust_remote_code)
        P = cfg.prompts_per_shard
        rows = lambda shards: sum(min(P, len(records) - i * P) for i in shards) * cfg.n  # noqa: E731
        with StageProgress("rollout", total=rows(mine), completed=rows(set(mine) - set(todo))) as bar:
            for shard in todo:
                lo, hi = shard * P, min((shard + 1) * P, len(records))
                shard_records, shard_ids = records[lo:hi], encoded[lo:hi]
                completions = sample_prompts(
                    model, shard_ids, [r.id for r in shard_records], cfg.n, cfg.sampling, cfg.seed,
                    cfg.batch_size, eos_ids, pad_id, context,
                    on_step=lambda toks, fin: bar.advance(items=fin, tokens=toks))
                table, tokens = _shard_table(shard_records, shard_ids, completions, cfg.n)
                writer.write_shard(shard, table, tokens, prompt_tokens=sum(len(x) for x in shard_ids) * cfg.n)
                new_tokens += tokens
            sampling_seconds = bar.seconds
    seconds = time.perf_counter() - start
    manifest = writer.manifest()
    return {
        "command": "rollout",
        "store": str(cfg.out),
        "format": manifest["format"],
        "complete": manifest["complete"],
        "shards": len(manifest["shards"]),
        "shards_written": len(todo),
        "worker": cfg.worker,
        "rows": manifest["rows"],
        "tokens": manifest["tokens"],
        "seconds": round(seconds, 3),
        "tokens_per_s": round(new_tokens / sampling_seconds, 1) if new_tokens else None,
    }
