"""The worked-solution reward: credit for the reference's steps in order, none for a lucky answer."""

import time

import pytest

from jaxtune.rewards import RewardSet
from jaxtune.rewards.worked_steps import equations, worked_solution, worked_steps

SOLUTION = "5 - 1 = 4. 4 + 7 = 11. 11 - 4 = 7. #### 7"  # 3 equations + the answer: quarters


@pytest.mark.parametrize("completion, expected", [
    (" 5 - 1 = 4. 4 + 7 = 11. 11 - 4 = 7. #### 7", 1.0),
    (" 5-1=4.  4 +7= 11. 11 - 4 = 7. #### 7", 1.0),  # spacing does not matter
    (" 5 - 1 = 7. 7 + 7 = 14. 14 - 5 = 7. #### 7", 0.0),  # right answer, wrong working: nothing
    (" 5 - 1 = 4. 4 + 7 = 12. 12 - 4 = 8. #### 8", 0.25),  # the first step, then wrong
    (" 5 - 1 = 4. 4 + 7 = 11. 11 - 4 = 7. #### 8", 0.75),  # every step, wrong final answer
    (" 5 - 1 = 4. 4 + 7 = 11. 11 - 4 = 7.", 0.75 + 0.25),  # no marker: the last number is the answer
    (" 4 + 7 = 11. 5 - 1 = 4. 11 - 4 = 7. #### 7", 0.0),  # steps out of order: the first one is wrong
    ("", 0.0),
    ("#### 7", 0.0),  # the answer alone (in the wrong place) earns nothing
    (" ５ - １ = ４", 0.0),  # full-width digits are not the reference's equations
    (" 5 - 1 = 4. 4 + 7 = 11. 11 - 4 = 7. #### 7 #### 9", 0.75),  # several answers: the last one counts
    (" 5 - 1 = 4. " * 3, 0.25),  # repeating a right step does not earn the next ones
])
def test_worked_steps_against_adversarial_completions(completion, expected):
    assert worked_steps(["p"], [completion], solution=[SOLUTION], answer=["7"]) == [pytest.approx(expected)]


def test_not_applicable_without_reference_working():
    assert worked_steps(["p", "p", "p"], ["1 + 1 = 2", "x", "y"], solution=[None, "#### 4", 17], answer=["2", "4", "5"]) == [
        None, None, None]


def test_huge_completions_are_cheap():
    huge = "5 - 1 = 4. " + "9" * 2_000_000 + " 4 + 7 = 11."
    start = time.perf_counter()
    assert worked_steps(["p"], [huge], solution=[SOLUTION], answer=["7"]) == [0.25]
    assert time.perf_counter() - start < 2.0


def test_equations_and_operators():
    assert equations("48/2 = 24 and 3 x 4=12, 2×5 = 10; 1.5 * 2 = 3.0") == ["48/2=24", "3*4=12", "2*5=10", "1.5*2=3.0"]


def test_by_name_in_a_reward_set_beside_math():
    rewards = RewardSet.from_specs(["math", "worked_steps"], [0.0, 1.0])
    totals, parts = rewards(["p"] * 2, [" 5 - 1 = 7. 7 + 7 = 14. 14 - 5 = 7. #### 7", SOLUTION],
                            {"solution": [SOLUTION] * 2, "answer": ["7"] * 2})
    assert parts == {"math": [1.0, 1.0], "worked_steps": [0.0, 1.0]} and totals == [0.0, 1.0]


def test_worked_solution_is_all_or_nothing():
    completions = [" 5 - 1 = 4. 4 + 7 = 11. 11 - 4 = 7. #### 7", " 5 - 1 = 7. 7 + 7 = 14. 14 - 5 = 7. #### 7",
                   " 5 - 1 = 4. 4 + 7 = 11. 11 - 4 = 7. #### 8", ""]
    assert worked_solution(["p"] * 5, completions + ["x"], solution=[SOLUTION] * 4 + [None], answer=["7"] * 5) == [
        1.0, 0.0, 0.0, 0.0, None]
