"""Peak memory of `lightopd inspect STORE --stats` on the bench world's teacher store and on stores
10, 100 and 300 times larger (its shards written over again, each copy under other prompt ids);
prints JSON. Past about a million tokens (the 300× store) the per-token figures read every s-th
row, so memory stops growing with the store. Each point is a fresh process, whose peak resident
memory includes its imports (torch is not imported by inspect; polars and pyarrow are), beside
`inspect` without --stats.

    python bench/inspect_stats.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, peak_rss_mb  # noqa: E402
from train import bench_world  # noqa: E402

from lightopd.data.store import open_store  # noqa: E402
from lightopd.data.writer import StoreWriter  # noqa: E402
from lightopd.stages.reward import STORE_FIELDS  # noqa: E402
from lightopd.stages.teacher_table import parquet_options  # noqa: E402


def replicated(store: Path, out: Path, times: int) -> Path:
    """`store`'s shards written `times` times into a new store at `out` (prompt ids suffixed by copy)."""
    manifest = open_store(store)
    metadata = {k: v for k, v in manifest.items() if k not in STORE_FIELDS}
    shards = manifest["shards"]
    writer = StoreWriter(out, manifest["format"], metadata, len(shards) * times,
                         parquet_options(manifest["scoring"].get("topk_order")))
    for copy in range(times):
        for j, entry in enumerate(shards):
            table = pq.read_table(store / entry["name"])
            ids = pa.array([f"{p}-{copy}" for p in table.column("prompt_id").to_pylist()])
            table = table.set_column(table.schema.get_field_index("prompt_id"), "prompt_id", ids)
            writer.write_shard(copy * len(shards) + j, table, entry["tokens"])
    return out


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _, _, store = bench_world(tmp, "stats")
        result = {"benchmark": "inspect_stats", "machine": machine(), "points": {}}
        for times in (1, 10, 100, 300):
            path = store if times == 1 else replicated(store, tmp / f"x{times}", times)
            m = open_store(path)
            command = [sys.executable, "-m", "lightopd", "inspect", str(path), "--format", "json"]
            result["points"][f"{times}x"] = {
                "rows": m["rows"], "tokens": m["tokens"],
                "mb_on_disk": round(sum(s["bytes"] for s in m["shards"]) / 2**20, 1),
                "peak_rss_mb_stats": round(peak_rss_mb([*command, "--stats"]), 1),
                "peak_rss_mb_without_stats": round(peak_rss_mb(command), 1)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
