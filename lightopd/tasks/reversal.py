"""The second bundled task: reverse a 5-digit number, in the addition task's vocabulary.

A prompt is `58213=`; the answer is `31285` (the digits in reverse order), written straight away
and ended with the end-of-sequence token (the one format, `plain`). The number's first and last
digits are not 0, so the answer is a number with as many digits, which the `auto` checker reads.
A second domain beside addition for the multi-teacher experiment (experiments/teachers.py): the
same tokenizer (tasks/addition.py's characters), so one student can learn both, and a prompt of
either task tells which it is (addition's holds a `+`). Held-out numbers are fixed by a hash (one
in ten), so the train and held-out pools never overlap, whatever the seed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

FORMATS = ("plain",)
SPLITS = ("train", "heldout")


def is_heldout(n: int) -> bool:
    return n * 2654435761 % 4294967296 % 10 == 0


def draw(rng: random.Random, split: str) -> tuple[int]:
    """One number from the split's pool (as a 1-tuple, like addition's pairs)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    while True:
        n = rng.randrange(10_000, 100_000)
        if n % 10 and is_heldout(n) == (split == "heldout"):
            return (n,)


def numbers(count: int, split: str, seed: int) -> list[tuple[int]]:
    """`count` distinct numbers from the split's pool, drawn from `seed`."""
    rng = random.Random(f"reversal:{split}:{seed}")
    chosen: dict[tuple[int], None] = {}
    while len(chosen) < count:
        chosen[draw(rng, split)] = None
    return list(chosen)


def prompt(n: int) -> str:
    return f"{n}="


def solution(n: int, fmt: str = "plain") -> str:
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    return str(n)[::-1]


def prompt_records(count: int, split: str, seed: int, metadata: dict | None = None) -> list[dict]:
    """Prompt-file records (`id`, `prompt`, `answer`, and any `metadata` fields) for rollout and eval."""
    return [{"id": f"rev-{split}-{n}", "prompt": prompt(n), "answer": solution(n), **(metadata or {})}
            for (n,) in numbers(count, split, seed)]


def write_prompts(path: str | Path, count: int, split: str, seed: int, metadata: dict | None = None) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in prompt_records(count, split, seed, metadata)))
    return path
