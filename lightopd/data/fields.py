"""Which fields of a source record play which role: prompt, messages, answer, id; the rest is metadata.

A role is taken from the field named by its flag (`--prompt-field`, `--messages-field`,
`--answer-field`, `--id-field`), which every record must then have, or else from the first
recognised name the record has:
- prompt: `prompt`, `question`, `problem` (a string);
- messages: `messages`, or ShareGPT `conversations` (`{"from": "human", "value": ...}` turns);
  trailing assistant turns are dropped, since the model is asked to write them; roles are those of
  `ROLES` (a ShareGPT turn's `from` one of `SHAREGPT_ROLES`), and one turn at least is the user's;
- answer (optional): `answer`, `final_answer`, `target`, `ground_truth`, `solution`;
- id (default: the record's index): `id`, `idx`, `uid`, `unique_id`.
A record yields exactly one of a prompt and messages; a prompt holds more than white space. A
null field (a JSON null, an empty cell) is a missing one, and an error that it causes says it is
null. Every other field is kept in the record's metadata (a JSON column of the rollout store, and
what a checker receives) as it is; a field named `metadata` that holds an object (a reasoning-gym
entry's) has its keys kept there directly rather than nested under `metadata`, unless one of them
is also a field of the record (then it stays nested, so nothing is lost); except that a number
that is not finite (NaN, ±inf: a float column's missing value, or JSON's non-standard NaN)
becomes null there, so that every JSON lightopd writes of it is standard JSON. `Mapping` counts
which field played each role, so the choice can be printed once for the whole source.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field

from lightopd.errors import InputError

RECOGNISED = {
    "prompt": ("prompt", "question", "problem"),
    "messages": ("messages", "conversations"),
    "answer": ("answer", "final_answer", "target", "ground_truth", "solution"),
    "id": ("id", "idx", "uid", "unique_id"),
}
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "system": "system", "tool": "tool"}


@dataclass(frozen=True)
class PromptRecord:
    id: str
    prompt: str | None
    messages: tuple[dict, ...] | None
    answer: str | None
    metadata: dict
    where: str  # "FILE line N" or "FILE row N", for error messages

    @property
    def question(self) -> str:
        """The text a checker sees as the prompt: the prompt, or the last message of a chat."""
        return self.prompt if self.prompt is not None else self.messages[-1]["content"]


@dataclass
class Mapping:
    """The fields named by flags (None: recognise), and which field played each role so far."""

    prompt: str | None = None
    messages: str | None = None
    answer: str | None = None
    id: str | None = None
    used: Counter = field(default_factory=Counter)  # (role, field) -> records

    def flags(self) -> dict:
        return {role: getattr(self, role) for role in RECOGNISED}

    def _field(self, where: str, record: dict, role: str, nulls: set[str]) -> str | None:
        flag = getattr(self, role)
        if flag is None:
            return next((name for name in RECOGNISED[role] if name in record), None)
        if flag in nulls:
            raise InputError(f"{where}: field {flag!r} (--{role}-field) is null (empty) in this record")
        if flag not in record:
            raise InputError(f"{where}: no field {flag!r} (--{role}-field); the record's fields are "
                             f"{', '.join(map(repr, record)) or 'none'}")
        return flag

    def _prompt_fields(self, where: str, raw: dict, nulls: set[str]) -> tuple[str | None, str | None]:
        flagged = self.prompt is not None or self.messages is not None
        candidates = ((self.prompt,), (self.messages,)) if flagged else (RECOGNISED["prompt"], RECOGNISED["messages"])
        found = [next((n for n in names if n is not None and n in raw), None) for names in candidates]
        if any(found):
            return found[0], found[1]
        null = next((n for names in candidates for n in names if n in nulls), None)
        if null is not None:
            raise InputError(f"{where}: field {null!r} is null (empty) in this record, which leaves it no prompt")
        if flagged:
            flags = [f"{name!r} (--{role}-field)" for role, name in (("prompt", self.prompt),
                                                                       ("messages", self.messages)) if name]
            raise InputError(f"{where}: no field {' or '.join(flags)}; the record's fields are "
                             f"{', '.join(map(repr, raw)) or 'none'}")
        names = ", ".join(RECOGNISED["prompt"] + RECOGNISED["messages"])
        raise InputError(f"{where}: record has neither a prompt nor messages (none of the fields {names}; "
                         f"its fields are {', '.join(map(repr, raw)) or 'none'}); name one with "
                         "--prompt-field or --messages-field")

    def record(self, where: str, index: int, raw) -> PromptRecord:
        """The record's roles, validated; InputError naming the source, the record and the field."""
        if not isinstance(raw, dict):
            raise InputError(f"{where}: a record must be an object (JSON object, table row), got {type(raw).__name__}")
        nulls = {k for k, v in raw.items() if v is None}
        raw = {k: v for k, v in raw.items() if v is not None}
        prompt_field, messages_field = self._prompt_fields(where, raw, nulls)
        if prompt_field and messages_field:
            raise InputError(f"{where}: record has both of {prompt_field!r} (a prompt) and {messages_field!r} "
                             "(messages); give exactly one, or choose with --prompt-field or --messages-field")
        prompt = messages = None
        if prompt_field:
            prompt = raw[prompt_field]
            if not isinstance(prompt, str):
                raise InputError(f"{where}: field {prompt_field!r} (the prompt) must be a string, got "
                                 f"{type(prompt).__name__}")
            if not prompt.strip():
                raise InputError(f"{where}: field {prompt_field!r} (the prompt) is "
                                 f"{'white space only' if prompt else 'empty'}; there is nothing to answer")
        else:
            messages = chat_turns(where, messages_field, raw[messages_field])
        answer_field, id_field = self._field(where, raw, "answer", nulls), self._field(where, raw, "id", nulls)
        answer = None if answer_field is None else _answer(where, answer_field, raw[answer_field])
        rid = index if id_field is None else raw[id_field]
        if isinstance(rid, bool) or not isinstance(rid, (str, int)):
            raise InputError(f"{where}: field {id_field!r} (the id) must be a string or an integer, got "
                             f"{type(rid).__name__}")
        roles = {"prompt": prompt_field, "messages": messages_field, "answer": answer_field, "id": id_field}
        self.used.update((role, name) for role, name in roles.items() if name)
        metadata = {k: finite(v) for k, v in raw.items() if k not in roles.values()}
        own = metadata.get("metadata")
        if isinstance(own, dict) and not set(own) & set(metadata):  # its own metadata object, not nested in ours
            metadata = {**metadata.pop("metadata"), **metadata}
        return PromptRecord(str(rid), prompt, messages, answer, metadata, where)

    def describe(self, records: int) -> str:
        """One line: which field played each role, in how many of the `records`."""
        parts = []
        for role in RECOGNISED:
            names = [(name, n) for (r, name), n in self.used.items() if r == role]
            if names:
                parts.append(f"{role} <- " + ", ".join(repr(name) + ("" if n == records else f" ({n})")
                                                       for name, n in names))
        if not any(r == "id" for r, _ in self.used):
            parts.append("id <- record index")
        return "; ".join(parts)


def finite(value):
    """`value` with every number that is not finite (NaN, ±inf), at any depth, made None: standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value] if isinstance(value, list) else tuple(finite(v) for v in value)
    return value


def _answer(where: str, name: str, value) -> str:
    if isinstance(value, bool):
        return str(value)
    if not isinstance(value, (str, int, float)):
        raise InputError(f"{where}: field {name!r} (the answer) must be a string or a number, got "
                         f"{type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"{where}: field {name!r} (the answer) is {value}, not an answer")
    return str(value)


def chat_turns(where: str, name: str, turns) -> tuple[dict, ...]:
    """`{role, content}` turns from a messages list (ShareGPT `{from, value}` turns converted),
    without trailing assistant turns."""
    if isinstance(turns, str):  # a CSV cell, or a column of JSON text
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError:
            pass
    if not isinstance(turns, (list, tuple)) or not turns:
        raise InputError(f"{where}: field {name!r} must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(turns):
        if isinstance(m, dict) and "from" in m and "value" in m and "role" not in m:
            if not isinstance(m["from"], str) or m["from"] not in SHAREGPT_ROLES:
                raise InputError(f"{where}: field {name!r}[{i}] is a turn from {m['from']!r}; a ShareGPT turn is "
                                 f"from one of {', '.join(SHAREGPT_ROLES)}")
            m = {"role": SHAREGPT_ROLES[m["from"]], "content": m["value"]}
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise InputError(f"{where}: field {name!r}[{i}] must be an object with string 'role' and 'content' "
                             "(or ShareGPT 'from' and 'value')")
        if m["role"] not in ROLES:
            raise InputError(f"{where}: field {name!r}[{i}] has the role {m['role']!r}; the roles are "
                             f"{', '.join(ROLES)} (ShareGPT turns: from {', '.join(SHAREGPT_ROLES)})")
        out.append({"role": m["role"], "content": m["content"]})
    while out and out[-1]["role"] == "assistant":
        out.pop()
    if not out:
        raise InputError(f"{where}: field {name!r} holds only assistant turns, which leaves no prompt")
    if not any(m["role"] == "user" for m in out):
        raise InputError(f"{where}: field {name!r} holds no user turn ({', '.join(m['role'] for m in out)}), which "
                         "leaves the model nothing to answer")
    return tuple(out)
