"""Verifiable instruction constraints in the style of IFEval (Zhou et al. 2023), read from the record.

A record carries its constraints in a ``constraints`` field: a list of dicts (or one dict), each
``{"type": <checker>, ...arguments}``, for example
``[{"type": "lowercase"}, {"type": "word_count", "relation": "at most", "n": 12}]``.
The reward of a completion is the fraction of its constraints it satisfies (``instruction_all``:
1.0 only when every one holds). An empty completion satisfies nothing. Words are runs of
letters/digits (any script), sentences end with ``.``, ``!`` or ``?``.

==================  ==========================  =============================================
type                arguments                   holds when
==================  ==========================  =============================================
lowercase           -                           there is a letter and no uppercase letter
uppercase           -                           there is a letter and no lowercase letter
no_commas           -                           no comma (ASCII, fullwidth or ideographic)
word_count          relation, n                 the number of words is (at least|at most|exactly) n
sentence_count      relation, n                 the number of sentences is ... n
include_keywords    keywords (list)             every keyword appears as a whole word (any case)
forbidden_words     words (list)                none of them appears as a whole word (any case)
keyword_frequency   keyword, relation, n        the keyword appears ... n times as a whole word
json_format         -                           the whole text (``` fences allowed) parses as JSON
bullet_count        n                           exactly n lines start with "* " or "- "
starts_with         phrase                      the stripped text starts with phrase (any case)
ends_with           phrase                      the stripped text ends with phrase (any case)
quoted              -                           the stripped text is wrapped in double quotes
paragraph_count     n                           exactly n non-empty paragraphs split by ``***``
==================  ==========================  =============================================

IFEval instruction types (`jaxtune.data.ifeval` maps IFEval's records onto these and the above;
its ``less than n`` becomes ``at most n - 1``):

====================  ==========================  =============================================
type                  arguments                   holds when
====================  ==========================  =============================================
letter_frequency      letter, relation, n         the letter occurs ... n times (any case)
capital_word_count    relation, n                 ... n words are all capitals (``NASA``; not ``A1``)
placeholder_count     relation, n                 ... n ``[placeholders]`` in square brackets
highlight_count       relation, n                 ... n non-blank ``*spans*`` or ``**spans**`` on a line
section_count         splitter, relation, n       ... n section headers ``<splitter> <number>`` (exact case)
title                 -                           a non-blank ``<<title>>`` on one line
postscript            marker                      the marker occurs (any case; "P. S." counts as "P.S.")
contains_any          phrases (list)              one of the phrases occurs verbatim (exact case)
two_responses         -                           two different non-empty parts split by ``******``
paragraph_first_word  n, nth, word                exactly n paragraphs split by blank lines, the nth
                                                  starting with word (any case, quotes/punctuation cut)
====================  ==========================  =============================================
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from jaxtune.errors import UserError

RELATIONS = ("at least", "at most", "exactly")
_WORD_RE = re.compile(r"\w+", re.UNICODE)
_SENTENCE_END_RE = re.compile(r"[.!?]+")
_BULLET_RE = re.compile(r"^\s*[*-]\s+\S", re.MULTILINE)
_COMMAS = (",", "，", "、")
_FENCE_RE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL | re.IGNORECASE)


def words(text: str) -> list[str]:
    return _WORD_RE.findall(text)


def sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END_RE.split(text) if _WORD_RE.search(s)]


def compare(value: int, relation: str, n: int) -> bool:
    if relation == "at least":
        return value >= n
    if relation == "at most":
        return value <= n
    return value == n


def _count_word(text: str, word: str) -> int:
    return len(re.findall(r"(?<!\w)" + re.escape(word.lower()) + r"(?!\w)", text.lower()))


def _has_letter(text: str) -> bool:
    return any(ch.isalpha() for ch in text)


def _json(text: str) -> bool:
    stripped = text.strip()
    fenced = _FENCE_RE.match(stripped)
    try:
        json.loads(fenced.group(1) if fenced else stripped)
    except (ValueError, RecursionError):
        return False
    return True


_PLACEHOLDER_RE = re.compile(r"\[[^\[\]\n]*\]")
_HIGHLIGHT_RE = re.compile(r"\*\*([^\n*]*)\*\*|\*([^\n*]*)\*")
_TITLE_RE = re.compile(r"<<([^\n<>]+)>>")
_BLANK_LINE_RE = re.compile(r"\n\s*\n")


def _highlights(text: str) -> int:
    return sum(1 for m in _HIGHLIGHT_RE.finditer(text) if (m.group(1) or m.group(2) or "").strip())


def _sections(text: str, splitter: str) -> int:
    return len(re.findall(r"(?<!\w)" + re.escape(splitter) + r"\s?\d+", text))


def _postscript(text: str, marker: str) -> bool:
    spaced = r"\s?".join(re.escape(ch) for ch in marker.lower() if not ch.isspace())
    return re.search(spaced, text.lower()) is not None


def _two_responses(text: str) -> bool:
    parts = text.split("******")
    if any(not p.strip() for p in parts[1:-1]):
        return False
    kept = [p.strip() for p in parts if p.strip()]
    return len(kept) == 2 and kept[0] != kept[1]


def _paragraph_first_word(text: str, a: Mapping[str, Any]) -> bool:
    paragraphs = [p.strip() for p in _BLANK_LINE_RE.split(text) if p.strip()]
    if len(paragraphs) != a["n"] or a["nth"] > len(paragraphs):
        return False
    first = paragraphs[a["nth"] - 1].split()[0].lstrip("'\"")
    return re.split(r"[.,?!'\"]", first, maxsplit=1)[0].lower() == a["word"].strip().lower()


# type -> (required argument names, check(text, args) -> bool)
CHECKERS: dict[str, tuple[tuple[str, ...], Callable[[str, Mapping[str, Any]], bool]]] = {
    "lowercase": ((), lambda t, a: _has_letter(t) and t == t.lower()),
    "uppercase": ((), lambda t, a: _has_letter(t) and t == t.upper()),
    "no_commas": ((), lambda t, a: not any(c in t for c in _COMMAS)),
    "word_count": (("relation", "n"), lambda t, a: compare(len(words(t)), a["relation"], a["n"])),
    "sentence_count": (("relation", "n"), lambda t, a: compare(len(sentences(t)), a["relation"], a["n"])),
    "include_keywords": (("keywords",), lambda t, a: all(_count_word(t, k) > 0 for k in a["keywords"])),
    "forbidden_words": (("words",), lambda t, a: not any(_count_word(t, w) > 0 for w in a["words"])),
    "keyword_frequency": (("keyword", "relation", "n"), lambda t, a: compare(_count_word(t, a["keyword"]), a["relation"], a["n"])),
    "json_format": ((), lambda t, a: _json(t)),
    "bullet_count": (("n",), lambda t, a: len(_BULLET_RE.findall(t)) == a["n"]),
    "starts_with": (("phrase",), lambda t, a: t.strip().lower().startswith(a["phrase"].strip().lower())),
    "ends_with": (("phrase",), lambda t, a: t.strip().lower().endswith(a["phrase"].strip().lower())),
    "quoted": ((), lambda t, a: len(t.strip()) >= 2 and t.strip()[0] == '"' and t.strip()[-1] == '"'),
    "paragraph_count": (("n",), lambda t, a: len([p for p in re.split(r"\s*\*\*\*\s*", t) if p.strip()]) == a["n"]),
    "letter_frequency": (("letter", "relation", "n"), lambda t, a: compare(t.lower().count(a["letter"].lower()), a["relation"], a["n"])),
    "capital_word_count": (("relation", "n"), lambda t, a: compare(sum(w.isupper() and w.isalpha() for w in words(t)), a["relation"], a["n"])),
    "placeholder_count": (("relation", "n"), lambda t, a: compare(len(_PLACEHOLDER_RE.findall(t)), a["relation"], a["n"])),
    "highlight_count": (("relation", "n"), lambda t, a: compare(_highlights(t), a["relation"], a["n"])),
    "section_count": (("splitter", "relation", "n"), lambda t, a: compare(_sections(t, a["splitter"].strip()), a["relation"], a["n"])),
    "title": ((), lambda t, a: any(m.strip() for m in _TITLE_RE.findall(t))),
    "postscript": (("marker",), lambda t, a: _postscript(t, a["marker"])),
    "contains_any": (("phrases",), lambda t, a: any(p in t for p in a["phrases"])),
    "two_responses": ((), lambda t, a: _two_responses(t)),
    "paragraph_first_word": (("n", "nth", "word"), _paragraph_first_word),
}


def check_constraint(constraint: Mapping[str, Any], where: str = "constraint") -> dict[str, Any]:
    """A validated copy of one constraint dict; a UserError names what is wrong."""
    if not isinstance(constraint, Mapping) or "type" not in constraint:
        raise UserError(f"{where}: expected a dict with a 'type' key, got {constraint!r}")
    kind = constraint["type"]
    if kind not in CHECKERS:
        raise UserError(f"{where}: unknown constraint type {kind!r}; expected one of {', '.join(CHECKERS)}")
    required, _ = CHECKERS[kind]
    missing = [k for k in required if k not in constraint]
    if missing:
        raise UserError(f"{where}: constraint {kind!r} needs {', '.join(missing)}")
    out = dict(constraint)
    if "relation" in required and out["relation"] not in RELATIONS:
        raise UserError(f"{where}: relation must be one of {', '.join(RELATIONS)}, got {out['relation']!r}")
    if "n" in required and (isinstance(out["n"], bool) or not isinstance(out["n"], int) or out["n"] < 0):
        raise UserError(f"{where}: n must be a non-negative integer, got {out['n']!r}")
    for key in ("keywords", "words", "phrases"):
        value = out.get(key)
        if key in required and (not isinstance(value, Sequence) or isinstance(value, str)
                                or not all(isinstance(w, str) and w for w in value) or (key == "phrases" and not value)):
            raise UserError(f"{where}: {key} must be a list of non-empty strings, got {value!r}")
    for key in ("phrase", "keyword", "splitter", "marker", "word"):
        if key in required and (not isinstance(out[key], str) or not out[key].strip()):
            raise UserError(f"{where}: {key} must be a non-empty string, got {out[key]!r}")
    if "letter" in required and (not isinstance(out["letter"], str) or len(out["letter"]) != 1 or not out["letter"].isalpha()):
        raise UserError(f"{where}: letter must be one letter, got {out['letter']!r}")
    if "nth" in required and (isinstance(out["nth"], bool) or not isinstance(out["nth"], int) or not 1 <= out["nth"] <= out["n"]):
        raise UserError(f"{where}: nth must be an integer in 1..n ({out['n']}), got {out['nth']!r}")
    return out


def as_constraints(value: Any, where: str = "constraints") -> list[dict[str, Any]]:
    """A record's ``constraints`` field (a dict, a list of dicts, or their JSON text) validated."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise UserError(f"{where}: not valid JSON ({e})") from None
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, Sequence) or not value:
        raise UserError(f"{where}: expected a non-empty list of constraint dicts, got {value!r}")
    return [check_constraint(c, f"{where}[{i}]") for i, c in enumerate(value)]


def satisfied(text: str, constraints: Sequence[Mapping[str, Any]]) -> list[bool]:
    """Per constraint, whether `text` satisfies it (an empty or blank text satisfies none)."""
    if not text.strip():
        return [False] * len(constraints)
    return [bool(CHECKERS[c["type"]][1](text, c)) for c in constraints]


def loose_variants(text: str) -> list[str]:
    """IFEval's loose-evaluation variants of a response (Zhou et al. 2023, `evaluation_lib`): the
    response; it with every ``*`` removed; it without its first line, without its last line, and
    without both (each stripped); and those three with ``*`` removed: eight texts in all."""
    lines = text.split("\n")
    cut = ["\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return [text, text.replace("*", ""), *cut, *(t.replace("*", "") for t in cut)]


def satisfied_loose(text: str, constraints: Sequence[Mapping[str, Any]]) -> list[bool]:
    """Per constraint, whether any of IFEval's loose variants of `text` satisfies it (blank ones never do)."""
    held = [False] * len(constraints)
    for variant in loose_variants(text):
        held = [h or s for h, s in zip(held, satisfied(variant, constraints))]
        if all(held):
            break
    return held


def _scores(completions, constraints, reduce) -> list[float | None]:
    out = []
    for i, (text, value) in enumerate(zip(completions, constraints, strict=True)):
        if value is None:  # a record without constraints: not applicable
            out.append(None)
            continue
        ok = satisfied(text, as_constraints(value, f"record {i}: field 'constraints'"))
        out.append(reduce(ok))
    return out


def instruction_fraction(prompts: Sequence[str], completions: Sequence[str], *, constraints: Sequence[Any],
                         **_: Any) -> list[float | None]:
    """The fraction of each record's constraints the completion satisfies (None: no constraints)."""
    return _scores(completions, constraints, lambda ok: sum(ok) / len(ok))


def instruction_all(prompts: Sequence[str], completions: Sequence[str], *, constraints: Sequence[Any],
                    **_: Any) -> list[float | None]:
    """1.0 when the completion satisfies every constraint of its record, else 0.0 (None: no constraints)."""
    return _scores(completions, constraints, lambda ok: float(all(ok)))
