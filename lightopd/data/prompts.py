"""Prompt records from a source (sources.py), their fields mapped (fields.py), and their token ids
(chat.py), with prompts too long for the model skipped, truncated or refused.

A prompt may hold at most `max_prompt_tokens` tokens (and always leaves at least one position of
the model's context to generate into). A longer one is, by `--long-prompts`: `error` (the
default: stop before any model is loaded, naming the record), `skip` (left out, counted), or
`truncate` (its first tokens cut, keeping the end, where the question and the generation prompt
are). Ids must be unique in the source.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

from lightopd.data.chat import Renderer
from lightopd.data.fields import Mapping, PromptRecord
from lightopd.data.sources import Source
from lightopd.errors import InputError
from lightopd.progress import console

LONG_PROMPTS = ("error", "skip", "truncate")


def read_prompts(source: Source | str | Path, mapping: Mapping | None = None, limit: int | None = None,
                 quiet: bool = False) -> list[PromptRecord]:
    """Every record of the source (the first `limit` if given), validated; ids must be unique. The
    fields chosen for each role are printed once (stderr) unless `quiet`."""
    source = source if isinstance(source, Source) else Source(str(source))
    mapping = mapping or Mapping()
    records: list[PromptRecord] = []
    seen: dict[str, str] = {}
    for index, (where, raw) in enumerate(itertools.islice(source.records(), limit)):
        rec = mapping.record(where, index, raw)
        if rec.id in seen:
            raise InputError(f"{where}: duplicate id {rec.id!r} (first at {seen[rec.id]})")
        seen[rec.id] = where
        records.append(rec)
    if not records:
        raise InputError(f"--prompts {source.spec}: the source holds no records")
    if not quiet:
        extra = sorted({k for r in records for k in r.metadata})
        console.print(f"prompts: {len(records)} records from {source.spec}; {mapping.describe(len(records))}"
                      + (f"; metadata <- {', '.join(extra)}" if extra else ""), soft_wrap=True, highlight=False)
    return records


@dataclass
class Encoded:
    """The records kept, their token ids, and what the length policy did."""

    records: list[PromptRecord]
    ids: list[list[int]]
    skipped: int = 0
    truncated: int = 0


def encode_all(renderer: Renderer, records: list[PromptRecord], context: int | None,
               max_prompt_tokens: int | None = None, long_prompts: str = "error") -> Encoded:
    """Token ids of every record under the length policy (see the module docstring)."""
    limits = [n for n in (max_prompt_tokens, None if context is None else context - 1) if n is not None]
    limit = min(limits) if limits else None
    out = Encoded([], [])
    for record in records:
        ids = renderer.ids(record)
        if not ids:
            raise InputError(f"{record.where}: the prompt encodes to no tokens")
        if limit is not None and len(ids) > limit:
            if long_prompts == "skip":
                out.skipped += 1
                continue
            if long_prompts == "truncate":
                ids = ids[len(ids) - limit:]
                out.truncated += 1
            else:
                why = ("--max-prompt-tokens" if max_prompt_tokens is not None and limit == max_prompt_tokens
                       else f"the model's context of {context} tokens, which leaves no room to generate")
                raise InputError(f"{record.where}: prompt is {len(ids)} tokens, over the limit of {limit} "
                                 f"({why}); --long-prompts skip or truncate lets the run go on")
        out.records.append(record)
        out.ids.append(ids)
    renderer.check_used()
    if not out.records:
        raise InputError(f"every prompt is over the limit of {limit} tokens (--max-prompt-tokens, --long-prompts)")
    if out.skipped or out.truncated:
        console.print(f"prompts: {out.skipped} skipped, {out.truncated} truncated (over {limit} tokens; "
                      f"--long-prompts {long_prompts})", highlight=False)
    return out


def provenance(source: Source, mapping: Mapping, renderer: Renderer, encoded: Encoded, limit: int | None,
               max_prompt_tokens: int | None, long_prompts: str) -> dict:
    """What a store records of its prompts: the source, a fingerprint of its content and of the field
    mapping together, the rendering, the column that keeps each prompt's text, and how many records
    were used."""
    identity = source.identity()
    fields = mapping.flags()
    key = json.dumps({"content": identity["fingerprint"], "split": source.split, "subset": source.subset,
                      "fields": fields}, sort_keys=True)
    return {**identity, "content_fingerprint": identity["fingerprint"],
            "fingerprint": "sha256:" + hashlib.sha256(key.encode()).hexdigest()[:32], "fields": fields,
            "rendering": renderer.describe(), "text": "prompt", "count": len(encoded.records), "limit": limit,
            "max_prompt_tokens": max_prompt_tokens, "long_prompts": long_prompts, "skipped": encoded.skipped,
            "truncated": encoded.truncated}
