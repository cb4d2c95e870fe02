"""Stage `score-teacher`: run the teacher once over a rollout store, into a teacher store.

Teacher shard i is computed from rollout shard i and carries every rollout column plus, per
completion token, the teacher's log-prob of the sampled token, its top-k ids and log-probs, the log
of its probability mass outside the top-k (from the full distribution, float32) and its entropy.
With `--teacher-prompt` the teacher sees its own prompt, built from each row's record
(data/context.py), before the student's completion; each row keeps it in `teacher_prompt_ids`. A
teacher that is the rollout model itself with no context of its own would score every token as the
student does (a zero signal): a warning here, a refusal in train. Workers started with `--worker
I/N` take the shards with i % N == I and add them to the same store; whichever finishes last
completes the manifest. A re-run skips shards the manifest already lists. Everything that can be
wrong with the input (a damaged rollout store, a teacher with another vocabulary, a k larger than
the vocabulary, rows longer than the teacher's context) is reported before the teacher is loaded.
"""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from lightopd.config import ScoreConfig
from lightopd.data.batching import pack_by_tokens
from lightopd.data.context import Plan, TeacherContext
from lightopd.data.reader import iter_batches, read_shard, verify
from lightopd.data.routes import Where, describe, matched, parse_where, routed_rows
from lightopd.data.store import (
    ROLLOUT_FORMAT,
    TEACHER_FORMAT,
    manifest_fingerprint,
    open_store,
    shard_index,
    teacher_schema,
    unavailable,
)
from lightopd.data.topk_layout import ENTROPY_BITS, FLOAT32_BITS
from lightopd.data.writer import ShardWork, shard_work
from lightopd.engine import models
from lightopd.engine.samplers import check_engine, engine_context, engine_record
from lightopd.engine.scoring import Scorer
from lightopd.engine.vllm_scoring import UNAVAILABLE, VllmScorer
from lightopd.errors import InputError, NonFiniteLogits
from lightopd.hub import locate
from lightopd.objectives.stats import LogprobStats
from lightopd.progress import StageProgress, warn
from lightopd.provenance import SELF_TEACHER, default_name, eos_mismatch, model_fingerprint, tokenizer_fingerprint
from lightopd.stages.teacher_table import parquet_options, teacher_table


def _check_rollouts(cfg: ScoreConfig) -> dict:
    manifest = open_store(cfg.data, formats=(ROLLOUT_FORMAT,))
    problems = verify(cfg.data)
    if problems:
        raise InputError(f"--data {cfg.data}: damaged store ({'; '.join(problems[:3])}); "
                         "`lightopd inspect --verify` lists every problem")
    return manifest


def _longest_row(directory: str, manifest: dict) -> tuple[int, str]:
    longest, which = 0, ""
    for batch in iter_batches(directory, columns=["prompt_id", "prompt_ids", "completion_ids"], manifest=manifest):
        total = pc.add(pc.list_value_length(batch["prompt_ids"]), pc.list_value_length(batch["completion_ids"]))
        i = int(pc.index(total, pc.max(total)).as_py())
        if total[i].as_py() > longest:
            longest, which = total[i].as_py(), batch["prompt_id"][i].as_py()
    return longest, which


def run(cfg: ScoreConfig, loaded: dict | None = None) -> dict:
    """Score this worker's share of the rollout store into `cfg.out`; return the JSON summary.
    `loaded`: models kept between calls (lightopd rounds scores with the same teacher every round),
    by fingerprint, device and dtype."""
    spec = cfg.teacher
    teacher_dir = models.check_model_dir(spec.path, "--teacher")
    rollout_manifest = _check_rollouts(cfg)
    tokenizer = models.load_tokenizer(teacher_dir, spec.trust_remote_code, "--teacher")
    teacher_tok = tokenizer_fingerprint(tokenizer)
    rollout_tok = rollout_manifest["tokenizer"]["fingerprint"]
    if teacher_tok != rollout_tok:
        raise InputError(
            f"--teacher {spec.path}: its tokenizer ({teacher_tok}) differs from the one the rollouts were "
            f"sampled with ({rollout_tok}, model {rollout_manifest['model']['path']}); the teacher must score "
            "the same token ids, so it needs the same vocabulary"
        )
    info = engine_context(models.model_info(teacher_dir, tokenizer, spec.trust_remote_code, "--teacher"), cfg.engine)
    check_engine(cfg.engine)
    vllm = cfg.engine.engine == "vllm"
    if vllm and cfg.temperature != 1.0:
        raise InputError(f"--temperature {cfg.temperature}: --engine vllm scores at temperature 1 only (vLLM's "
                         "prompt log-probs are the raw distribution); score with --engine hf")
    if vllm and cfg.encoding.support_samples:
        raise InputError(f"--support-samples {cfg.encoding.support_samples}: draws from the teacher's whole "
                         "distribution, which --engine vllm does not hand out; score with --engine hf")
    mismatch = eos_mismatch(rollout_manifest["tokenizer"]["eos_token_ids"], info.eos_ids, spec.path, "the teacher")
    if mismatch:
        warn(mismatch)
    if cfg.top_k > info.vocab:
        raise InputError(f"--top-k {cfg.top_k}: larger than the teacher's vocabulary ({info.vocab})")
    fingerprint = model_fingerprint(teacher_dir)
    reference = _reference(cfg, rollout_manifest, vllm)
    where = parse_where(cfg.where)
    routed = routed_rows(cfg.data, rollout_manifest, where)
    context, plan = _context(cfg, rollout_manifest, tokenizer, info, fingerprint, where)
    if context is None:
        longest, which = _longest_row(cfg.data, rollout_manifest)
        if info.context is not None and longest > info.context:
            raise InputError(f"--data {cfg.data}: prompt {which!r} with its completion is {longest} tokens, "
                             f"longer than the teacher's context of {info.context}"
                             + (" (--max-model-len)" if cfg.engine.max_model_len == info.context else ""))
    device = models.resolve_device(spec.device)
    dtype = models.resolve_dtype(spec.dtype, device)

    encoding = cfg.encoding
    metadata = {
        "teacher": {"path": str(teacher_dir.resolve()), **locate(spec.path).record(),
                    "fingerprint": fingerprint, "dtype": str(dtype).removeprefix("torch."),
                    "name": cfg.teacher_name or default_name({"path": str(teacher_dir.resolve()),
                                                              **locate(spec.path).record()})},
        "tokenizer": rollout_manifest["tokenizer"],
        "rollouts": {
            "path": str(Path(cfg.data).resolve()),
            "fingerprint": manifest_fingerprint(cfg.data),
            "rows": rollout_manifest["rows"],
            "model": rollout_manifest["model"],
            "sampling": rollout_manifest["sampling"],
            "prompts": rollout_manifest["prompts"],
            **({"reward": rollout_manifest["reward"]} if "reward" in rollout_manifest else {}),
        },
        "scoring": {"top_k": cfg.top_k, "temperature": cfg.temperature, "topk_logprobs_dtype": encoding.topk_dtype,
                    "topk_order": encoding.topk_order, "entropy_bits": ENTROPY_BITS,
                    "topk_bits": encoding.topk_bits if encoding.topk_dtype == "float16" else FLOAT32_BITS,
                    "support_samples": encoding.support_samples, "support_seed": encoding.support_seed,
                    "vocab_size": info.vocab, "engine": engine_record(cfg.engine),
                    "unavailable": list(UNAVAILABLE) if vllm else [],
                    "context": None if context is None else context.describe(plan),
                    "route": describe(where, routed, rollout_manifest["rows"]) if where else None,
                    "reference": None if reference is None else reference[1]},
    }
    with shard_work(cfg.out, TEACHER_FORMAT, metadata, rollout_manifest["num_shards"], cfg.worker,
                    parquet_options(encoding.topk_order)) as work:
        if work.todo:
            if vllm:
                scorer = VllmScorer(teacher_dir, spec, cfg.engine, info, cfg.top_k)
            else:
                model = _model(loaded, (fingerprint, str(device), dtype, spec.attn_implementation),
                               lambda: models.load_model(teacher_dir, device, dtype, spec.trust_remote_code,
                                                         "--teacher", spec.attn_implementation))
                scorer = Scorer(model, info.vocab, cfg.top_k, cfg.temperature, cfg.chunk_elements,
                                encoding.support_samples, encoding.support_seed)
            scorers = [scorer]
            if reference is not None:  # beside the teacher: its sampled-token log-prob alone
                directory, record = reference
                base = _model(loaded, (record["fingerprint"], str(device), dtype, None),
                              lambda: models.load_model(directory, device, dtype, spec.trust_remote_code,
                                                        "--reference"))
                scorers.append(Scorer(base, record["vocab"], 1, record["temperature"], cfg.chunk_elements))
            try:
                _score_shards(cfg, work, scorers, rollout_manifest, context, where)
            except NonFiniteLogits as e:
                raise NonFiniteLogits(f"--teacher {spec.path}: {e}") from None
        return work.summary("score-teacher")


def _model(loaded: dict | None, key: tuple, load):
    """A scoring model: `loaded`'s copy (it is only read, under inference mode), else `load()`, kept
    in `loaded` when given."""
    if loaded is None:
        return load()
    if key not in loaded:
        loaded[key] = load()
    return loaded[key]


def _reference(cfg: ScoreConfig, rollout_manifest: dict, vllm: bool) -> tuple[Path, dict] | None:
    """`--reference`'s directory and its record for the manifest (None without it), after checking
    it reads the rollouts' token ids; it scores at the rollouts' sampling temperature."""
    if cfg.reference is None:
        return None
    if vllm:
        raise InputError("--reference: scored with the transformers engine only; pass --engine hf")
    directory = models.check_model_dir(cfg.reference, "--reference")
    tokenizer = models.load_tokenizer(directory, cfg.teacher.trust_remote_code, "--reference")
    if tokenizer_fingerprint(tokenizer) != rollout_manifest["tokenizer"]["fingerprint"]:
        raise InputError(f"--reference {cfg.reference}: its tokenizer ({tokenizer_fingerprint(tokenizer)}) differs "
                         f"from the rollouts' ({rollout_manifest['tokenizer']['fingerprint']}); it must score the same "
                         "token ids")
    info = models.model_info(directory, tokenizer, cfg.teacher.trust_remote_code, "--reference")
    return directory, {"path": str(directory.resolve()), **locate(cfg.reference).record(),
                       "fingerprint": model_fingerprint(directory), "vocab": info.vocab,
                       "temperature": float(rollout_manifest["sampling"]["temperature"]) or 1.0}


def _context(cfg: ScoreConfig, rollout_manifest: dict, tokenizer, info, fingerprint: str, where: Where
             ) -> tuple[TeacherContext | None, Plan]:
    """The teacher's context (None without --teacher-prompt), its prompts rendered over the whole
    store once, so that a bad template, a missing field or a prompt too long fails before the teacher
    loads; warns of a teacher that is the rollout model itself with nothing of its own to see."""
    spec, plan = cfg.context, Plan()
    if spec.teacher_prompt is None:
        sampled_at = rollout_manifest["sampling"]["temperature"]
        if fingerprint == rollout_manifest["model"]["fingerprint"] and cfg.temperature == (sampled_at or 1.0):
            warn(f"--teacher {cfg.teacher.path}: is the model that sampled --data {cfg.data}, and it sees the same "
                 "prompt at the same temperature, so its log-probs equal the rollout model's: a student that starts "
                 f"from that model gets no signal (train refuses it). {SELF_TEACHER}")
        return None, plan
    settings = spec.chat_settings()
    context = TeacherContext(spec.teacher_prompt, settings, tokenizer, info.eos_ids, info.context,
                             spec.teacher_long_prompts)
    if "prompt" in context.fields and "prompt" in unavailable(rollout_manifest):
        raise InputError(f"--data {cfg.data}: its rows do not keep their prompt text (sampled by an older "
                         "lightopd), so --teacher-prompt cannot use {prompt}; re-run rollout")
    kept = 0
    for entry in rollout_manifest["shards"]:
        rows = pa.Table.from_batches(list(read_shard(cfg.data, rollout_manifest, entry, columns=[
            "prompt_id", "completion_ids", "answer", "metadata", *(["prompt"] if "prompt" not in unavailable(
                rollout_manifest) else [])])))
        rows = rows.take(matched(rows, where))
        rows_kept, _, shard_plan = context.shard(_with_prompt(rows), str(Path(cfg.data) / entry["name"]))
        kept += len(rows_kept)
        plan.add(shard_plan)
    if not kept:
        raise InputError("--teacher-long-prompts skip: every teacher prompt is too long for the teacher's context")
    if context.renderer.chats == 0 and (spec.teacher_system_prompt is not None or spec.teacher_chat_template_kwargs):
        flag = "--teacher-system-prompt" if spec.teacher_system_prompt is not None else "--teacher-chat-template-kwargs"
        raise InputError(f"{flag}: the teacher's prompts are plain text, not rendered with a chat template (its "
                         "tokenizer's template does not end a turn with its end token); pass --teacher-chat always")
    student = rollout_manifest["prompts"].get("rendering") or {}
    if context.renderer.chats and student.get("chat_template_kwargs", {}) != settings.template_kwargs:
        warn(f"--teacher-chat-template-kwargs {json.dumps(settings.template_kwargs)}: the rollouts were "
             f"rendered with {json.dumps(student.get('chat_template_kwargs', {}))}, so the teacher's prompt may end "
             "differently from the student's (Qwen3's enable_thinking writes an empty think block) before the same "
             "completion; pass the same options unless the difference is the point")
    return context, plan


def _with_prompt(rows: pa.Table) -> pa.Table:
    """A store written before rows kept their prompt text: a null `prompt` column."""
    return rows if "prompt" in rows.column_names else rows.append_column("prompt", pa.nulls(len(rows), pa.string()))


def _score_shards(cfg: ScoreConfig, work: ShardWork, scorers: list[Scorer | VllmScorer], rollout_manifest: dict,
                  context: TeacherContext | None, where: Where) -> None:
    """Score this worker's remaining shards (by the teacher, and the `--reference` model when there
    is a second scorer); writing a shard overlaps scoring the next."""
    scorer, reference = scorers[0], (scorers[1] if len(scorers) > 1 else None)
    shards = {shard_index(s["name"]): s for s in rollout_manifest["shards"]}
    pending: Future | None = None
    with ThreadPoolExecutor(max_workers=1) as io, StageProgress(
        "score-teacher", total=sum(shards[i]["rows"] for i in work.todo)
    ) as bar:
        for index in work.todo:
            rollouts = pa.Table.from_batches(list(read_shard(cfg.data, rollout_manifest, shards[index])))
            if where:  # this teacher's rows alone
                taken = matched(rollouts, where)
                bar.add_total(len(taken) - rollouts.num_rows)
                rollouts = rollouts.take(taken)
            teacher_prompts = None
            if context is not None:
                kept, teacher_prompts, _ = context.shard(_with_prompt(rollouts), shards[index]["name"])
                rollouts = rollouts.take(kept)
            own = rollouts["prompt_ids"].to_pylist()
            prompts = teacher_prompts if teacher_prompts is not None else own
            completions = rollouts["completion_ids"].to_pylist()
            stats: list[LogprobStats | None] = [None] * len(prompts)
            references: list[LogprobStats | None] | None = None if reference is None else [None] * len(prompts)
            lengths = [len(p) + len(c) for p, c in zip(prompts, completions, strict=True)]
            keys = list(zip(rollouts["prompt_id"].to_pylist(), rollouts["sample_index"].to_pylist(), strict=True))
            for batch in pack_by_tokens(lengths, cfg.micro_batch_tokens):
                scored = scorer.score([prompts[i] for i in batch], [completions[i] for i in batch],
                                      [keys[i] for i in batch])
                for i, s in zip(batch, scored, strict=True):
                    stats[i] = s
                if reference is not None:  # on the student's own prompt
                    for i, s in zip(batch, reference.score([own[i] for i in batch], [completions[i] for i in batch]),
                                    strict=True):
                        references[i] = s
                bar.advance(items=len(batch), tokens=sum(len(completions[i]) for i in batch))
            table = (teacher_table(rollouts, stats, cfg.encoding, scorer.unavailable, teacher_prompts, references)
                     if stats
                     else teacher_schema(cfg.encoding.topk_dtype).empty_table())  # every prompt of the shard skipped
            if pending is not None:
                pending.result()  # at most one shard waits to be written while the next is scored
            tokens = sum(len(c) for c in completions)
            pending = io.submit(work.writer.write_shard, index, table, tokens)
            work.new_tokens += tokens
        if pending is not None:
            pending.result()
        work.work_seconds = bar.seconds
