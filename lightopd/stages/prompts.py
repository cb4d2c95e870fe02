"""Stage `prompts`: write a prompt file (JSONL) from a reasoning-gym task or another prompt source.

`reasoning-gym:TASK` draws `--n` records from the task's generator with `--seed` and the task's
own settings (`--task-config`, e.g. its difficulty); each keeps the task's own fields,
`question`, `answer` and `metadata` (which names the task, for `eval --checker reasoning-gym`),
plus an `id`. An unknown task name is answered with the list of tasks. Any other source (a file, a Hugging Face dataset)
is read with its field mapping, and each record is written under the names lightopd recognises
(`id`, `prompt` or `messages`, `answer`) with its other fields beside them, so the file needs no
flags later. The file is written whole or not at all, and never over an existing one, as standard
JSON: a number that is not finite (NaN, ±inf), in a task's metadata too, is written as null.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lightopd.config import PromptsConfig
from lightopd.data.fields import RECOGNISED, finite
from lightopd.data.prompts import read_prompts
from lightopd.errors import InputError
from lightopd.specs import SourceSpec

REASONING_GYM = "reasoning-gym:"
RG_DEFAULT_SIZE = 1000


def _reasoning_gym(task: str, n: int, seed: int, config: dict) -> list[dict]:
    try:
        import reasoning_gym
        from reasoning_gym.factory import DATASETS
    except ImportError:
        raise InputError("reasoning-gym: tasks need the reasoning-gym package: "
                         "pip install 'lightopd[reasoning-gym]'") from None
    if task not in DATASETS:
        raise InputError(f"{REASONING_GYM}{task}: no such task; reasoning-gym {reasoning_gym.__version__} offers "
                         f"{len(DATASETS)}: {', '.join(sorted(DATASETS))}")
    try:
        dataset = reasoning_gym.create_dataset(task, size=n, seed=seed, **config)
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        raise InputError(f"{REASONING_GYM}{task}" + (f" with --task-config {json.dumps(config)}" if config else "")
                         + f": {e}") from None
    return [{"id": f"{task}-{i}", "question": entry["question"], "answer": entry["answer"],
             "metadata": entry["metadata"]} for i, entry in enumerate(dataset)]


def task_settings(text: str | None) -> dict:
    """--task-config as a dict ({} without it)."""
    try:
        value = {} if text is None else json.loads(text)
    except ValueError as e:
        raise InputError(f"--task-config: not JSON ({e})") from None
    if not isinstance(value, dict):
        raise InputError(f"--task-config: must be a JSON object, got {text}")
    return value


def mapped(spec: SourceSpec, n: int | None = None) -> list[dict]:
    """The source's (first `n`) records under the names lightopd recognises, other fields beside them."""
    out = []
    first = {name for names in RECOGNISED.values() for name in names[:1]}  # what a re-read recognises first
    for record in read_prompts(spec.open(), spec.mapping(), n):
        other = RECOGNISED["messages" if record.prompt is not None else "prompt"]  # a re-read would see both
        clash = sorted((first | set(other)) & set(record.metadata))
        if clash:
            raise InputError(f"{record.where}: field {clash[0]!r} is kept as metadata here, yet a re-read of the "
                             "file would take it for a prompt, messages, answer or id; name the field that plays "
                             "that role with its --*-field option, or drop it from the source")
        role = {"prompt": record.prompt} if record.prompt is not None else {"messages": list(record.messages)}
        answer = {} if record.answer is None else {"answer": record.answer}
        out.append({"id": record.id, **role, **answer, **record.metadata})
    return out


def write_records(out: Path, records: list[dict]) -> None:
    """`records` as a JSONL file, written whole (through a temporary file) or not at all."""
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "w") as f:
        for record in records:
            f.write(json.dumps(finite(record), ensure_ascii=False, default=str, allow_nan=False) + "\n")
    os.replace(tmp, out)


def run(cfg: PromptsConfig) -> dict:
    out = Path(cfg.out)
    if out.exists():
        raise InputError(f"--out {out}: exists; remove it or choose another file")
    if not out.parent.is_dir():
        raise InputError(f"--out {out}: no such directory {out.parent}")
    spec = cfg.source.source
    if spec.startswith(REASONING_GYM):
        records = _reasoning_gym(spec.removeprefix(REASONING_GYM), cfg.n or RG_DEFAULT_SIZE, cfg.seed,
                                 task_settings(cfg.task_config))
    elif cfg.task_config is not None:
        raise InputError("--task-config: only for a reasoning-gym:TASK source")
    else:
        records = mapped(cfg.source, cfg.n)
    write_records(out, records)
    return {"command": "prompts", "source": spec, "out": str(out), "records": len(records),
            "fields": sorted({k for r in records for k in r})}
