"""Math-answer reward: the completion's final answer against the record's reference answer.

The answer a completion gives is, in order of precedence: the last ``\\boxed{...}`` expression,
the number after the last ``####`` (GSM8K's marker), the number after the last "answer is",
else the last number in the text. Both sides are normalised before comparing: thousands
separators, ``$``/``%``, surrounding ``\\(...\\)``, a leading ``+``, trailing zeros after the
decimal point (``5.0`` = ``5``), fractions (``3/4`` = ``0.75``, ``\\frac{3}{4}``) compare as exact
rationals. When ``math-verify`` is installed it gets a second opinion on answers that differ as
written (symbolic equality, LaTeX sets/intervals); it is optional.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

# A number as people write it: optional sign, digits with optional thousands commas, optional
# decimals, optional /denominator.
_NUMBER = r"[-+−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?|[-+−]?\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
_MARKER_RE = re.compile(r"####\s*(" + _NUMBER + ")")
_ANSWER_IS_RE = re.compile(r"answer\s*(?:is|:|=)\s*\$?\s*(" + _NUMBER + ")", re.IGNORECASE)
_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
# Completions longer than this are scanned only at their end (an answer is at the end; a
# pathological megabyte of digits must not cost seconds of regex time).
MAX_SCAN_CHARS = 20_000


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; None if absent."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    open_at = text.find("{", start)
    if open_at < 0:
        return None
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : i]
    return None  # unbalanced: no answer


def extract_answer(text: str) -> str | None:
    """The final answer a completion gives (see the module docstring), as written; None if none."""
    text = text[-MAX_SCAN_CHARS:]
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    for pattern in (_MARKER_RE, _ANSWER_IS_RE):
        found = pattern.findall(text)
        if found:
            return found[-1]
    numbers = _NUMBER_RE.findall(text)
    return numbers[-1] if numbers else None


def normalise(answer: str) -> str:
    """A canonical string for an answer: exact rationals as ``p/q`` (or an integer), else cleaned text."""
    s = answer.strip().strip(".").strip()
    s = re.sub(r"^\\\(|\\\)$|^\$+|\$+$", "", s).strip()
    s = _FRAC_RE.sub(r"(\1)/(\2)", s)
    s = s.replace("\\!", "").replace("\\,", "").replace("−", "-").replace("%", "").replace("\\%", "")
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s).strip()
    value = to_fraction(s)
    if value is None:
        return re.sub(r"\s+", "", s).lower()
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def to_fraction(s: str) -> Fraction | None:
    """An exact rational for plain numbers and a/b fractions (commas, signs, parentheses allowed)."""
    s = s.replace(",", "").replace(" ", "").replace("$", "")
    m = re.fullmatch(r"\(?([-+]?\d*\.?\d+)\)?(?:/\(?([-+]?\d*\.?\d+)\)?)?", s)
    if not m:
        return None
    try:
        value = Fraction(m.group(1))
        if m.group(2) is not None:
            denominator = Fraction(m.group(2))
            if denominator == 0:
                return None
            value /= denominator
    except (ValueError, ZeroDivisionError):
        return None
    return value


def _math_verify():
    try:
        import math_verify  # optional: pip install "jaxtune[rl]"
    except ImportError:
        return None
    return math_verify


def answers_match(predicted: str | None, reference: Any) -> bool:
    """Whether a predicted answer equals the reference after normalisation (math-verify as a fallback)."""
    if predicted is None:
        return False
    reference = str(reference)
    ref_answer = extract_answer(reference) if "####" in reference or "\\boxed" in reference else reference
    if ref_answer is None:
        return False
    if normalise(predicted) == normalise(ref_answer):
        return True
    verifier = _math_verify()
    if verifier is None:
        return False
    try:
        return bool(verifier.verify(verifier.parse(f"${ref_answer}$"), verifier.parse(f"${predicted}$")))
    except Exception:  # math-verify raises on unparsable input: not a match
        return False


def math_answer(prompts: Sequence[str], completions: Sequence[str], *, answer: Sequence[Any],
                **_: Any) -> list[float | None]:
    """1.0 where the completion's final answer equals the record's ``answer`` field, else 0.0;
    None (not applicable) for records whose ``answer`` is None."""
    return [None if a is None else float(answers_match(extract_answer(c), a))
            for c, a in zip(completions, answer, strict=True)]
