"""Answer checkers: pull the final answer out of a completion and compare it with the reference.

- `exact`: the completion, stripped and with runs of white space folded, equals the answer.
- `math`: the answer is the content of the last `\\boxed{...}` (nested braces allowed), else
  what follows the last `#### `, else what follows the last `Answer:`, else the last number
  in the text; numbers compare by value (thousands separators, a leading `+`,
  trailing zeros and simple fractions `a/b` are understood), anything else as text without
  spaces and `$`, then symbolically with math-verify if it is installed (the `math` extra).
- `auto`: `math` when the reference answer is a number or the completion has a `\\boxed{}`,
  else `exact`.
"""

from __future__ import annotations

import re
from fractions import Fraction

CHECKERS = ("auto", "exact", "math")
_HASHES = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER = re.compile(r"(?i)\banswer\s*:[ \t]*([^\n]*)")
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")


def _fold(text: str) -> str:
    return " ".join(text.split())


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, with nested braces, or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed{") - 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1: j]
    return None  # unbalanced


def as_number(text: str) -> Fraction | None:
    s = text.strip().strip("$").replace(" ", "")
    if not _NUMBER.fullmatch(s):
        return None
    s = s.replace(",", "").lstrip("+")
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def extract(text: str, checker: str) -> str | None:
    """The answer a completion gives under `checker` (None if it gives none)."""
    if checker == "exact":
        folded = _fold(text)
        return folded or None
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    for marker in (_HASHES, _ANSWER):  # "#### 42" (GSM8K's convention), then "Answer: 42"
        found = marker.findall(text)
        if found and found[-1].strip().rstrip("."):
            return found[-1].strip().rstrip(".").strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def same(given: str | None, reference: str, checker: str) -> bool:
    if given is None:
        return False
    if checker == "exact":
        return given == _fold(reference)
    a, b = as_number(given), as_number(reference)
    if a is not None and b is not None:
        return a == b
    norm = lambda s: s.replace(" ", "").strip("$")  # noqa: E731
    if norm(given) == norm(reference):
        return True
    return symbolic_equal(given, reference)


def symbolic_equal(given: str, reference: str) -> bool:
    """LaTeX expressions compared symbolically (`\\frac{2}{4}` = `0.5`, `x+1` = `1+x`) with the
    math-verify package when it is installed (`pip install 'lightopd[math]'`); False without it."""
    try:
        from math_verify import parse, verify
    except ImportError:
        return False
    try:
        return bool(verify(parse(f"${reference}$"), parse(f"${given}$")))
    except Exception:  # an unparsable expression is simply not equal
        return False


def resolve(checker: str, reference: str, text: str) -> str:
    if checker != "auto":
        return checker
    return "math" if as_number(reference) is not None or "\\boxed{" in text else "exact"


def check(text: str, reference: str, checker: str = "auto") -> tuple[bool, str | None]:
    """(correct, extracted answer) for one completion."""
    kind = resolve(checker, reference, text)
    given = extract(text, kind)
    return same(given, reference, kind), given
