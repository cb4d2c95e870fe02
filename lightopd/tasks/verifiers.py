"""The checker eval uses, by its `--checker` name: built in, reasoning-gym's own, or a user's function.

- `auto`, `exact`, `math`: the built-in checkers (checkers.py).
- `reasoning-gym`: the task's own `score_answer` (`pip install 'lightopd[reasoning-gym]'`), given
  the content of the completion's last `<answer>` tag (else the whole completion) and the record
  as reasoning-gym's entry: its prompt, its answer and its metadata (the task's own fields, kept at
  the top level of the record's metadata, among them `source_dataset`, which names the task).
  Prompt files from `lightopd prompts reasoning-gym:TASK` carry all three.
  Correct when the score is 1.
- `MODULE:FUNCTION` or `path/to/file.py:FUNCTION`: a function of your own, called once per sample as
  `FUNCTION(completion: str, reference: str | None, metadata: dict)`, where `metadata` holds the
  prompt record's other fields. It returns whether the completion is correct (a bool, numpy's
  included, or a real number, a numpy scalar included, that counts as correct when it is at least
  1), or a pair (that, the answer it read, kept as text). It runs in a process of its own, allowed
  a timeout per sample (isolated.py); a NaN or infinite number, or anything else, is refused.
A score is (a number, the answer read from the completion): 1 or 0 for a bool, the number as given
otherwise (reasoning-gym's score, a user's number); a verdict is (correct, the answer read), correct
when the score is at least 1. `open_scorer` gives the scores (rollout's rewards) and `open_verifier`
the verdicts (eval), for as long as it is open (a user's function keeps its process that long).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

from lightopd.errors import InputError
from lightopd.tasks.checkers import CHECKERS, check, marked
from lightopd.tasks.isolated import CheckerProcess

Verifier = Callable[[str, "str | None", dict, str], "tuple[bool, str | None]"]  # (text, answer, metadata, prompt)
Scorer = Callable[[str, "str | None", dict, str], "tuple[float, str | None]"]
REASONING_GYM = "reasoning-gym"
NAMES = (*CHECKERS, REASONING_GYM)


def is_checker(name: str) -> bool:
    """Whether `name` is a checker's name, by its form (a function is only imported by `open_verifier`)."""
    return name in NAMES or is_users(name)


def is_users(name: str) -> bool:
    """Whether `name` names a function of the user's (MODULE:FUNCTION or FILE.py:FUNCTION)."""
    module, _, function = name.rpartition(":")
    return name not in NAMES and bool(module and function.isidentifier())


@contextlib.contextmanager
def open_scorer(name: str, timeout: float) -> Iterator[Scorer]:
    """The checker named `name` as a scorer, ready to call while open; InputError if it cannot be had. A
    user's function is imported and called in its own process, which may take `timeout` seconds a call."""
    if name in CHECKERS:
        def builtin(text, answer, metadata, prompt):
            correct, given = check(text, answer, name)
            return float(correct), given
        yield builtin
    elif name == REASONING_GYM:
        yield _reasoning_gym()
    elif not is_users(name):
        raise InputError(f"--checker {name}: not a checker ({', '.join(NAMES)}) nor MODULE:FUNCTION")
    else:
        with CheckerProcess(name, timeout) as process:
            yield lambda text, answer, metadata, prompt: score(name, process(text, answer, metadata))


@contextlib.contextmanager
def open_verifier(name: str, timeout: float) -> Iterator[Verifier]:
    """The checker named `name` giving verdicts: correct when its score is at least 1 (see open_scorer)."""
    with open_scorer(name, timeout) as scored:
        def verify(text, answer, metadata, prompt):
            value, given = scored(text, answer, metadata, prompt)
            return value >= 1.0, given
        yield verify


def score(name: str, result) -> tuple[float, str | None]:
    """(score, the answer read) from what the user's checker `name` returned, as plain data (numpy's bools
    and numbers arrive as Python's); InputError if it is neither."""
    given = None
    if isinstance(result, tuple) and len(result) == 2:
        result, given = result
    given = given if given is None or isinstance(given, str) else str(given)
    if isinstance(result, bool):
        return float(result), given
    if isinstance(result, (int, float)):
        if not isinstance(result, int) and not math.isfinite(result):
            raise InputError(f"--checker {name} returned {result}; a number it returns must be finite (correct when "
                             "at least 1)")
        return float(result), given
    raise InputError(f"--checker {name} returned {result!r}; it must return a bool, a number, or a pair "
                     "(one of those, the answer it read)")


def _reasoning_gym() -> Verifier:
    try:
        import reasoning_gym
    except ImportError:
        raise InputError("--checker reasoning-gym: needs the reasoning-gym package: "
                         "pip install 'lightopd[reasoning-gym]'") from None
    scorers: dict[str, Callable] = {}

    def scored(text: str, answer: str | None, metadata: dict, prompt: str) -> tuple[float, str | None]:
        nested = metadata.get("metadata")  # a store written before records' metadata objects were flattened
        task_metadata = nested if isinstance(nested, dict) and "source_dataset" in nested else metadata
        task = task_metadata.get("source_dataset")
        if task is None:
            raise InputError("--checker reasoning-gym: the prompt record's metadata has no source_dataset naming its "
                             "task (write prompt files with `lightopd prompts reasoning-gym:TASK`)")
        if task not in scorers:
            try:
                scorers[task] = reasoning_gym.get_score_answer_fn(task)
            except ValueError as e:
                raise InputError(f"--checker reasoning-gym: {e}") from None
        tags = marked(text) if "<answer>" in text.lower() else None
        given = tags if tags is not None else text.strip()
        entry = {"question": prompt, "answer": answer, "metadata": task_metadata}
        return float(scorers[task](given, entry)), given

    return scored
