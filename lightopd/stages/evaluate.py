"""Stage `eval`: verifiable accuracy of a model on prompts with answers, and its agreement with a
teacher store (the teacher's signal on those rows, without the teacher). Tables: report.py.

Accuracy is the mean over all samples (pass@1 averaged over n); pass@k is the unbiased estimator
1 − C(n−c, k)/C(n, k) averaged over prompts; majority vote takes each prompt's most common
extracted answer. Agreement is measured on the store's own rows: tail-bucket reverse and forward
KL over the teacher's top-k, k1 (the sampled estimate of reverse KL) and top-1 agreement, each a
mean over completion tokens.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from lightopd.config import EvalConfig
from lightopd.data.batching import TokenBatches
from lightopd.data.lock import exclusive
from lightopd.data.prompts import encode_all, read_prompts
from lightopd.data.reader import iter_batches
from lightopd.data.store import TEACHER_FORMAT, open_store
from lightopd.engine import models
from lightopd.engine.forward import PositionLogits
from lightopd.engine.generate import sample_prompts
from lightopd.errors import InputError
from lightopd.objectives import Inputs
from lightopd.objectives.diagnostics import diagnostics
from lightopd.objectives.divergences import ForwardKL, ReverseKL
from lightopd.objectives.stats import logprob_stats
from lightopd.progress import StageProgress
from lightopd.provenance import tokenizer_fingerprint
from lightopd.report import compare_results, render_eval
from lightopd.tasks.checkers import check


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


def read_checked_prompts(cfg: EvalConfig, model_dir: Path, tokenizer) -> tuple[list, list, models.ModelInfo]:
    """The prompt records (each must have an answer), their token ids, and the model's ModelInfo:
    everything `sample_and_check` needs but the model."""
    records = read_prompts(cfg.prompts, cfg.limit)
    missing = next((r for r in records if r.answer is None), None)
    if missing is not None:
        raise InputError(f"{missing.where}: no 'answer' field, so there is nothing to check its samples "
                         "against; eval needs an answer in every prompt record")
    info = models.model_info(model_dir, tokenizer, cfg.model.trust_remote_code)
    return records, encode_all(tokenizer, records, info.context), info


def sample_and_check(model, tokenizer, records, encoded, info: models.ModelInfo, cfg: EvalConfig) -> Samples:
    """Sample `cfg.sampling.n` completions of every prompt (rollout's engine) and check each against its answer."""
    with StageProgress("eval", total=len(records) * cfg.sampling.n) as bar:
        completions = sample_prompts(model, encoded, [r.id for r in records], cfg.sampling, cfg.generation_batch_size,
                                     info, on_step=lambda toks, fin: bar.advance(items=fin, tokens=toks))
    texts = [[tokenizer.decode(c.ids, skip_special_tokens=True) for c in cs] for cs in completions]
    results = [[check(t, r.answer, cfg.checker) for t in ts] for r, ts in zip(records, texts, strict=True)]
    return Samples(completions, texts, results)


@torch.inference_mode()
def teacher_agreement(model, vocab: int, store: str, micro_batch_tokens: int) -> dict:
    manifest = open_store(store, formats=(TEACHER_FORMAT,))
    k = manifest["scoring"]["top_k"]
    positions = PositionLogits(model, vocab)
    columns = ["prompt_ids", "completion_ids", "teacher_logprobs", "topk_ids", "topk_logprobs", "teacher_log_tail"]
    divergences = {"rkl": ReverseKL(), "fkl": ForwardKL()}
    sums = {"rkl": 0.0, "fkl": 0.0, "k1": 0.0, "top1_agree": 0.0}
    tokens = 0
    with StageProgress("teacher agreement", total=manifest["rows"]) as bar:
        for batch in iter_batches(store, columns=columns, manifest=manifest):
            batches = TokenBatches(pa.Table.from_batches([batch]), micro_batch_tokens)
            for micro in batches.plan:
                mb = batches.tensors(micro, columns, k, positions.device)
                logits = positions.logits_at(mb.ids, mb.mask, *mb.positions)(0, len(mb.targets))
                inputs = Inputs(logprob_stats(logits, mb.targets, at=mb.stored["topk_ids"]), **mb.stored)
                diag = diagnostics(inputs)
                for name, objective in divergences.items():
                    sums[name] += float(objective.loss(inputs).sum())
                sums["k1"] += float(diag["k1"].sum())
                sums["top1_agree"] += float(diag["top1_agree"].sum())
                tokens += len(mb.targets)
            bar.advance(items=batch.num_rows, tokens=batches.tokens)
    return {**{name: total / tokens for name, total in sums.items()}, "tokens": tokens, "store": str(store),
            "teacher": manifest["teacher"]["path"], "top_k": k}


def output_lock(out: str | None):
    """The lock of `--out FILE` (another eval writing the same file stops, naming this one), after
    checking the file can be written there: a bad --out fails now, not after all the sampling."""
    if out is None:
        return contextlib.nullcontext()
    path = Path(out)
    if path.is_dir():
        raise InputError(f"--out {out}: is a directory; give the result file's path")
    if not path.parent.is_dir():
        raise InputError(f"--out {out}: no such directory {path.parent}")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InputError(f"--out {out}: not writable")
    return exclusive(path.parent, f"--out {out}", f".{path.name}.lock")


def run(cfg: EvalConfig) -> dict:
    with output_lock(cfg.out):
        return _run(cfg)


def _run(cfg: EvalConfig) -> dict:
    spec, sampling = cfg.model, cfg.sampling
    model_dir = models.check_model_dir(spec.path)
    tokenizer = models.load_tokenizer(model_dir, spec.trust_remote_code)
    result: dict = {"command": "eval", "model": str(spec.path)}
    info = models.model_info(model_dir, tokenizer, spec.trust_remote_code)
    prompts = None if cfg.prompts is None else read_checked_prompts(cfg, model_dir, tokenizer)
    if cfg.data is not None:
        store = open_store(cfg.data, formats=(TEACHER_FORMAT,))
        if store["tokenizer"]["fingerprint"] != tokenizer_fingerprint(tokenizer):
            raise InputError(f"--data {cfg.data}: its vocabulary differs from --model {spec.path}'s")
    device = models.resolve_device(spec.device)
    model = models.load_model(model_dir, device, models.resolve_dtype(spec.dtype, device), spec.trust_remote_code)
    if prompts is not None:
        samples = sample_and_check(model, tokenizer, *prompts, cfg)
        result.update(prompts=str(cfg.prompts), n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                      checker=cfg.checker, prompts_evaluated=len(prompts[0]), **samples.metrics(sampling.n))
    if cfg.data is not None:
        result["teacher"] = teacher_agreement(model, info.vocab, cfg.data, cfg.micro_batch_tokens)
    render_eval(result)
    if cfg.out is not None:
        Path(cfg.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def compare(paths: list[str], plot: str | None = None) -> dict:
    """Saved eval results side by side (a table, and with `plot` a PNG chart)."""
    results = []
    for p in paths:
        try:
            result = json.loads(Path(p).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"--compare {p}: not a readable eval result ({e})") from None
        if not isinstance(result, dict):
            raise InputError(f"--compare {p}: not an eval result (a JSON object), found a {type(result).__name__}")
        results.append(result)
    return compare_results(results, [Path(p).stem for p in paths], plot)
