"""The teacher's context: its prompt built from each rollout row's record by a template.

`score-teacher --teacher-prompt TEMPLATE` gives the teacher something the student does not see (a
reference solution, a hint, a rule, a system line). The template is Python format text whose
fields name the row's record: `{prompt}` (the student's prompt text as rollout stored it: the
record's prompt, or a chat's last message), `{answer}` (its reference answer) and any metadata
field by name (`{solution}`, `{hint}`); `{{` and `}}` are literal braces. The text is rendered with
the teacher's tokenizer by the same rules as the student's prompt (data/chat.py: `--teacher-chat`,
`--teacher-system-prompt`, `--teacher-chat-template-kwargs`), and the teacher scores the
student's completion tokens after it. A record that lacks a named field, or holds null there, is
an error naming the row and the field.

A teacher prompt whose row would not fit the teacher's context (prompt plus the longest
completion of its prompt group) is, by `--teacher-long-prompts`: `error` (the default, before the
teacher is loaded), `skip` (every row of that prompt is left out of the teacher store) or
`truncate` (its first tokens cut). Score-teacher renders every shard's prompts in a first pass,
so that all of this is known before the teacher is loaded.
"""

from __future__ import annotations

import hashlib
import json
import string
from dataclasses import dataclass

from lightopd.data.chat import ChatSettings, Renderer
from lightopd.data.fields import PromptRecord
from lightopd.errors import InputError

BUILT_IN = ("prompt", "answer")  # the fields every row has; the rest come from its metadata


def template_fields(template: str) -> list[str]:
    """The field names a template uses, in order; InputError for positional or computed fields."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:  # an unmatched brace
        raise InputError(f"--teacher-prompt: not a format template ({e}); a literal brace is {{{{ or }}}}") from None
    names = []
    for _, name, _, _ in parsed:
        if name is None:
            continue
        if not name.isidentifier():
            raise InputError(f"--teacher-prompt: the field {{{name}}} is not a plain name; use {{prompt}}, "
                             "{answer} or a metadata field's name")
        names.append(name)
    if not names:
        raise InputError("--teacher-prompt: the template names no field, so the teacher would see the same text for "
                         "every row; use {prompt} (the student's prompt), {answer}, or a metadata field")
    return names


def fill(template: str, fields: list[str], row: dict, where: str) -> str:
    """The template (its `fields`: template_fields) filled from a row (`prompt`, `answer`, `metadata`
    JSON text)."""
    metadata = json.loads(row["metadata"]) if row.get("metadata") else {}
    values = {**metadata, "prompt": row.get("prompt"), "answer": row.get("answer")}
    for name in fields:
        if name not in values:
            known = ", ".join(sorted(set(values) | set(BUILT_IN)))
            raise InputError(f"{where}: --teacher-prompt names {{{name}}}, and this record has no field {name!r} "
                             f"(it has {known})")
        if values[name] is None:
            hint = (" (a store sampled before rows kept their prompt text: re-run rollout)" if name == "prompt"
                    else "")
            raise InputError(f"{where}: --teacher-prompt names {{{name}}}, and this record's {name!r} is null{hint}")
    return template.format_map({k: v if isinstance(v, str) else json.dumps(v) for k, v in values.items()})


@dataclass
class Plan:
    """What the length policy did over a store: prompts skipped and truncated."""

    skipped: int = 0
    truncated: int = 0

    def add(self, other: Plan) -> None:
        self.skipped += other.skipped
        self.truncated += other.truncated


class TeacherContext:
    """Teacher prompt ids of rollout rows under one template and one set of chat settings."""

    def __init__(self, template: str, settings: ChatSettings, tokenizer, eos_ids: list[int], context: int | None,
                 long_prompts: str):
        self.fields = template_fields(template)
        self.template, self.context, self.long_prompts = template, context, long_prompts
        self.renderer = Renderer(tokenizer, settings, eos_ids, "--teacher")

    def ids(self, row: dict, where: str, longest: int, plan: Plan) -> list[int] | None:
        """The teacher prompt ids of a row whose prompt group's longest completion is `longest`
        tokens, after the length policy (None: skipped); `plan` counts what the policy did."""
        record = PromptRecord(str(row["prompt_id"]), fill(self.template, self.fields, row, where), None, None, {},
                              where)
        ids = self.renderer.ids(record)
        if not ids:
            raise InputError(f"{where}: the teacher prompt encodes to no tokens")
        limit = None if self.context is None else self.context - longest
        if limit is None or len(ids) <= limit:
            return ids
        if self.long_prompts == "skip":
            plan.skipped += 1
            return None
        if self.long_prompts == "truncate" and limit >= 1:
            plan.truncated += 1
            return ids[len(ids) - limit:]
        raise InputError(f"{where}: the teacher prompt is {len(ids)} tokens, and with the prompt's longest "
                         f"completion ({longest}) it exceeds the teacher's context of {self.context}"
                         + ("; --teacher-long-prompts skip or truncate lets the run go on" if limit >= 1 else
                            ", which the completion fills alone; --teacher-long-prompts skip leaves it out"))

    def shard(self, table, where: str) -> tuple[list[int], list[list[int]], Plan]:
        """For one rollout shard (a pyarrow Table): the rows kept, their teacher prompt ids (rendered
        once per prompt; the samples of a prompt share them), and what the length policy did."""
        rows = table.select(["prompt_id", "prompt", "answer", "metadata"]).to_pylist()
        longest: dict[str, int] = {}
        for row, completion in zip(rows, table["completion_ids"].to_pylist(), strict=True):
            longest[row["prompt_id"]] = max(len(completion), longest.get(row["prompt_id"], 0))
        plan, rendered = Plan(), {}
        kept, ids = [], []
        for i, row in enumerate(rows):
            pid = row["prompt_id"]
            if pid not in rendered:
                rendered[pid] = self.ids(row, f"{where} row {i} (prompt {pid!r})", longest[pid], plan)
            if rendered[pid] is not None:
                kept.append(i)
                ids.append(rendered[pid])
        return kept, ids, plan

    def describe(self, plan: Plan) -> dict:
        """What the teacher store's manifest records: the template, the rendering, the length policy
        and its effect, and a fingerprint of what decides the teacher's prompt."""
        rendering = self.renderer.describe()
        key = json.dumps({"template": self.template, "rendering": rendering}, sort_keys=True)
        return {"template": self.template, "rendering": rendering, "long_prompts": self.long_prompts,
                "skipped": plan.skipped, "truncated": plan.truncated,
                "fingerprint": "sha256:" + hashlib.sha256(key.encode()).hexdigest()[:32]}
