"""Stage `eval`: verifiable accuracy of a model on prompts with answers, and its agreement with a
teacher store (the teacher's signal on those rows, without the teacher). Tables: report.py.

Accuracy is the mean over all samples (pass@1 averaged over n); pass@k is the unbiased estimator
1 − C(n−c, k)/C(n, k) averaged over prompts; majority vote takes each prompt's most common
extracted answer. Agreement is measured on the store's own rows: tail-bucket reverse and forward
KL over the teacher's top-k, k1 (the sampled estimate of reverse KL) and top-1 agreement, each a
mean over completion tokens. `--limit N` keeps the first N prompt records, and the rows of the
store's first N prompts. The result records the settings it was made with (`settings`), which
`--compare` checks; `--log-samples` writes every sample with its verdict (JSONL). A checker of the
user's runs in one worker process of its own, started before the model is loaded and ended with
the run (tasks/isolated.py); its failures name the record and the sample.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from lightopd.config import LOSS_CHUNK_TOKENS, EvalConfig
from lightopd.data.batching import TokenBatches
from lightopd.data.lock import exclusive
from lightopd.data.reader import iter_batches
from lightopd.data.store import TEACHER_FORMAT, open_store, teacher_context
from lightopd.data.writer import write_json_atomic
from lightopd.engine import models
from lightopd.engine.chunks import over_chunks
from lightopd.engine.forward import PositionLogits
from lightopd.engine.samplers import (
    HFSampler,
    Sampler,
    check_engine,
    engine_context,
    engine_record,
    open_sampler,
)
from lightopd.errors import InputError
from lightopd.objectives.diagnostics import diagnostics
from lightopd.objectives.divergences import ForwardKL, ReverseKL
from lightopd.progress import StageProgress, console, warn
from lightopd.provenance import tokenizer_fingerprint
from lightopd.report import compare_results, eval_result_problem, render_eval, run_curves, setting_differences
from lightopd.specs import load_prompts
from lightopd.stages import merge
from lightopd.tasks.checkers import reference_answer
from lightopd.tasks.verifiers import CHECKERS, Verifier, open_verifier
from lightopd.training.chunk import chunk_inputs


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that k of n samples (c correct), drawn without replacement, include a correct one."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def answer_metrics(results: list[list[tuple[bool, str | None]]], n: int) -> dict:
    """Accuracy, pass@k for k = 1, 2, 4, ... and n, and majority-vote accuracy over prompts."""
    ks = sorted({k for k in (2 ** i for i in range(n.bit_length())) if k <= n} | {n})
    correct = [sum(ok for ok, _ in r) for r in results]
    majority = []
    for r in results:
        votes = Counter(given for _, given in r if given is not None)
        if not votes:
            majority.append(False)
            continue
        top = votes.most_common(1)[0][0]
        majority.append(next(ok for ok, given in r if given == top))
    return {
        "accuracy": sum(correct) / (n * len(results)),
        "pass@k": {str(k): float(np.mean([pass_at_k(n, c, k) for c in correct])) for k in ks},
        "majority_accuracy": float(np.mean(majority)),
    }


@dataclass
class Samples:
    """Every prompt's sampled completions, their decoded texts and (correct, extracted answer)."""

    completions: list
    texts: list[list[str]]
    results: list[list[tuple[bool, str | None]]]

    def metrics(self, n: int) -> dict:
        flat = [c for cs in self.completions for c in cs]
        return {**answer_metrics(self.results, n),
                "mean_completion_tokens": float(np.mean([len(c.ids) for c in flat])),
                "truncation_rate": float(np.mean([c.finish_reason == "length" for c in flat]))}


@dataclass
class Prompts:
    """The prompt records eval checks (each with an answer), their token ids, and what was read."""

    records: list
    ids: list[list[int]]
    provenance: dict


def read_checked_prompts(cfg: EvalConfig, tokenizer, info: models.ModelInfo) -> Prompts:
    """The prompt records (each must have an answer) and their token ids, as rollout renders them."""
    encoded, provenance = load_prompts(cfg.prompts, cfg.render, cfg.limit, tokenizer, info.eos_ids, info.context)
    missing = next((r for r in encoded.records if r.answer is None), None)
    if missing is not None:
        raise InputError(f"{missing.where}: no reference answer (no field answer, final_answer, target, ground_truth "
                         "or solution; name it with --answer-field), so there is nothing to check its samples "
                         "against; eval needs an answer in every prompt record")
    if cfg.group_by is not None and all(cfg.group_by not in r.metadata for r in encoded.records):
        fields = sorted({k for r in encoded.records for k in r.metadata})
        raise InputError(f"--group-by {cfg.group_by}: no prompt record has this metadata field (they have: "
                         f"{', '.join(fields) or 'none'})")
    return Prompts(encoded.records, encoded.ids, provenance)


def group_scores(prompts: Prompts, samples: Samples, n: int, field: str) -> dict:
    """The answer metrics of the prompts of each value of metadata field `field` (records without it
    under "(none)")."""
    by: dict[str, list[int]] = {}
    for i, record in enumerate(prompts.records):
        value = record.metadata.get(field)
        by.setdefault("(none)" if value is None else str(value), []).append(i)
    return {"field": field, "scores": {value: {"prompts": len(index),
                                               **answer_metrics([samples.results[i] for i in index], n)}
                                       for value, index in sorted(by.items())}}


def sample_and_check(sampler: Sampler, tokenizer, prompts: Prompts, cfg: EvalConfig, verify: Verifier) -> Samples:
    """Sample `cfg.sampling.n` completions of every prompt (rollout's engines) and check each against its answer
    with `verify` (a checker's error names the record and the sample)."""
    records = prompts.records
    with StageProgress("eval", total=len(records) * cfg.sampling.n) as bar:
        completions = sampler.sample(prompts.ids, [r.id for r in records], cfg.sampling,
                                     on_step=lambda toks, fin: bar.advance(items=fin, tokens=toks), policy=False)
    texts = [[tokenizer.decode(c.ids, skip_special_tokens=True) for c in cs] for cs in completions]
    results = []
    for record, ts in zip(records, texts, strict=True):
        checked = []
        for j, text in enumerate(ts):
            try:
                checked.append(verify(text, record.answer, record.metadata, record.question))
            except InputError as e:
                raise InputError(f"{record.where}, sample {j}: {e}") from None
        results.append(checked)
    return Samples(completions, texts, results)


def log_samples(path: str, tokenizer, prompts: Prompts, samples: Samples, checker: str) -> None:
    """Every sample as one JSON line: what was asked, what came back, what was read, and the verdict."""
    builtin = checker in CHECKERS
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    with open(tmp, "w") as f:
        for record, ids, cs, ts, rs in zip(prompts.records, prompts.ids, samples.completions, samples.texts,
                                           samples.results, strict=True):
            prompt = tokenizer.decode(ids, skip_special_tokens=False)
            for j, (c, text, (ok, given)) in enumerate(zip(cs, ts, rs, strict=True)):
                f.write(json.dumps({
                    "prompt_id": record.id, "sample_index": j, "prompt": prompt, "completion": text,
                    "extracted": given, "reference": record.answer,
                    "reference_answer": reference_answer(record.answer) if builtin else None,
                    "correct": bool(ok), "finish_reason": c.finish_reason, "completion_tokens": len(c.ids),
                    **({"metadata": record.metadata} if record.metadata else {}),
                }, ensure_ascii=False, default=str, allow_nan=False) + "\n")
    os.replace(tmp, path)


@torch.inference_mode()
def teacher_agreement(model, vocab: int, store: str, micro_batch_tokens: int, limit: int | None = None) -> dict:
    """Mean agreement statistics over the store's rows (those of its first `limit` prompts if given)."""
    manifest = open_store(store, formats=(TEACHER_FORMAT,))
    k = manifest["scoring"]["top_k"]
    positions = PositionLogits(model, vocab)
    columns = ["prompt_ids", "completion_ids", "teacher_logprobs", "topk_ids", "topk_logprobs", "teacher_log_tail"]
    divergences = {"rkl": ReverseKL(), "fkl": ForwardKL()}
    sums = {"rkl": 0.0, "fkl": 0.0, "k1": 0.0, "top1_agree": 0.0}
    tokens, rows = 0, 0
    first = FirstPrompts(limit)
    with StageProgress("teacher agreement", total=manifest["rows"]) as bar:
        for batch in iter_batches(store, columns=["prompt_id", *columns], manifest=manifest):
            batch = first.take(batch)
            if batch.num_rows == 0:
                break
            rows += batch.num_rows
            batches = TokenBatches(pa.Table.from_batches([batch]), micro_batch_tokens)
            for micro in batches.plan:
                mb = batches.tensors(micro, columns, k, positions.device)
                logits_of = positions.logits_at(mb.layout)
                for inputs in over_chunks(logits_of, len(mb.targets), LOSS_CHUNK_TOKENS, partial(chunk_inputs, mb)):
                    diag = diagnostics(inputs)
                    for name, objective in divergences.items():
                        sums[name] += float(objective.loss(inputs).sum())
                    sums["k1"] += float(diag["k1"].sum())
                    sums["top1_agree"] += float(diag["top1_agree"].sum())
                tokens += len(mb.targets)
            bar.advance(items=batch.num_rows, tokens=batches.tokens)
        bar.add_total(rows - bar.total)  # --limit: the rows of the first prompts were all there was to do
    return {**{name: total / tokens for name, total in sums.items()}, "tokens": tokens, "rows": rows,
            "prompts": first.count, "store": str(store), "teacher": manifest["teacher"]["path"], "top_k": k,
            "teacher_context": teacher_context(manifest)}


class FirstPrompts:
    """Keeps the rows of the first `limit` prompts of a stream of record batches (all, if None)."""

    def __init__(self, limit: int | None):
        self.limit, self.seen, self.count = limit, set(), 0

    def take(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        keep = 0
        for pid in batch.column("prompt_id").to_pylist():
            if pid not in self.seen:
                if self.limit is not None and len(self.seen) >= self.limit:
                    break
                self.seen.add(pid)
            keep += 1
        self.count = len(self.seen)
        return batch.slice(0, keep)


def output_lock(flag: str, out: str | None):
    """The lock of an output file (another eval writing the same file stops, naming this one), after
    checking the file can be written there: a bad path fails now, not after all the sampling."""
    if out is None:
        return contextlib.nullcontext()
    path = Path(out)
    if path.is_dir():
        raise InputError(f"{flag} {out}: is a directory; give the file's path")
    if not path.parent.is_dir():
        raise InputError(f"{flag} {out}: no such directory {path.parent}")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InputError(f"{flag} {out}: not writable")
    return exclusive(path.parent, f"{flag} {out}", f".{path.name}.lock")


def run(cfg: EvalConfig) -> dict:
    with output_lock("--out", cfg.out), output_lock("--log-samples", cfg.log_samples), contextlib.ExitStack() as opened:
        return _run(cfg, opened)


def settings(cfg: EvalConfig, prompts: Prompts | None, store: dict | None) -> dict:
    """What the numbers depend on besides the model: `--compare` checks these are alike."""
    out: dict = {"limit": cfg.limit}
    if prompts is not None:
        p = prompts.provenance
        out["prompts"] = {k: p[k] for k in ("path", "split", "subset", "fingerprint", "rendering", "count",
                                            "max_prompt_tokens", "long_prompts", "skipped", "truncated")}
        sampling = {k: v for k, v in cfg.sampling.record().items() if k != "policy_logprobs"}
        out.update(checker=cfg.checking.checker, **sampling, engine=engine_record(cfg.engine))
    if store is not None:
        out["data"] = {"path": str(cfg.data), "store_id": store["store_id"]}
    return out


def _run(cfg: EvalConfig, opened: contextlib.ExitStack) -> dict:
    """The evaluation; `opened` holds what it opens for as long as it runs (a user checker's process)."""
    spec, sampling = cfg.model, cfg.sampling
    merged = base = None
    if merge.is_adapter(spec.path):  # a local adapter: evaluated merged into its base, a temporary copy ($TMPDIR)
        merged = Path(opened.enter_context(tempfile.TemporaryDirectory(prefix="lightopd-merged-"))) / "model"
        base = merge.merge(spec.path, merged, None, spec.trust_remote_code, "--model")["base"]
        console.print(f"--model {spec.path}: a LoRA adapter, evaluated merged into its base {base}", highlight=False,
                      soft_wrap=True)
    model_dir = merged if merged is not None else models.check_model_dir(spec.path)
    tokenizer = models.load_tokenizer(model_dir, spec.trust_remote_code)
    result: dict = {"command": "eval", "model": str(spec.path), **({"merged_base": base} if base else {})}
    info = engine_context(models.model_info(model_dir, tokenizer, spec.trust_remote_code), cfg.engine)
    check_engine(cfg.engine)
    prompts = None if cfg.prompts is None else read_checked_prompts(cfg, tokenizer, info)
    verify = None  # a checker that cannot be had fails before the model is loaded
    if prompts is not None:
        verify = opened.enter_context(open_verifier(cfg.checking.checker, cfg.checking.checker_timeout))
    store = None
    if cfg.data is not None:
        store = open_store(cfg.data, formats=(TEACHER_FORMAT,))
        if store["tokenizer"]["fingerprint"] != tokenizer_fingerprint(tokenizer):
            raise InputError(f"--data {cfg.data}: its vocabulary differs from --model {spec.path}'s")
    sampler = None if prompts is None else open_sampler(model_dir, spec, cfg.engine, info, cfg.generation_batch_size,
                                                        cfg.kv_cache_tokens, sampling.seed)
    if prompts is not None:
        samples = sample_and_check(sampler, tokenizer, prompts, cfg, verify)
        result.update(prompts=str(cfg.prompts.source), n=sampling.n, temperature=sampling.temperature,
                      top_p=sampling.top_p, top_k=sampling.top_k, min_p=sampling.min_p,
                      checker=cfg.checking.checker, prompts_evaluated=len(prompts.records),
                      **samples.metrics(sampling.n))
        if cfg.group_by is not None:
            result["groups"] = group_scores(prompts, samples, sampling.n, cfg.group_by)
        if cfg.log_samples is not None:
            log_samples(cfg.log_samples, tokenizer, prompts, samples, cfg.checking.checker)
            result["log_samples"] = str(cfg.log_samples)
    if cfg.data is not None:  # a forward pass: the transformers model, whichever engine sampled
        model = sampler.model if isinstance(sampler, HFSampler) else None
        if sampler is not None:
            sampler.close()
        if model is None:
            model = models.hf_model(model_dir, spec)
        result["teacher"] = teacher_agreement(model, info.vocab, cfg.data, cfg.micro_batch_tokens, cfg.limit)
        context = result["teacher"]["teacher_context"]
        if context is not None:
            console.print(f"teacher agreement: against the teacher conditioned on its context {context['template']!r} "
                          "(score-teacher --teacher-prompt), which the model evaluated here does not see",
                          highlight=False, soft_wrap=True)
    result["settings"] = settings(cfg, prompts, store)
    render_eval(result)
    if cfg.out is not None:  # written beside and renamed: never half a file; a symlink there is replaced, not followed
        write_json_atomic(Path(cfg.out), result)
    return result


def _not_json(constant: str):
    raise ValueError(f"{constant} is not standard JSON")


def compare(paths: list[str], plot: str | None = None) -> dict:
    """Saved eval results side by side (a table, and with `plot` a PNG chart); or training runs' metrics.jsonl
    files, their last steps and (`plot`) their curves."""
    if paths and all(Path(p).suffix == ".jsonl" for p in paths):
        return run_curves(paths, plot)
    results = []
    for p in paths:
        try:
            result = json.loads(Path(p).read_text(), parse_constant=_not_json)
        except (OSError, ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise InputError(f"--compare {p}: not a readable eval result ({type(e).__name__}: {e})") from None
        problem = eval_result_problem(result)
        if problem:
            raise InputError(f"--compare {p}: {problem}")
        results.append(result)
    files: dict[str, set[Path]] = {}
    for p in paths:
        files.setdefault(Path(p).stem, set()).add(Path(p).resolve())
    # a column each file: results in files of the same name are told apart by their paths
    names = [Path(p).stem if len(files[Path(p).stem]) == 1 else p for p in paths]
    differences = setting_differences(results, names)
    for line in differences:
        warn(line)
    return {**compare_results(results, names, plot), "differences": differences}
