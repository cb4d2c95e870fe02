"""Answer checkers on tricky cases."""

import sys

import pytest

from lightopd.tasks.checkers import check, last_boxed


@pytest.mark.parametrize("text,reference,expected", [
    ("so the answer is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}", True),        # nested braces
    ("\\boxed{3} first, then \\boxed{ 4 }", "4", True),                        # the last box wins
    ("the total is 1,234 apples", "1234", True),                               # thousands separator
    ("it is -5", "-5", True),                                                  # sign
    ("it is +5", "5", True),
    ("it is -5", "5", False),
    ("12 then 7.50", "7.5", True),                                             # last number, by value
    ("half: 1/2", "0.5", True),                                                # simple fraction
    ("no numbers here", "3", False),                                           # no answer found
    ("\\boxed{x+1", "x+1", False),                                             # unbalanced box
    ("$\\boxed{2, 3}$", "2,3", True),                                          # text compare without spaces
    ("3 apples and 4 pears\n#### 7", "7", True),                               # GSM8K's #### marker
    ("#### 1,234.", "1234", True),
    ("it was 12 at first\nAnswer: 8", "8", True),                              # Answer: beats the last number
    ("answer: 8 (not 9)", "8", False),                                         # the whole line is the answer
    ("\\boxed{5}\n#### 6", "5", True),                                         # the box comes first
])
def test_math_and_auto(text, reference, expected):
    assert check(text, reference, "math")[0] is expected
    assert check(text, reference, "auto")[0] is expected


def test_exact_folds_white_space_only():
    assert check("  w4   w5 ", "w4 w5", "exact") == (True, "w4 w5")
    assert check("W4", "w4", "exact")[0] is False
    assert check("", "w4", "exact") == (False, None)
    assert check("w4", "w4", "auto")[0] is True  # a non-numeric reference: exact


def test_last_boxed():
    assert last_boxed("a \\boxed{b{c}d} e") == "b{c}d"
    assert last_boxed("nothing") is None


@pytest.mark.parametrize("text,wrong,reference", [
    ("\\boxed{\\frac{2}{4}}", "\\boxed{\\frac{2}{5}}", "\\frac{1}{2}"),
    ("\\boxed{\\sqrt{4}}", "\\boxed{\\sqrt{5}}", "2"),
    ("\\boxed{x+1}", "\\boxed{x+2}", "1+x"),
])
def test_math_compares_symbolically_with_math_verify(text, wrong, reference, monkeypatch):
    pytest.importorskip("math_verify")
    assert check(text, reference, "math")[0] is True
    assert check(wrong, reference, "math")[0] is False
    monkeypatch.setitem(sys.modules, "math_verify", None)  # not installed: text comparison only
    assert check(text, reference, "math")[0] is False
