"""Stage `eval`: verifiable accuracy of a model on prompts with answers, and its agreement with a
teacher store (the teacher's signal on those rows, without the teacher).

Accuracy is the mean over all samples (pass@1 averaged over n); pass@k is the unbiased estimator
1 − C(n−c, k)/C(n, k) averaged over prompts; majority vote takes each prompt's most common
extracted answer. Agreement is measured on the store's own rows: tail-bucket reverse and forward
KL over the teacher's top-k, k1 (the sampled estimate of reverse KL) and top-1 agreement, each a
mean over completion tokens.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from lightopd import models
from lightopd import objectives as O
from lightopd.batching import pack_by_tokens, pack_rows, stored_tensors
from lightopd.config import DivergenceParams, EvalConfig
from lightopd.errors import InputError
from lightopd.forward import PositionLogits
from lightopd.generate import sample_prompts
from lightopd.progress import StageProgress, console
from lightopd.prompts import encode_all, read_prompts
from lightopd.store import TEACHER_FORMAT, iter_batches, open_store
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


def read_checked_prompts(cfg: EvalConfig, model_dir: Path, tokenizer) -> tuple[list, list, tuple]:
    """The prompt records (each must have an answer), their token ids, and the model's
    (context length, EOS ids, pad id): everything `sample_and_check` needs but the model."""
    records = read_prompts(cfg.prompts, cfg.limit)
    missing = next((r for r in records if r.answer is None), None)
    if missing is not None:
        raise InputError(f"{missing.where}: no 'answer' field, so there is nothing to check its samples "
                         "against; eval needs an answer in every prompt record")
    setup = models.generation_setup(model_dir, tokenizer, cfg.trust_remote_code)
    return records, encode_all(tokenizer, records, setup[0]), setup


def sample_and_check(model, tokenizer, records, encoded, setup: tuple, cfg: EvalConfig) -> Samples:
    """Sample `cfg.n` completions of every prompt (the rollout engine) and check each against its answer."""
    context, eos_ids, pad_id = setup
    with StageProgress("eval", total=len(records) * cfg.n) as bar:
        completions = sample_prompts(model, encoded, [r.id for r in records], cfg.n, cfg.sampling, cfg.seed,
                                     cfg.batch_size, eos_ids, pad_id, context,
                                     on_step=lambda toks, fin: bar.advance(items=fin, tokens=toks))
    texts = [[tokenizer.decode(c.ids, skip_special_tokens=True) for c in cs] for cs in completions]
    results = [[check(t, r.answer, cfg.checker) for t in ts] for r, ts in zip(records, texts, strict=True)]
    return Samples(completions, texts, results)


@torch.inference_mode()
def teacher_agreement(model, store: str, micro_batch_tokens: int) -> dict:
    manifest = open_store(store, formats=(TEACHER_FORMAT,))
    k = manifest["scoring"]["top_k"]
    positions = PositionLogits(model)
    device = positions.device
    columns = ["prompt_ids", "completion_ids", "teacher_logprobs", "topk_ids", "topk_logprobs"]
    sums = {"rkl": 0.0, "fkl": 0.0, "k1": 0.0, "top1_agree": 0.0}
    tokens = 0
    params = DivergenceParams()
    with StageProgress("teacher agreement", total=manifest["rows"]) as bar:
        for batch in iter_batches(store, columns=columns, manifest=manifest):
            table = pa.Table.from_batches([batch])
            rows = table.select(["prompt_ids", "completion_ids"]).to_pylist()
            lengths = [len(r["prompt_ids"]) + len(r["completion_ids"]) for r in rows]
            for micro in pack_by_tokens(lengths, micro_batch_tokens):
                mrows = [rows[i] for i in micro]
                mtable = table.take(pa.array(micro))
                ids, mask, prow, pcol, targets = pack_rows([r["prompt_ids"] for r in mrows],
                                                           [r["completion_ids"] for r in mrows], device)
                if len(targets) == 0:
                    continue
                stored = stored_tensors(mtable, columns, k, device)
                logits = positions.logits_at(ids, mask, prow, pcol)(0, len(targets))
                inputs = O.Inputs(O.student_view(logits, targets, stored["topk_ids"]), **stored)
                diag = O.diagnostics(inputs)
                sums["rkl"] += float(O.rkl(inputs, params).sum())
                sums["fkl"] += float(O.fkl(inputs, params).sum())
                sums["k1"] += float(diag["k1"].sum())
                sums["top1_agree"] += float(diag["top1_agree"].sum())
                tokens += len(targets)
            bar.advance(items=len(rows), tokens=sum(len(r["completion_ids"]) for r in rows))
    return {**{name: total / tokens for name, total in sums.items()}, "tokens": tokens, "store": str(store),
            "teacher": manifest["teacher"]["path"], "top_k": k}


def run(cfg: EvalConfig) -> dict:
    model_dir = models.check_model_dir(cfg.model)
    tokenizer = models.load_tokenizer(model_dir, cfg.trust_remote_code)
    result: dict = {"command": "eval", "model": str(cfg.model)}
    prompts = None if cfg.prompts is None else read_checked_prompts(cfg, model_dir, tokenizer)
    if cfg.teacher_store is not None:
        store = open_store(cfg.teacher_store, formats=(TEACHER_FORMAT,))
        if store["tokenizer"]["fingerprint"] != models.tokenizer_fingerprint(tokenizer):
            raise InputError(f"--teacher-store {cfg.teacher_store}: its vocabulary differs from --model {cfg.model}'s")
    device = models.resolve_device(cfg.device)
    model = models.load_model(model_dir, device, models.resolve_dtype(cfg.dtype, device), cfg.trust_remote_code)
    if prompts is not None:
        samples = sample_and_check(model, tokenizer, *prompts, cfg)
        result.update(prompts=str(cfg.prompts), n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p,
                      checker=cfg.checker, prompts_evaluated=len(prompts[0]), **samples.metrics(cfg.n))
    if cfg.teacher_store is not None:
        result["teacher"] = teacher_agreement(model, cfg.teacher_store, cfg.micro_batch_tokens)
    render(result)
    if cfg.out is not None:
        import json

        Path(cfg.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _flatten(result: dict) -> dict[str, object]:
    rows = {}
    for key in ("accuracy", "majority_accuracy", "mean_completion_tokens", "truncation_rate"):
        if key in result:
            rows[key] = result[key]
    for k, v in result.get("pass@k", {}).items():
        rows[f"pass@{k}"] = v
    for k in ("rkl", "fkl", "k1", "top1_agree"):
        if k in result.get("teacher", {}):
            rows[f"teacher.{k}"] = result["teacher"][k]
    return rows


def render(*results: dict, names: list[str] | None = None) -> None:
    from rich.table import Table

    table = Table(title="lightopd eval", title_justify="left")
    table.add_column("metric", style="bold")
    flats = [_flatten(r) for r in results]
    for name in names or [r.get("model", "?") for r in results]:
        table.add_column(str(name), justify="right")
    for key in dict.fromkeys(k for f in flats for k in f):
        table.add_row(key, *[f"{f[key]:.4f}" if isinstance(f.get(key), float) else str(f.get(key, "-"))
                             for f in flats])
    console.print(table)


BOUNDED = ("accuracy", "majority_accuracy", "truncation_rate", "teacher.top1_agree")  # fractions: one chart axis


def compare(paths: list[str], plot: str | None = None) -> dict:
    import json

    results = []
    for p in paths:
        try:
            results.append(json.loads(Path(p).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"--compare {p}: not a readable eval result ({e})") from None
    render(*results, names=[Path(p).stem for p in paths])
    flat = {Path(p).stem: _flatten(r) for p, r in zip(paths, results, strict=True)}
    summary = {"command": "eval", "compare": flat}
    if plot is not None:
        from lightopd.plots import bars

        series = {name: {k: v for k, v in values.items() if k in BOUNDED or k.startswith("pass@")}
                  for name, values in flat.items()}
        summary["plot"] = str(bars(plot, series, "lightopd eval"))
    return summary
