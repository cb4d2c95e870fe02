"""Which fields of a source record play which role: prompt, messages, answer, id; the rest is metadata.

A role is taken from the field named by its flag (`--prompt-field`, `--messages-field`,
`--answer-field`, `--id-field`), which every record must then have, or else from the first
recognised name the record has:
- prompt: `prompt`, `question`, `problem` (a string);
- messages: `messages`, or ShareGPT `conversations` (`{"from": "human", "value": ...}` turns);
  trailing assistant turns are dropped, since the model is asked to write them;
- answer (optional): `answer`, `final_answer`, `target`, `ground_truth`, `solution`;
- id (default: the record's index): `id`, `idx`, `uid`, `unique_id`.
A record yields exactly one of a prompt and messages. Every other field is kept, as it is, in the
record's metadata (a JSON column of the rollout store, and what a checker receives). `Mapping`
counts which field played each role, so the choice can be printed once for the whole source.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

from lightopd.errors import InputError

RECOGNISED = {
    "prompt": ("prompt", "question", "problem"),
    "messages": ("messages", "conversations"),
    "answer": ("answer", "final_answer", "target", "ground_truth", "solution"),
    "id": ("id", "idx", "uid", "unique_id"),
}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "system": "system"}


@dataclass(frozen=True)
class PromptRecord:
    id: str
    prompt: str | None
    messages: tuple[dict, ...] | None
    answer: str | None
    metadata: dict
    where: str  # "FILE line N" or "FILE row N", for error messages


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

    def _field(self, where: str, record: dict, role: str) -> str | None:
        flag = getattr(self, role)
        if flag is None:
            return next((name for name in RECOGNISED[role] if name in record), None)
        if flag not in record:
            raise InputError(f"{where}: no field {flag!r} (--{role}-field); the record's fields are "
                             f"{', '.join(map(repr, record)) or 'none'}")
        return flag

    def _prompt_fields(self, where: str, raw: dict) -> tuple[str | None, str | None]:
        if self.prompt is None and self.messages is None:
            found = [next((n for n in RECOGNISED[role] if n in raw), None) for role in ("prompt", "messages")]
            if not any(found):
                names = ", ".join(RECOGNISED["prompt"] + RECOGNISED["messages"])
                raise InputError(f"{where}: record has neither a prompt nor messages (none of the fields {names}; "
                                 f"its fields are {', '.join(map(repr, raw)) or 'none'}); name one with "
                                 "--prompt-field or --messages-field")
            return found[0], found[1]
        found = [name if name in raw else None for name in (self.prompt, self.messages)]
        if not any(found):
            flags = [f"{name!r} (--{role}-field)" for role, name in (("prompt", self.prompt),
                                                                       ("messages", self.messages)) if name]
            raise InputError(f"{where}: no field {' or '.join(flags)}; the record's fields are "
                             f"{', '.join(map(repr, raw)) or 'none'}")
        return found[0], found[1]

    def record(self, where: str, index: int, raw) -> PromptRecord:
        """The record's roles, validated; InputError naming the source, the record and the field."""
        if not isinstance(raw, dict):
            raise InputError(f"{where}: a record must be an object (JSON object, table row), got {type(raw).__name__}")
        prompt_field, messages_field = self._prompt_fields(where, raw)
        if prompt_field and messages_field:
            raise InputError(f"{where}: record has both of {prompt_field!r} (a prompt) and {messages_field!r} "
                             "(messages); give exactly one, or choose with --prompt-field or --messages-field")
        prompt = messages = None
        if prompt_field:
            prompt = raw[prompt_field]
            if not isinstance(prompt, str):
                raise InputError(f"{where}: field {prompt_field!r} (the prompt) must be a string, got "
                                 f"{type(prompt).__name__}")
        else:
            messages = chat_turns(where, messages_field, raw[messages_field])
        answer_field, id_field = self._field(where, raw, "answer"), self._field(where, raw, "id")
        answer = None if answer_field is None else _answer(where, answer_field, raw[answer_field])
        rid = index if id_field is None else raw[id_field]
        if isinstance(rid, bool) or not isinstance(rid, (str, int)):
            raise InputError(f"{where}: field {id_field!r} (the id) must be a string or an integer, got "
                             f"{type(rid).__name__}")
        roles = {"prompt": prompt_field, "messages": messages_field, "answer": answer_field, "id": id_field}
        self.used.update((role, name) for role, name in roles.items() if name)
        metadata = {k: v for k, v in raw.items() if k not in roles.values()}
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


def _answer(where: str, name: str, value) -> str:
    if isinstance(value, bool):
        return str(value)
    if not isinstance(value, (str, int, float)):
        raise InputError(f"{where}: field {name!r} (the answer) must be a string or a number, got "
                         f"{type(value).__name__}")
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
            m = {"role": SHAREGPT_ROLES.get(m["from"], m["from"]), "content": m["value"]}
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise InputError(f"{where}: field {name!r}[{i}] must be an object with string 'role' and 'content' "
                             "(or ShareGPT 'from' and 'value')")
        out.append({"role": m["role"], "content": m["content"]})
    while out and out[-1]["role"] == "assistant":
        out.pop()
    if not out:
        raise InputError(f"{where}: field {name!r} holds only assistant turns, which leaves no prompt")
    return tuple(out)
