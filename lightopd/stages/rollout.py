"""Stage `rollout`: sample a model on a prompt source into a sharded rollout store.

Prompts are read, mapped, rendered and tokenized before any model is loaded (specs.load_prompts),
so bad input fails in seconds and leaves no store behind. Each row keeps its prompt record's
other fields as a JSON `metadata` column. Shard i holds the samples of prompts [i·P, (i+1)·P) in
source order,
all samples of a prompt together. Every row's random stream is keyed by (seed, prompt id,
sample index), so an interrupted run resumed later, a run with another batch size, or N worker
processes (`--worker I/N` writes shards i with i % N == I into one shared store) write the same
rows; a re-run skips the shards the manifest lists as complete. Each row's `reward` is the
checker's score of its decoded completion against the record's answer, exactly as `eval` checks
it (null where the record has none); the manifest names the checker.
"""

from __future__ import annotations

import contextlib
import json
import math

import pyarrow as pa

from lightopd.config import RolloutConfig
from lightopd.data.store import ROLLOUT_FORMAT, ROLLOUT_SCHEMA
from lightopd.data.writer import shard_work
from lightopd.engine import models
from lightopd.engine.samplers import check_engine, engine_context, engine_record, open_sampler
from lightopd.errors import InputError, NonFiniteLogits
from lightopd.hub import locate
from lightopd.progress import StageProgress
from lightopd.provenance import model_fingerprint, read_provenance, tokenizer_fingerprint
from lightopd.specs import load_prompts
from lightopd.tasks.verifiers import Scorer, open_scorer


def metadata_json(metadata: dict) -> str | None:
    """A record's other fields as standard JSON text (values JSON has no type for, such as dates, as text;
    a number that is not finite was made null when the record was read: fields.py)."""
    return json.dumps(metadata, ensure_ascii=False, default=str, allow_nan=False) if metadata else None


def reward_of(scored: Scorer | None, tokenizer, completion_ids, answer: str | None, metadata: dict, question: str,
              where: str) -> float | None:
    """A completion's score against its answer (None without one), on the text eval checks: the
    completion decoded without special tokens. A checker's error is an InputError naming `where`."""
    if answer is None or scored is None:
        return None
    text = tokenizer.decode(completion_ids, skip_special_tokens=True)
    try:
        return scored(text, answer, metadata, question)[0]
    except InputError as e:
        raise InputError(f"{where}: {e}") from None


def rewards(records, completions, tokenizer, scored: Scorer | None) -> list[list[float | None]]:
    """Each sample's reward (reward_of), by record and sample."""
    return [[reward_of(scored, tokenizer, c.ids, record.answer, record.metadata, record.question,
                       f"{record.where}, sample {j}") for j, c in enumerate(samples)]
            for record, samples in zip(records, completions, strict=True)]


def _shard_table(records, encoded, completions, keys_n: int, policy: bool,
                 scores: list[list[float | None]]) -> tuple[pa.Table, int]:
    """The shard's rows; `policy_logprobs` are null unless `policy` (where they equal behavior_logprobs)."""
    columns = {name: [] for name in ROLLOUT_SCHEMA.names}
    tokens = 0
    for record, ids, samples, rewarded in zip(records, encoded, completions, scores, strict=True):
        for j in range(keys_n):
            c = samples[j]
            columns["prompt_id"].append(record.id)
            columns["sample_index"].append(j)
            columns["prompt_ids"].append(ids)
            columns["completion_ids"].append(c.ids)
            columns["behavior_logprobs"].append(c.logprobs)
            columns["policy_logprobs"].append(c.policy_logprobs if policy else None)
            columns["finish_reason"].append(c.finish_reason)
            columns["answer"].append(record.answer)
            columns["metadata"].append(metadata_json(record.metadata))
            columns["reward"].append(rewarded[j])
            columns["prompt"].append(record.question)
            tokens += len(c.ids)
    return pa.Table.from_pydict(columns, schema=ROLLOUT_SCHEMA), tokens


def run(cfg: RolloutConfig) -> dict:
    """Write (or finish) the rollout store `cfg.out`; return the JSON summary."""
    with contextlib.ExitStack() as opened:
        return _run(cfg, opened)


def _run(cfg: RolloutConfig, opened: contextlib.ExitStack) -> dict:
    spec, sampling = cfg.model, cfg.sampling
    model_dir = models.check_model_dir(spec.path)
    tokenizer = models.load_tokenizer(model_dir, spec.trust_remote_code)
    info = engine_context(models.model_info(model_dir, tokenizer, spec.trust_remote_code), cfg.engine)
    check_engine(cfg.engine)
    prompts, prompts_record = load_prompts(cfg.prompts, cfg.render, cfg.limit, tokenizer, info.eos_ids, info.context)
    records, encoded = prompts.records, prompts.ids
    answered = any(r.answer is not None for r in records)
    checker = cfg.checking.checker
    # a checker that cannot be had fails before the model is loaded
    scored = opened.enter_context(open_scorer(checker, cfg.checking.checker_timeout)) if answered else None
    device = models.resolve_device(spec.device)
    dtype = models.resolve_dtype(spec.dtype, device)

    metadata = {
        "model": {
            "path": str(model_dir.resolve()),
            **locate(spec.path).record(),
            "fingerprint": model_fingerprint(model_dir),
            "dtype": str(dtype).removeprefix("torch."),
            "sft_teacher": (read_provenance(model_dir) or {}).get("sft_teacher"),
        },
        "tokenizer": {
            "fingerprint": tokenizer_fingerprint(tokenizer),
            "vocab_size": len(tokenizer),
            "eos_token_ids": info.eos_ids,
            "pad_token_id": info.pad_id,
        },
        "sampling": sampling.record(),
        "prompts": prompts_record,
        "reward": {"checker": checker} if answered else None,
        "prompts_per_shard": cfg.prompts_per_shard,
        "engine": engine_record(cfg.engine),
    }
    per_shard = cfg.prompts_per_shard
    with shard_work(cfg.out, ROLLOUT_FORMAT, metadata, math.ceil(len(records) / per_shard), cfg.worker) as work:
        if work.todo:
            sampler = open_sampler(model_dir, spec, cfg.engine, info, cfg.generation_batch_size, cfg.kv_cache_tokens,
                                   sampling.seed)
            rows = lambda shards: sum(min(per_shard, len(records) - i * per_shard) for i in shards) * sampling.n  # noqa: E731
            with StageProgress("rollout", total=rows(work.mine),
                               completed=rows(set(work.mine) - set(work.todo))) as bar:
                for shard in work.todo:
                    lo, hi = shard * per_shard, min((shard + 1) * per_shard, len(records))
                    shard_records, shard_ids = records[lo:hi], encoded[lo:hi]
                    try:
                        completions = sampler.sample(shard_ids, [r.id for r in shard_records], sampling,
                                                     on_step=lambda toks, fin: bar.advance(items=fin, tokens=toks),
                                                     policy=sampling.policy_differs)
                    except NonFiniteLogits as e:
                        raise NonFiniteLogits(f"--model {spec.path}: {e}") from None
                    table, tokens = _shard_table(shard_records, shard_ids, completions, sampling.n,
                                                 sampling.policy_differs,
                                                 rewards(shard_records, completions, tokenizer, scored))
                    work.writer.write_shard(shard, table, tokens,
                                            prompt_tokens=sum(len(x) for x in shard_ids) * sampling.n)
                    work.new_tokens += tokens
                work.work_seconds = bar.seconds
        return work.summary("rollout")
