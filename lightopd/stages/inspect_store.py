"""Stage `inspect`: describe a store (with its rewards by prompt group, where it has rewards); with
--verify, check every shard; with --show N, print rows decoded (with the teacher's own prompt beside
the student's, where score-teacher gave the teacher a context); with --stats, what its columns hold
(data/store_stats.py)."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from lightopd.config import InspectConfig
from lightopd.data.groups import reward_summary, rewards_by_prompt
from lightopd.data.reader import iter_batches, verify
from lightopd.data.store import ROLLOUT_FORMAT, check_version, describe, read_manifest, reward_checker
from lightopd.data.store_stats import store_stats
from lightopd.errors import InputError
from lightopd.progress import console, warn
from lightopd.report import render_rows, render_stats, render_store

LOGPROB_COLUMNS = ("behavior_logprobs", "policy_logprobs", "teacher_logprobs", "teacher_entropy")


def run(cfg: InspectConfig) -> tuple[dict, bool]:
    """The store's summary (with `verified` and `problems` under --verify, `show` under --show,
    `stats` under --stats), and whether it passed."""
    quiet = console.quiet
    console.quiet = quiet or cfg.format == "json"  # --format json: the JSON line alone
    try:
        return _run(cfg)
    finally:
        console.quiet = quiet


def _run(cfg: InspectConfig) -> tuple[dict, bool]:
    summary = describe(cfg.data)
    problems = verify(cfg.data) if cfg.verify else []
    manifest = read_manifest(cfg.data)
    if reward_checker(manifest) is not None and not problems:  # rows are read only from a sound store
        summary["rewards"] = reward_summary(rewards_by_prompt(cfg.data, manifest))
    if cfg.stats and not problems:
        check_version(cfg.data, manifest)
        summary["stats"] = store_stats(cfg.data, manifest)
    render_store(summary)
    if "stats" in summary:
        render_stats(summary["stats"])
    ok = not problems
    if cfg.verify:
        summary["verified"] = ok
        summary["problems"] = problems
        for p in problems:
            console.print(f"[red]problem:[/] {p}", highlight=False)
        if ok:
            n = summary["shards_written"]
            console.print(f"[green]verified[/] {n} shard{'' if n == 1 else 's'}: checksums and row counts match")
    if cfg.show:
        summary["show"] = show(cfg.data, cfg.show)
        if cfg.format != "json":  # to stdout, before the JSON line: `| less` pages the rows
            render_rows(summary["show"], Console(soft_wrap=False))
    return summary, ok


def _tokenizer(manifest: dict):
    """The tokenizer of the model that sampled the store, if it is still where the manifest says
    (or in the Hugging Face cache) and has the store's vocabulary; else None (ids are shown)."""
    from lightopd.engine.models import load_tokenizer
    from lightopd.hub import locate
    from lightopd.provenance import tokenizer_fingerprint

    model = manifest["model"] if manifest["format"] == ROLLOUT_FORMAT else manifest["rollouts"]["model"]
    where = model["path"]
    try:
        if not Path(where).is_dir() and model.get("hub_id"):
            where = str(locate(f"{model['hub_id']}@{model['commit']}").path)
        tokenizer = load_tokenizer(where)
    except InputError as e:
        warn(f"token ids are shown, not text: the tokenizer of {model['path']} cannot be read ({e})")
        return None
    if tokenizer_fingerprint(tokenizer) != manifest["tokenizer"]["fingerprint"]:
        warn(f"token ids are shown, not text: {where} no longer has the store's vocabulary")
        return None
    return tokenizer


def show(directory: str, n: int) -> list[dict]:
    """The first `n` rows of the store's listed shards, decoded."""
    manifest = read_manifest(directory)
    check_version(directory, manifest)
    tokenizer = _tokenizer(manifest)
    decode = (lambda ids: tokenizer.decode(ids, skip_special_tokens=False)) if tokenizer else (lambda ids: ids)  # noqa: E731
    rows = []
    for batch in iter_batches(directory, manifest=manifest, batch_size=max(n, 1)):
        for row in batch.to_pylist():
            shown = {"prompt_id": row["prompt_id"], "sample_index": row["sample_index"],
                     "prompt": decode(row["prompt_ids"]), "completion": decode(row["completion_ids"]),
                     "completion_tokens": len(row["completion_ids"]), "finish_reason": row["finish_reason"],
                     "answer": row["answer"], "metadata": json.loads(row["metadata"]) if row["metadata"] else None}
            if row.get("teacher_prompt_ids") is not None:  # the teacher saw its own context (--teacher-prompt)
                shown["teacher_prompt"] = decode(row["teacher_prompt_ids"])
            for column in LOGPROB_COLUMNS:
                values = row.get(column)
                if values:
                    shown[f"mean_{column}"] = round(sum(values) / len(values), 4)
            rows.append(shown)
            if len(rows) == n:
                return rows
    return rows
