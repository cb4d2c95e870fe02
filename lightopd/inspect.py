"""`lightopd inspect`: describe a store and, with --verify, check every shard."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from lightopd.progress import console
from lightopd.store import describe, verify


def _render(summary: dict) -> Table:
    table = Table(title=f"{summary['path']} ({summary['format']})", show_header=False, title_justify="left")
    table.add_column("key", style="bold")
    table.add_column("value")

    def add(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                add(f"{prefix}.{k}" if prefix else k, v)
        else:
            table.add_row(prefix, "-" if value is None else str(value))

    first = ("format", "complete", "shards_written", "num_shards", "rows", "tokens", "bytes", "bytes_per_token")
    for key in first:
        add(key, summary.get(key))
    for key, value in summary.items():
        if key not in first and key != "path":
            add(key, value)
    return table


def run(store: str | Path, check: bool) -> tuple[dict, bool]:
    summary = describe(store)
    console.print(_render(summary))
    ok = True
    if check:
        problems = verify(store)
        summary["verified"] = not problems
        summary["problems"] = problems
        ok = not problems
        for p in problems:
            console.print(f"[red]problem:[/] {p}", highlight=False)
        if ok:
            n = summary["shards_written"]
            console.print(f"[green]verified[/] {n} shard{'' if n == 1 else 's'}: checksums and row counts match")
    return summary, ok
