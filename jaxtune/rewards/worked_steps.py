"""Worked-solution reward: the share of the record's reference working a completion reproduces.

An outcome reward (``math``) pays a right final answer however it was reached. On a task whose
answers fall in a small range, a wrong chain of steps often lands on the right number ("5 - 1 = 7.
7 + 7 = 14. 14 - 5 = 7. #### 7" for 7), and RL then reinforces the wrong steps: measured on the
built-in arithmetic problems, a quarter of the SFT model's rewarded samples were such lucky
answers, and GRPO on the outcome reward alone lowered held-out accuracy. This reward checks the
process against the record's reference ``solution`` instead (a chain of equations
``a op b = c`` ending with ``#### N``, as the built-in problems and GSM8K-style worked answers
write it):

    reward = (k + [k = n and final answer correct]) / (n + 1)

where ``n`` is the number of equations in the reference and ``k`` the number of them the
completion reproduces *in order from the first* (equations compare after removing spaces;
``op`` one of ``+ - * / x ×``). A right answer after a wrong step earns nothing for the answer;
the first wrong step ends the credit. Records without a ``solution`` (or whose solution has no
equation) are not applicable: the reward is None there.

``worked_solution`` is its all-or-nothing form: 1 only when every step and the answer are right.
Partial credit is denser, but with group-relative advantages the least-wrong completion of a
group (first step right, then wrong) gets a positive advantage and its wrong steps are
reinforced; on the built-in problems the binary form trained better (README, RL section).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from jaxtune.rewards.math_answer import MAX_SCAN_CHARS, math_answer

# Numbers start at a number's first digit and are bounded, so a long run of digits costs linear time.
_NUM = r"(?<![\d.])\d{1,15}(?:\.\d{1,15})?(?![\d.]*\d)"
EQUATION_RE = re.compile(rf"({_NUM})\s*([-+*/x×])\s*({_NUM})\s*=\s*({_NUM})")


def equations(text: str) -> list[str]:
    """The ``a op b = c`` equations of a text, in order, spaces removed (``x``/``×`` read as ``*``)."""
    return [f"{a}{'*' if op in 'x×' else op}{b}={c}" for a, op, b, c in EQUATION_RE.findall(text)]


def worked_steps(prompts: Sequence[str], completions: Sequence[str], solution: Sequence[Any] = (),
                 answer: Sequence[Any] = (), **_: Any) -> list[float | None]:
    """The reward above per completion (None where the record has no reference working)."""
    solutions = list(solution) or [None] * len(completions)
    answers = list(answer) or [None] * len(completions)
    finals = math_answer(prompts, completions, answer=answers)
    rewards: list[float | None] = []
    for completion, reference, final in zip(completions, solutions, finals):
        steps = equations(reference) if isinstance(reference, str) else []
        if not steps:
            rewards.append(None)
            continue
        made = equations(completion[:MAX_SCAN_CHARS])
        k = 0
        while k < len(steps) and k < len(made) and made[k] == steps[k]:
            k += 1
        rewards.append((k + float(k == len(steps) and final == 1.0)) / (len(steps) + 1))
    return rewards


def worked_solution(prompts: Sequence[str], completions: Sequence[str], solution: Sequence[Any] = (),
                    answer: Sequence[Any] = (), **_: Any) -> list[float | None]:
    """1.0 when the completion reproduces every step of the reference working and the answer, else 0."""
    return [None if r is None else float(r == 1.0)
            for r in worked_steps(prompts, completions, solution=solution, answer=answer)]
