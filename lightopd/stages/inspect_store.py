"""Stage `inspect`: describe a store and, with --verify, check every shard."""

from __future__ import annotations

from lightopd.config import InspectConfig
from lightopd.data.reader import verify
from lightopd.data.store import describe
from lightopd.progress import console
from lightopd.report import render_store


def run(cfg: InspectConfig) -> tuple[dict, bool]:
    """The store's summary (with `verified` and `problems` under --verify), and whether it passed."""
    summary = describe(cfg.data)
    render_store(summary)
    ok = True
    if cfg.verify:
        problems = verify(cfg.data)
        summary["verified"] = not problems
        summary["problems"] = problems
        ok = not problems
        for p in problems:
            console.print(f"[red]problem:[/] {p}", highlight=False)
        if ok:
            n = summary["shards_written"]
            console.print(f"[green]verified[/] {n} shard{'' if n == 1 else 's'}: checksums and row counts match")
    return summary, ok
