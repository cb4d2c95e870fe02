"""The checker eval uses, by its `--checker` name: built in, reasoning-gym's own, or a user's function.

- `auto`, `exact`, `math`: the built-in checkers (checkers.py).
- `reasoning-gym`: the task's own `score_answer` (`pip install 'lightopd[reasoning-gym]'`), given
  the content of the completion's last `<answer>` tag (else the whole completion) and the record
  as reasoning-gym's entry: its prompt, its answer and its `metadata` field (which names the task,
  `source_dataset`). Prompt files from `lightopd prompts reasoning-gym:TASK` carry all three.
  Correct when the score is 1.
- `MODULE:FUNCTION` or `path/to/file.py:FUNCTION`: a function of your own, called once per sample as
  `FUNCTION(completion: str, reference: str | None, metadata: dict)`, where `metadata` holds the
  prompt record's other fields. It returns whether the completion is correct (a bool, or a number
  that counts as correct when it is at least 1), or a pair (that, the answer it read).
A verdict is (correct, the answer read from the completion).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path

from lightopd.errors import InputError
from lightopd.tasks.checkers import CHECKERS, check, marked

Verifier = Callable[[str, "str | None", dict, str], "tuple[bool, str | None]"]  # (text, answer, metadata, prompt)
REASONING_GYM = "reasoning-gym"
NAMES = (*CHECKERS, REASONING_GYM)


def is_checker(name: str) -> bool:
    """Whether `name` is a checker's name, by its form (a function is only imported by `verifier`)."""
    module, _, function = name.rpartition(":")
    return name in NAMES or bool(module and function.isidentifier())


def verifier(name: str) -> Verifier:
    """The checker named `name`, ready to call; InputError if it cannot be had."""
    if name in CHECKERS:
        return lambda text, answer, metadata, prompt: check(text, answer, name)
    if name == REASONING_GYM:
        return _reasoning_gym()
    return _user_function(name)


def _reasoning_gym() -> Verifier:
    try:
        import reasoning_gym
    except ImportError:
        raise InputError("--checker reasoning-gym: needs the reasoning-gym package: "
                         "pip install 'lightopd[reasoning-gym]'") from None
    scorers: dict[str, Callable] = {}

    def verify(text: str, answer: str | None, metadata: dict, prompt: str) -> tuple[bool, str | None]:
        task_metadata = metadata.get("metadata")
        task = task_metadata.get("source_dataset") if isinstance(task_metadata, dict) else None
        if task is None:
            raise InputError("--checker reasoning-gym: the prompt record has no metadata.source_dataset naming its "
                             "task (write prompt files with `lightopd prompts reasoning-gym:TASK`)")
        if task not in scorers:
            try:
                scorers[task] = reasoning_gym.get_score_answer_fn(task)
            except ValueError as e:
                raise InputError(f"--checker reasoning-gym: {e}") from None
        tags = marked(text) if "<answer>" in text.lower() else None
        given = tags if tags is not None else text.strip()
        entry = {"question": prompt, "answer": answer, "metadata": task_metadata}
        return float(scorers[task](given, entry)) >= 1.0, given

    return verify


def _user_function(name: str) -> Verifier:
    where, _, function = name.rpartition(":")
    if not where or not function.isidentifier():
        raise InputError(f"--checker {name}: not a checker ({', '.join(NAMES)}) nor MODULE:FUNCTION")
    try:
        if where.endswith(".py") or os.sep in where:
            path = Path(where)
            if not path.is_file():
                raise InputError(f"--checker {name}: no such file {where}")
            spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:  # `lightopd` is a script: make the working directory importable
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(where)
    except InputError:
        raise
    except Exception as e:  # the user's module failed to import: name it and the error
        raise InputError(f"--checker {name}: cannot import {where} ({type(e).__name__}: {e})") from None
    fn = getattr(module, function, None)
    if not callable(fn):
        raise InputError(f"--checker {name}: {where} has no function {function!r}")

    def verify(text: str, answer: str | None, metadata: dict, prompt: str) -> tuple[bool, str | None]:
        try:
            result = fn(text, answer, metadata)
        except Exception as e:
            raise InputError(f"--checker {name} raised {type(e).__name__}: {e}") from None
        given = None
        if isinstance(result, tuple) and len(result) == 2:
            result, given = result
        if isinstance(result, bool) or isinstance(result, (int, float)):
            return bool(result >= 1) if not isinstance(result, bool) else result, given
        raise InputError(f"--checker {name} returned {result!r}; it must return a bool, a number, or a pair "
                         "(one of those, the answer it read)")

    return verify
