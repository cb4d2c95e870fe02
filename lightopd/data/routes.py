"""Routing rows to teachers: which rows of a rollout store a teacher scores, and whether several
routed teacher stores cover their rollouts once.

`score-teacher --where FIELD=VALUE[,VALUE...]` (repeatable) scores only the rows whose metadata
field FIELD holds one of the VALUEs, every `--where` holding at once; a value matches its text,
a number or boolean its JSON text (`--where level=3` matches 3 and "3"). A row without the field
is not matched. The teacher store records the route and the rows it matched; `train --data A
--data B` then checks that stores over the same rollouts share no row and leave none out.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import TYPE_CHECKING

import pyarrow as pa

from lightopd.data.reader import read_shard
from lightopd.errors import InputError

if TYPE_CHECKING:
    from collections.abc import Iterable

Where = dict[str, tuple[str, ...]]


def parse_where(entries: Iterable[str]) -> Where:
    """{field: accepted values} from `--where FIELD=VALUE[,VALUE...]` entries."""
    out: dict[str, tuple[str, ...]] = {}
    for entry in entries:
        field, eq, values = entry.partition("=")
        if not eq or not field or not values:
            raise InputError(f"--where {entry!r}: expected FIELD=VALUE or FIELD=VALUE,VALUE (a metadata field of "
                             "each row and the values it may hold)")
        if field in out:
            raise InputError(f"--where: the field {field!r} is given twice; list its values once, comma-separated")
        out[field] = tuple(values.split(","))
    return out


def text(value) -> str:
    """A metadata value as a route compares it."""
    return value if isinstance(value, str) else json.dumps(value)


def metadata_of(raw: str | None) -> dict:
    value = json.loads(raw) if raw else {}
    return value if isinstance(value, dict) else {}


def matched(table: pa.Table, where: Where) -> pa.Array:
    """The indices of `table`'s rows that the route takes (every row without a route), for `take`."""
    if not where:
        return pa.array(range(table.num_rows), pa.int64())
    out = []
    for i, raw in enumerate(table.column("metadata").to_pylist()):
        metadata = metadata_of(raw)
        if all(field in metadata and text(metadata[field]) in values for field, values in where.items()):
            out.append(i)
    return pa.array(out, pa.int64())


def seen_values(tables: Iterable[pa.Table], where: Where, limit: int = 8) -> dict[str, list[str]]:
    """The values each routed field takes in these rows, most common first: for the message of a
    route that matches nothing."""
    counts: dict[str, Counter] = {field: Counter() for field in where}
    for table in tables:
        for raw in table.column("metadata").to_pylist():
            metadata = metadata_of(raw)
            for field in where:
                counts[field][text(metadata[field]) if field in metadata else "(missing)"] += 1
    return {field: [v for v, _ in c.most_common(limit)] for field, c in counts.items()}


def routed_rows(directory: str, manifest: dict, where: Where) -> int:
    """The rows `--where` takes from the rollout store at `directory` (all of them without a route);
    a route that takes none is exit 2 naming the values its fields hold."""
    if not where:
        return manifest["rows"]
    tables = [pa.Table.from_batches(list(read_shard(directory, manifest, entry, columns=["metadata"])))
              for entry in manifest["shards"]]
    count = sum(len(matched(t, where)) for t in tables)
    if not count:
        seen = "; ".join(f"{field} holds {', '.join(values)}" for field, values in seen_values(tables, where).items())
        raise InputError(f"--where: takes none of the {manifest['rows']} rows of --data {directory} (in their "
                         f"metadata, {seen})")
    return count


def describe(where: Where, rows: int, of: int) -> dict:
    """The route as a teacher store's manifest records it."""
    return {"where": {field: list(values) for field, values in where.items()}, "rows": rows, "rollout_rows": of}


def check_cover(stores: list[tuple[str, dict]], keys: dict[str, set[tuple[str, int]]], allow_unrouted: bool
                ) -> list[str]:
    """For teacher stores over the same rollouts (`stores`: (path, manifest)), InputError if a row is
    in two of them, or if rows of the rollouts are in none (unless `allow_unrouted`, then warnings
    are returned). `keys` holds each store's (prompt_id, sample_index) pairs."""
    warnings = []
    by_rollouts: dict[str, list[str]] = {}
    for path, manifest in stores:
        by_rollouts.setdefault(manifest["rollouts"]["fingerprint"], []).append(path)
    manifests = dict(stores)
    for paths in by_rollouts.values():
        if len(paths) < 2:
            continue
        owner: dict[tuple[str, int], str] = {}
        for path in paths:
            for key in keys[path]:
                if key in owner:
                    raise InputError(f"--data {path} and --data {owner[key]}: both hold prompt {key[0]!r} sample "
                                     f"{key[1]} of the same rollouts; routed teachers score disjoint rows (give "
                                     "each score-teacher its own --where)")
                owner[key] = path
        total = manifests[paths[0]]["rollouts"].get("rows")
        routes = [manifests[p]["scoring"].get("route") for p in paths]
        total = next((r["rollout_rows"] for r in routes if r), total)
        if total is not None and len(owner) < total:
            skipped = sum(((manifests[p]["scoring"].get("context") or {}).get("skipped") or 0) for p in paths)
            why = (f"no --where took them, or --teacher-long-prompts skip left them out ({skipped} teacher "
                   "prompts too long)") if skipped else "no --where took them"
            message = (f"--data {', '.join(paths)}: {total - len(owner)} of the {total} rows of their rollouts are "
                       f"scored by none of these teachers ({why})")
            if not allow_unrouted:
                raise InputError(message + "; score them with another teacher, or pass --allow-unrouted to train "
                                           "on the routed rows alone")
            warnings.append(message + "; --allow-unrouted: training on the routed rows alone")
    return warnings
