"""The math-answer reward: extraction, normalisation, adversarial completions."""

import sys
import time
import types

import pytest

from jaxtune.rewards.math_answer import answers_match, extract_answer, math_answer, normalise


@pytest.mark.parametrize("text, expected", [
    ("So she has 3 + 4 = 7 apples. #### 7", "7"),
    ("the total is \\boxed{\\frac{3}{4}}.", "\\frac{3}{4}"),
    ("\\boxed{5} ... on reflection \\boxed{6}", "6"),  # several answers: the last one counts
    ("The answer is 12, because 3 times 4 is twelve and 99 is not.", "12"),  # "answer is" beats the last number
    ("2 + 2 = 4", "4"),
    ("no number here", None),
    ("", None),
    ("\\boxed{unbalanced", None),
    ("It costs 1,234.50 dollars", "1,234.50"),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("a, b", [
    ("1,000", "1000"), ("5.0", "5"), ("5.50", "11/2"), ("\\frac{3}{4}", "0.75"), ("+7", "7"), ("−3", "-3"),
    ("$12", "12"), ("50%", "50"), ("\\(42\\)", "42"), ("x + 1", "x+1"), ("-0.5", "-1/2"),
])
def test_normalise_equal(a, b):
    assert normalise(a) == normalise(b)


@pytest.mark.parametrize("a, b", [("7", "-7"), ("1/2", "1/3"), ("100", "10"), ("3/0", "3")])
def test_normalise_different(a, b):
    assert normalise(a) != normalise(b)


def test_reward_against_adversarial_completions():
    completions = [
        "",  # empty
        "7 " * 50_000 + "#### 8",  # huge, right answer at the end
        "#### 7",  # the right answer
        "The answer is 7. Wait, no: #### 9",  # several answers, the last is wrong
        "#### 9\n...so 7",  # wrong final marker, right number in the wrong place
        "答案是 ７",  # unicode: a fullwidth digit is a digit
        "答案是七",  # unicode: a number word is not
        "7/1",  # a fraction equal to the answer
        "\\boxed{7.000}",
    ]
    answers = ["7", "8", "7", "7", "7", "7", "7", "7", "7"]
    start = time.perf_counter()
    rewards = math_answer(["q"] * len(completions), completions, answer=answers)
    assert time.perf_counter() - start < 2.0  # huge outputs are scanned only at their end
    assert rewards == [0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0]


def test_gsm8k_style_reference_is_reduced_to_its_final_number():
    assert answers_match("72", "Natalia sold 48/2 = 24 clips in May.\n#### 72")
    assert not answers_match("24", "Natalia sold 48/2 = 24 clips in May.\n#### 72")


def test_math_verify_is_a_fallback_when_installed(monkeypatch):
    calls = []
    fake = types.SimpleNamespace(parse=lambda s: s, verify=lambda gold, pred: calls.append((gold, pred)) or True)
    monkeypatch.setitem(sys.modules, "math_verify", fake)
    assert answers_match("\\sqrt{4}", "2")  # our normaliser says no, math-verify says yes
    assert calls == [("$2$", "$\\sqrt{4}$")]
    assert answers_match("2", "2") and len(calls) == 1  # equal as normalised: no second opinion
    monkeypatch.setitem(sys.modules, "math_verify", None)  # not installed
    assert not answers_match("\\sqrt{4}", "2")
