"""Answer checkers on tricky cases: markers on both sides, numbers as whole tokens, tags, user checkers."""

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
    # numbers are whole tokens
    ("w4", "4", False),                                                        # a word holding a digit
    ("it is x2", "2", False),
    ("it is .5", "0.5", True),                                                 # a leading point
    ("it is .5", "5", False),
    ("it is 1e3", "1000", True),                                               # scientific notation
    ("it is 1e3", "3", False),
    ("it is \u22125", "-5", True),                                             # a Unicode minus
    ("it is \u22125", "5", False),
    ("version 1.2.3", "3", False),
    ("it costs $18.", "18", True),
    ("<answer>12</answer> and later 13", "12", True),                          # the tag beats the last number
    ("<answer>\\boxed{7}</answer>", "7", True),
    ("Answer: 72 apples", "72", True),                                         # words around one number
])
def test_math_and_auto(text, reference, expected):
    assert check(text, reference, "math")[0] is expected
    assert check(text, reference, "auto")[0] is expected


def test_exact_folds_white_space_only():
    assert check("  w4   w5 ", "w4 w5", "exact") == (True, "w4 w5")
    assert check("W4", "w4", "exact")[0] is False
    assert check("", "w4", "exact") == (False, None)
    assert check("w4", "w4", "auto")[0] is True  # a non-numeric reference: exact


@pytest.mark.parametrize("completion", ["so it is 72", "3 + 4\n#### 72", "the total is \\boxed{72}",
                                        "<answer>72</answer>", "Answer: $72", "it makes 72."])
@pytest.mark.parametrize("reference", ["Natalia sold 48/2 = 24 clips.\n48 + 24 = 72\n#### 72", "72",
                                       "so \\boxed{72}", "<answer>72</answer>"])
def test_references_are_read_like_completions(completion, reference):
    """A GSM8K rationale ending in `#### 72`, a MATH solution's box, a tag: the reference's answer is 72."""
    assert check(completion, reference, "auto") == (True, check(completion, reference, "math")[1])
    assert check(completion.replace("72", "73"), reference, "auto")[0] is False


def test_a_tagged_answer_that_is_not_a_number_is_matched_exactly():
    assert check("I think <answer>True</answer>", "True") == (True, "True")
    assert check("I think <answer> True </answer>", "<answer>True</answer>")[0] is True
    assert check("<answer>False</answer>", "True")[0] is False
    assert check("True, I think", "True")[0] is False  # without a tag the whole text is the answer


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
