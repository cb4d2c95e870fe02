"""Answer checkers: the final answer of a completion, and of a reference, compared.

Answers are extracted the way tasks mark them, from the completion and from the reference alike
(a GSM8K reference ends in `#### 72`, a MATH solution in `\\boxed{...}`):
- `<answer>...</answer>`: the content of the last such tag (a `\\boxed{}` inside it is opened too);
- `\\boxed{...}`: the content of the last one (nested braces allowed);
- `#### x` (GSM8K's convention), then `Answer: x`: the rest of the last such line;
- a completion without any of these: its last number (the math checker).
Numbers are read only as whole tokens: `w4` and `x2` hold none, `.5` is 0.5, `1e3` is 1000,
`1,234` is 1234, `−5` (a Unicode minus) is -5, `3/4` is 0.75. Checkers:
- `exact`: the extracted answer (the tag's content, else the whole completion), stripped and with
  runs of white space folded, equals the reference's.
- `math`: numbers compare by value (a marked answer with words around one number, `72 apples`,
  counts as that number; with two, as neither); anything else (LaTeX such as `\\frac{1}{2}`) as
  text without spaces and `$`, then symbolically with math-verify when installed (`math` extra).
- `auto`: `math` when the reference's answer is a number or either side has a `\\boxed{}`, else `exact`.
"""

from __future__ import annotations

import re
from fractions import Fraction

CHECKERS = ("auto", "exact", "math")
_TAG = re.compile(r"<answer>(.*?)</answer>", re.S | re.I)
_HASHES = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER = re.compile(r"(?i)\banswer\s*:[ \t]*([^\n]*)")
_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?(?:/\d+)?"
                     r"(?![\w]|\.\d)")
_MINUS = str.maketrans({"\u2212": "-", "\u2013": "-"})  # the minus sign and the en dash used as one


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


def numbers(text: str) -> list[str]:
    """The whole-token numbers of a text, in order."""
    return _NUMBER.findall(text.translate(_MINUS))


def as_number(text: str) -> Fraction | None:
    """The value of a text that is one number and nothing else (a `$` or a final `.` aside)."""
    s = text.translate(_MINUS).strip().replace("\\$", "").strip("$").strip().rstrip(".").replace(" ", "")
    if not _NUMBER.fullmatch(s):
        return None
    s = s.replace(",", "").lstrip("+")
    try:
        if "/" in s:
            top, bottom = s.split("/")
            return Fraction(Fraction(top), Fraction(bottom))
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def marked(text: str) -> str | None:
    """The answer a text marks with a tag, a box, `#### ` or `Answer:`, or None."""
    tags = _TAG.findall(text)
    if tags:
        inner = tags[-1].strip()
        boxed = last_boxed(inner)
        return inner if boxed is None else boxed.strip()
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    for marker in (_HASHES, _ANSWER):
        found = marker.findall(text)
        if found and found[-1].strip().rstrip("."):
            return found[-1].strip().rstrip(".").strip()
    return None


def reference_answer(reference: str) -> str:
    """The answer a reference gives: what it marks, else all of it."""
    found = marked(reference)
    return (found if found is not None else reference).strip()


def extract(text: str, checker: str) -> str | None:
    """The answer a completion gives under `checker` (None if it gives none)."""
    if checker == "exact":
        tags = _TAG.findall(text)
        folded = _fold(tags[-1] if tags else text)
        return folded or None
    found = marked(text)
    if found is not None:
        return found
    found = numbers(text)
    return found[-1] if found else None


def same(given: str | None, reference: str, checker: str) -> bool:
    """Whether an extracted answer equals the reference's answer `reference` under `checker`."""
    if given is None:
        return False
    if checker == "exact":
        return given == _fold(reference)
    b = as_number(reference)
    if b is not None:
        a = as_number(given)
        inside = numbers(given)
        if a is None and len(inside) == 1 and "\\" not in given:  # words around one number: "72 apples"
            a = as_number(inside[0])
        if a is not None:
            return a == b
    norm = lambda s: s.replace(" ", "").replace("\\$", "").strip("$")  # noqa: E731
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
    boxed = "\\boxed{" in text or "\\boxed{" in reference
    return "math" if boxed or as_number(reference_answer(reference)) is not None else "exact"


def check(text: str, reference: str, checker: str = "auto") -> tuple[bool, str | None]:
    """(correct, extracted answer) for one completion."""
    kind = resolve(checker, reference, text)
    given = extract(text, kind)
    return same(given, reference_answer(reference), kind), given
