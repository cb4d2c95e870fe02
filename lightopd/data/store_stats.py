"""`lightopd inspect --stats`: what a store holds, computed with polars over its shards.

Each listed shard is checked (reader.shard_path: size, sha256, store id) before polars scans it,
and the scans are lazy and run on polars' streaming engine, reading only the columns each figure
needs. Exact quantiles hold the values they rank, so the per-token figures read every s-th row, s
chosen to keep about TOKENS tokens (all of them up to that): memory stays bounded whatever the
store's size. It reports:
- bytes per completion token of each column (from the Parquet metadata);
- prompt and completion lengths (quantiles) and the finish reasons;
- the rewards: their mean and the pass rate per prompt (quantiles, all-pass and none-pass prompts);
- per position bucket of the completion (0–15, 16–63, ... tokens in): quantiles of the teacher's
  entropy, its mass outside the top-k, its log-prob of the sampled token, and the gap between the
  student's and the teacher's log-prob of that token (ℓμ − ℓT: where they disagree); and which
  rows they read (`by_position_rows`: every s-th of the store's).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from lightopd.data.reader import shard_path
from lightopd.data.store import unavailable

QUANTILES = (0.1, 0.5, 0.9)  # linearly interpolated, as numpy's default
TOKENS = 1_000_000  # the per-token figures read at most about this many tokens: every s-th row of a larger store
BUCKETS = (16, 64, 256, 1024, 4096)  # the first position of each bucket after the first


def column_bytes(paths: list[Path]) -> dict[str, int]:
    """Each top-level column's compressed bytes over the Parquet files `paths` (from their metadata)."""
    sizes: dict[str, int] = {}
    for path in paths:
        md = pq.ParquetFile(path).metadata
        for rg in range(md.num_row_groups):
            for c in range(md.num_columns):
                column = md.row_group(rg).column(c)
                name = column.path_in_schema.split(".")[0]
                sizes[name] = sizes.get(name, 0) + column.total_compressed_size
    return sizes


def _quantiles(frame, column: str) -> dict:
    row = frame.row(0, named=True)
    return {f"p{round(q * 100)}": None if row[f"{column}_{q}"] is None else float(f"{row[f'{column}_{q}']:.6g}")
            for q in QUANTILES}


def _bucket(pl):
    position, expr = pl.col("position"), None
    edges = (0, *BUCKETS)
    for low, high in zip(edges, (*BUCKETS, None), strict=True):
        label = pl.lit(f"{low}-{high - 1}" if high else f"{low}+")
        if high is None:
            expr = expr.otherwise(label)
        elif expr is None:
            expr = pl.when(position < high).then(label)
        else:
            expr = expr.when(position < high).then(label)
    return expr


def store_stats(directory: str | Path, manifest: dict) -> dict:
    """The figures of the module doc for the store at `directory` (its manifest read and checked)."""
    import polars as pl

    paths = [shard_path(directory, manifest, entry) for entry in manifest["shards"]]
    stats: dict = {"bytes_per_token": {name: round(size / max(manifest["tokens"], 1), 2)
                                       for name, size in column_bytes(paths).items()}}
    if not paths:
        return stats
    scan = pl.scan_parquet([str(p) for p in paths])
    names = scan.collect_schema().names()

    def quantiles_of(frame, columns):
        return frame.select([pl.col(c).quantile(q, "linear").alias(f"{c}_{q}") for c in columns for q in QUANTILES])

    lengths = scan.select(prompt=pl.col("prompt_ids").list.len(), completion=pl.col("completion_ids").list.len())
    frame = quantiles_of(lengths, ("prompt", "completion")).collect(engine="streaming")
    stats["lengths"] = {c: _quantiles(frame, c) for c in ("prompt", "completion")}
    finish = scan.group_by("finish_reason").agg(pl.len().alias("rows")).collect(engine="streaming")
    stats["finish_reasons"] = dict(sorted(zip(finish["finish_reason"].to_list(), finish["rows"].to_list(),
                                              strict=True), key=lambda kv: str(kv[0])))
    if "reward" in names:
        per_prompt = (scan.filter(pl.col("reward").is_not_null())
                      .group_by("prompt_id").agg(rate=(pl.col("reward") >= 1.0).mean(), mean=pl.col("reward").mean()))
        frame = per_prompt.select(prompts=pl.len(), mean=pl.col("mean").mean(), all_pass=(pl.col("rate") == 1).sum(),
                                  none_pass=(pl.col("rate") == 0).sum(),
                                  **{f"rate_{q}": pl.col("rate").quantile(q, "linear") for q in QUANTILES}
                                  ).collect(engine="streaming")
        if frame["prompts"][0]:
            row = frame.row(0, named=True)
            stats["rewards"] = {"prompts": row["prompts"], "mean": round(row["mean"], 4),
                                "prompts_all_pass": row["all_pass"], "prompts_none_pass": row["none_pass"],
                                "pass_rate_per_prompt": _quantiles(frame, "rate")}
    per_token = {  # name: (the teacher column it reads, its expression)
        "teacher_entropy": ("teacher_entropy", pl.col("teacher_entropy")),
        "teacher_tail_mass": ("teacher_log_tail", pl.col("teacher_log_tail").list.eval(pl.element().exp())),
        "teacher_logprob": ("teacher_logprobs", pl.col("teacher_logprobs")),
        "student_minus_teacher": ("teacher_logprobs", pl.col("behavior_logprobs") - pl.col("teacher_logprobs"))}
    empty = set(unavailable(manifest))  # columns the scorer left null (vLLM: the tail and entropy)
    wanted = [name for name, (column, _) in per_token.items() if column in names and column not in empty]
    if wanted:
        stride = -(-manifest["tokens"] // TOKENS)  # ceil: 1 up to TOKENS tokens
        rows = scan.with_row_index("row").filter(pl.col("row") % stride == 0) if stride > 1 else scan
        stats["by_position_rows"] = {"every": stride, "of": manifest["rows"]}
        tokens = (rows.filter(pl.col(per_token[wanted[0]][0]).is_not_null()
                              & (pl.col("completion_ids").list.len() > 0))
                  .select(position=pl.int_ranges(0, pl.col("completion_ids").list.len()),
                          **{name: per_token[name][1] for name in wanted})
                  .explode(["position", *wanted]).with_columns(bucket=_bucket(pl)))
        frame = (tokens.group_by("bucket").agg(pl.len().alias("tokens"), pl.col("position").min().alias("first"),
                                               *[pl.col(c).quantile(q, "linear").alias(f"{c}_{q}") for c in wanted
                                                 for q in QUANTILES])
                 .sort("first").collect(engine="streaming"))
        stats["by_position"] = [{"positions": row["bucket"], "tokens": row["tokens"],
                                 **{c: _quantiles(frame.slice(i, 1), c) for c in wanted}}
                                for i, row in enumerate(frame.iter_rows(named=True))]
    return stats
