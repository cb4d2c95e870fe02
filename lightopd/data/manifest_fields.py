"""The fields of a store's manifest that readers use, each checked for its type and range on reading.

A manifest is a file anyone can edit, so nothing in it is used before it is checked: a field of
the wrong type, out of range or missing is an InputError naming the manifest and the field (never
a TypeError deep in a reader), and a shard listed twice is named as such. What the manifest says
about a shard's layout (k, the log-prob dtype) is checked again against the shard's own Parquet
metadata when the shard is read (reader.py): the manifest describes, the shards decide.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from lightopd.errors import InputError

ROLLOUT_FORMAT = "lightopd.rollouts"
TEACHER_FORMAT = "lightopd.teacher"
FORMAT_VERSION = 3  # 2: teacher_log_tail column, vocabulary-only tokenizer fingerprints; 3: metadata column

Check = Callable[[object], bool]


def _int(low: int = 0) -> tuple[Check, str]:
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low), f"an integer >= {low}"


def _number(low: float, high: float, open_low: bool = False) -> tuple[Check, str]:
    def check(v: object) -> bool:
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            return False
        return (v > low if open_low else v >= low) and v <= high
    return check, f"a number in {'(' if open_low else '['}{low}, {high}]"


def _one_of(*values: str) -> tuple[Check, str]:
    return (lambda v: v in values), "one of " + ", ".join(map(repr, values))


def _list_of(check: tuple[Check, str]) -> tuple[Check, str]:
    return (lambda v: isinstance(v, list) and all(check[0](x) for x in v)), f"a list, each item {check[1]}"


STRING: tuple[Check, str] = (lambda v: isinstance(v, str), "a string")
BOOL: tuple[Check, str] = (lambda v: isinstance(v, bool), "true or false")
OBJECT: tuple[Check, str] = (lambda v: isinstance(v, dict), "an object")

COMMON = {
    "format_version": _int(1),
    "store_id": STRING,
    "num_shards": _int(0),
    "complete": BOOL,
    "rows": _int(0),
    "tokens": _int(0),
    "tokenizer": OBJECT,
    "tokenizer.fingerprint": STRING,
    "tokenizer.eos_token_ids": _list_of(_int(0)),
}
SAMPLING = {
    "n": _int(1),
    "temperature": _number(0.0, 1e6),
    "top_p": _number(0.0, 1.0, open_low=True),
    "max_new_tokens": _int(1),
    "seed": _int(-(2 ** 63)),
}
BY_FORMAT = {
    ROLLOUT_FORMAT: {"model": OBJECT, "model.path": STRING, "model.fingerprint": STRING,
                     **{f"sampling.{k}": v for k, v in SAMPLING.items()}},
    TEACHER_FORMAT: {"teacher": OBJECT, "teacher.path": STRING, "teacher.fingerprint": STRING, "rollouts": OBJECT,
                     "rollouts.model": OBJECT, "rollouts.model.path": STRING, "rollouts.model.fingerprint": STRING,
                     **{f"rollouts.sampling.{k}": v for k, v in SAMPLING.items()},
                     "scoring": OBJECT, "scoring.top_k": _int(1), "scoring.temperature": _number(0.0, 1e6, True),
                     "scoring.topk_logprobs_dtype": _one_of("float16", "float32")},
}
SAMPLER = {  # recorded since rows carry policy_logprobs
    "top_k": _int(0),
    "min_p": _number(0.0, 1.0),
    "repetition_penalty": _number(0.0, 1e6, open_low=True),
    "presence_penalty": _number(-2.0, 2.0),
    "frequency_penalty": _number(-2.0, 2.0),
    "stop": _list_of(STRING),
    "policy_logprobs": BOOL,
}
OPTIONAL = {  # checked where present
    "reward.checker": STRING,
    "rollouts.reward.checker": STRING,
    **{f"{where}.{k}": v for where in ("sampling", "rollouts.sampling") for k, v in SAMPLER.items()},
    "scoring.unavailable": _list_of(_one_of("teacher_logprobs", "topk_ids", "topk_logprobs", "teacher_log_tail",
                                            "teacher_entropy")),
    "scoring.vocab_size": _int(1),
    "scoring.topk_order": _one_of("id", "logprob"),
    "scoring.topk_bits": _int(2),
    "scoring.entropy_bits": _int(2),
    "scoring.support_samples": _int(0),
    "scoring.support_seed": _int(0),
    "tokenizer.vocab_size": _int(1),
    "teacher.name": STRING,  # routed teachers (score-teacher --where) are told apart by it
    "rollouts.rows": _int(0),
    "scoring.route.rows": _int(0),
    "scoring.route.rollout_rows": _int(0),
}
SHARD = {"name": STRING, "rows": _int(0), "tokens": _int(0), "bytes": _int(0), "sha256": STRING}


def _get(manifest: dict, dotted: str) -> tuple[bool, object]:
    value: object = manifest
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            return False, None
        value = value[key]
    return True, value


def _refuse(path: Path, what: str) -> InputError:
    return InputError(f"{path}: {what}; the manifest was edited or damaged: re-run the command that wrote the store")


def check_fields(path: Path, manifest: object, shard_re) -> None:
    """InputError naming `path` and the field unless every field a reader uses has its type and range,
    and every shard entry is well formed, of this store's directory (`shard_re`) and listed once."""
    if not isinstance(manifest, dict) or manifest.get("format") not in BY_FORMAT or not isinstance(
            manifest.get("shards"), list):
        raise InputError(f"{path}: not a lightopd manifest (no 'format' of a lightopd store, or no 'shards' list)")
    # an older store's fields are its version's: check_version refuses it with a message of its own
    fields = {**COMMON, **BY_FORMAT[manifest["format"]]} if manifest.get("format_version") == FORMAT_VERSION else {}
    for dotted, (check, expected) in {**fields, **(OPTIONAL if fields else {})}.items():
        present, value = _get(manifest, dotted)
        if not present and dotted in OPTIONAL:
            continue
        if not present:
            raise _refuse(path, f"field {dotted!r} is missing")
        if not check(value):
            raise _refuse(path, f"field {dotted!r} is {value!r}, expected {expected}")
    vocab = manifest.get("tokenizer", {}).get("vocab_size") if fields else None
    if vocab is not None:  # the special ids must be ids of the vocabulary
        tokenizer = manifest["tokenizer"]
        specials = (("eos_token_ids", tokenizer["eos_token_ids"]), ("pad_token_id", [tokenizer.get("pad_token_id")]))
        for key, ids in specials:
            bad = [i for i in ids if i is not None and not (isinstance(i, int) and 0 <= i < vocab)]
            if bad:
                raise _refuse(path, f"field 'tokenizer.{key}' holds {bad[0]!r}, outside the vocabulary of {vocab} ids")
    seen: set[str] = set()
    for i, entry in enumerate(manifest["shards"]):
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not shard_re.match(name):
            raise InputError(f"{path}: shard entry {i} names {name!r}, which is not a shard of this store "
                             "(part-NNNNN.parquet); a manifest never points outside its directory")
        for key, (check, expected) in SHARD.items():
            if not check(entry.get(key)):
                raise _refuse(path, f"shard entry {i} ({name}) has no valid {key!r} ({expected})")
        if name in seen:
            raise _refuse(path, f"it lists shard {name} twice")
        seen.add(name)
