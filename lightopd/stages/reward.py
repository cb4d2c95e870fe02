"""Stage `reward`: score a store's completions again with another checker, without sampling again.

It writes a new store of the same format with the same rows, shard by shard, each row's `reward`
recomputed by `--checker` on its completion decoded as rollout decodes it (special tokens left
out), against the row's answer and metadata; rows without an answer keep a null reward. The
checker's prompt is the row's stored prompt text, as rollout gave it (the prompt tokens decoded in
a store written before rows kept the text). The new manifest names the checker and the store it was
recomputed from; every shard is read through the same checks as any store's, and the result
verifies like any store. Resumable and splittable by `--worker`, as rollout is.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from lightopd.config import RewardConfig
from lightopd.data.reader import read_shard, verify
from lightopd.data.store import (
    ROLLOUT_FORMAT,
    TEACHER_FORMAT,
    manifest_fingerprint,
    open_store,
    rollouts_of,
    shard_index,
)
from lightopd.data.writer import shard_work
from lightopd.engine import models
from lightopd.errors import InputError
from lightopd.hub import locate
from lightopd.progress import StageProgress
from lightopd.provenance import tokenizer_fingerprint
from lightopd.stages.rollout import reward_of
from lightopd.stages.teacher_table import parquet_options
from lightopd.tasks.verifiers import Scorer, open_scorer

STORE_FIELDS = ("format", "format_version", "store_id", "lightopd_version", "created", "num_shards", "complete",
                "rows", "tokens", "shards")  # the writer's own; the rest is the store's description


def _tokenizer(cfg: RewardConfig, manifest: dict):
    """--tokenizer, else the tokenizer of the model that sampled the store; it must have the store's vocabulary."""
    model = rollouts_of(manifest)["model"]
    where = cfg.tokenizer or model["path"]
    if cfg.tokenizer is None and not Path(where).is_dir() and model.get("hub_id"):
        where = str(locate(f"{model['hub_id']}@{model['commit']}").path)
    tokenizer = models.load_tokenizer(locate(where).path if cfg.tokenizer else where, False, "--tokenizer")
    # a Hub id is read from the cache (or downloaded) like any model's
    if tokenizer_fingerprint(tokenizer) != manifest["tokenizer"]["fingerprint"]:
        raise InputError(f"--tokenizer {where}: its vocabulary is not the one --data {cfg.data} was sampled with")
    return tokenizer


def rescored(table: pa.Table, tokenizer, scored: Scorer, where: str) -> pa.Table:
    """`table` with its `reward` column recomputed (null where a row has no answer)."""
    names = ["prompt_ids", "completion_ids", "answer", "metadata"] + (["prompt"] if "prompt" in table.column_names
                                                                       else [])
    rows = table.select(names).to_pylist()
    # the prompt text rollout gave the checker; a store written before rows kept it: the decoded prompt
    question = lambda row: row.get("prompt") or tokenizer.decode(row["prompt_ids"], skip_special_tokens=True)  # noqa: E731
    rewards = [reward_of(scored, tokenizer, row["completion_ids"], row["answer"],
                         json.loads(row["metadata"]) if row["metadata"] else {},
                         question(row) if row["answer"] is not None else "", f"{where} row {i}")
               for i, row in enumerate(rows)]
    column = table.schema.get_field_index("reward")
    return table.set_column(column, table.schema.field(column), pa.array(rewards, type=pa.float32()))


def run(cfg: RewardConfig) -> dict:
    """Write (or finish) the re-rewarded store `cfg.out`; return the JSON summary."""
    manifest = open_store(cfg.data, formats=(ROLLOUT_FORMAT, TEACHER_FORMAT))
    problems = verify(cfg.data)
    if problems:
        raise InputError(f"--data {cfg.data}: damaged store ({'; '.join(problems[:3])}); "
                         "`lightopd inspect --verify` lists every problem")
    if Path(cfg.out).resolve() == Path(cfg.data).resolve():
        raise InputError(f"--out {cfg.out}: the store being read; write the new rewards to another directory")
    tokenizer = _tokenizer(cfg, manifest)
    record = {"checker": cfg.checking.checker,
              "recomputed_from": {"path": str(Path(cfg.data).resolve()), "fingerprint": manifest_fingerprint(cfg.data)}}
    metadata = {k: v for k, v in manifest.items() if k not in STORE_FIELDS}
    if manifest["format"] == ROLLOUT_FORMAT:
        metadata["reward"] = record
    else:
        metadata["rollouts"] = {**metadata["rollouts"], "reward": record}
    options = (parquet_options((manifest.get("scoring") or {}).get("topk_order"))
               if manifest["format"] == TEACHER_FORMAT else None)
    shards = {shard_index(s["name"]): s for s in manifest["shards"]}
    with open_scorer(cfg.checking.checker, cfg.checking.checker_timeout) as scored, \
            shard_work(cfg.out, manifest["format"], metadata, manifest["num_shards"], cfg.worker, options) as work:
        with StageProgress("reward", total=sum(shards[i]["rows"] for i in work.todo)) as bar:
            for index in work.todo:
                entry = shards[index]
                table = pa.Table.from_batches(list(read_shard(cfg.data, manifest, entry, as_stored=True)))
                if "reward" not in table.column_names:  # a store sampled before rows carried rewards
                    table = table.append_column("reward", pa.nulls(len(table), type=pa.float32()))
                table = rescored(table, tokenizer, scored, str(Path(cfg.data) / entry["name"]))
                work.writer.write_shard(index, table, entry["tokens"])
                bar.advance(items=len(table), tokens=entry["tokens"])
                work.new_tokens += entry["tokens"]
            work.work_seconds = bar.seconds
        return work.summary("reward")
