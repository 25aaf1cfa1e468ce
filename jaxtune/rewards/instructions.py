"""Verifiable instruction constraints (IFEval, Zhou et al. 2023), read from the record.

A record carries its constraints in a ``constraints`` field: a list of dicts (or one dict), each
``{"type": <checker>, ...arguments}``. A type is one of IFEval's 25 instruction ids with IFEval's
own kwargs (``{"type": "keywords:frequency", "keyword": "data", "relation": "at least",
"frequency": 2}``), or one of jaxtune's short names below. Both are scored by the one
implementation of IFEval's checkers, `jaxtune.rewards.ifeval_checkers` (Google's reference
behaviour: regex keyword search, punkt sentences, NLTK capital words, langdetect for case rules),
so a GRPO reward, `jaxtune eval` and the data tools give the same verdicts as IFEval's scorer.
The reward of a completion is the fraction of its constraints it satisfies (``instruction_all``:
1.0 only when every one holds). A blank completion satisfies nothing.

Short names (relation: ``at least``, ``at most`` or ``exactly``; IFEval ids use IFEval's
``less than``/``at least``):

==================  ==========================  =============================================
type                arguments                   holds when (IFEval checker it shares)
==================  ==========================  =============================================
lowercase           -                           ``str.islower`` (english_lowercase without langdetect)
uppercase           -                           ``str.isupper`` (english_capital without langdetect)
no_commas           -                           no ASCII comma (no_comma)
word_count          relation, n                 ``\\w+`` runs (number_words)
sentence_count      relation, n                 punkt sentences (number_sentences)
include_keywords    keywords (list)             each keyword is found, any case (existence)
forbidden_words     words (list)                none is found between ``\\b`` boundaries
keyword_frequency   keyword, relation, n        case-insensitive matches (frequency)
json_format         -                           JSON, ``` fences allowed (json_format)
bullet_count        n                           exactly n ``*``/``-`` lines (number_bullet_lists)
starts_with         phrase                      stripped text starts with it, any case (repeat_prompt)
ends_with           phrase                      ... ends with it, quotes stripped (end_checker)
quoted              -                           wrapped in double quotes (quotation)
paragraph_count     n                           exactly n parts split by ``***`` (number_paragraphs)
letter_frequency    letter, relation, n         the character, any case (letter_frequency)
capital_word_count  relation, n                 all-capital NLTK words (capital_word_frequency)
placeholder_count   relation, n                 ``[placeholders]`` (number_placeholders)
highlight_count     relation, n                 ``*spans*``/``**spans**`` (number_highlighted_sections)
section_count       splitter, relation, n       ``<splitter> <number>`` sections (multiple_sections)
title               -                           a ``<<title>>`` (title)
postscript          marker                      a line starting with the marker (postscript)
contains_any        phrases (list)              one phrase occurs verbatim (constrained_response)
two_responses       -                           two different parts split by ``******``
paragraph_first_word  n, nth, word              n blank-line paragraphs, the nth starting with word
==================  ==========================  =============================================
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from jaxtune.errors import UserError
from jaxtune.rewards import ifeval_checkers as ifc

RELATIONS = ("at least", "at most", "exactly")


def compare(value: int, relation: str, n: int) -> bool:
    if relation == "at least":
        return value >= n
    if relation == "at most":
        return value <= n
    return value == n


def _first_word(t: str, a: Mapping[str, Any]) -> bool:
    return ifc.nth_paragraph_first_word(t, {"num_paragraphs": a["n"], "nth_paragraph": a["nth"], "first_word": a["word"]})


# short type -> (required argument names, check(text, args) -> bool), each on ifeval_checkers' measures
SHORT_CHECKERS: dict[str, tuple[tuple[str, ...], Callable[[str, Mapping[str, Any]], bool]]] = {
    # case only: the test IFEval's english_* checkers make before langdetect, which cannot read a
    # few listed words (the built-in verifiable tasks); use the IFEval ids for IFEval's rule
    "lowercase": ((), lambda t, a: t.islower()),
    "uppercase": ((), lambda t, a: t.isupper()),
    "no_commas": ((), lambda t, a: "," not in t),
    "word_count": (("relation", "n"), lambda t, a: compare(ifc.count_words(t), a["relation"], a["n"])),
    "sentence_count": (("relation", "n"), lambda t, a: compare(len(ifc.sentences(t)), a["relation"], a["n"])),
    "include_keywords": (("keywords",), lambda t, a: all(ifc.keyword_count(t, k) for k in a["keywords"])),
    "forbidden_words": (("words",), lambda t, a: not any(ifc.has_word(t, w) for w in a["words"])),
    "keyword_frequency": (("keyword", "relation", "n"),
                          lambda t, a: compare(ifc.keyword_count(t, a["keyword"].strip()), a["relation"], a["n"])),
    "json_format": ((), lambda t, a: ifc.is_json(t)),
    "bullet_count": (("n",), lambda t, a: ifc.bullets(t) == a["n"]),
    "starts_with": (("phrase",), lambda t, a: ifc.starts_with(t, a["phrase"])),
    "ends_with": (("phrase",), lambda t, a: ifc.ends_with(t, a["phrase"])),
    "quoted": ((), lambda t, a: ifc.quoted(t)),
    "paragraph_count": (("n",), lambda t, a: ifc.paragraphs_by_divider(t) == a["n"]),
    "letter_frequency": (("letter", "relation", "n"), lambda t, a: compare(ifc.letter_count(t, a["letter"]), a["relation"], a["n"])),
    "capital_word_count": (("relation", "n"), lambda t, a: compare(ifc.capital_words(t), a["relation"], a["n"])),
    "placeholder_count": (("relation", "n"), lambda t, a: compare(ifc.placeholders(t), a["relation"], a["n"])),
    "highlight_count": (("relation", "n"), lambda t, a: compare(ifc.highlights(t), a["relation"], a["n"])),
    "section_count": (("splitter", "relation", "n"), lambda t, a: compare(ifc.sections(t, a["splitter"]), a["relation"], a["n"])),
    "title": ((), lambda t, a: ifc.has_title(t)),
    "postscript": (("marker",), lambda t, a: ifc.has_postscript(t, a["marker"])),
    "contains_any": (("phrases",), lambda t, a: any(p in t.strip() for p in a["phrases"])),
    "two_responses": ((), lambda t, a: ifc.two_responses(t)),
    "paragraph_first_word": (("n", "nth", "word"), _first_word),
}
CHECKERS = {**SHORT_CHECKERS, **{k: (tuple(spec), check) for k, (spec, check) in ifc.CHECKERS.items()}}


def check_constraint(constraint: Mapping[str, Any], where: str = "constraint") -> dict[str, Any]:
    """A validated copy of one constraint dict; a UserError names what is wrong."""
    if not isinstance(constraint, Mapping) or "type" not in constraint:
        raise UserError(f"{where}: expected a dict with a 'type' key, got {constraint!r}")
    kind = constraint["type"]
    if kind not in CHECKERS:
        raise UserError(f"{where}: unknown constraint type {kind!r}; expected one of {', '.join(CHECKERS)}")
    if kind in ifc.CHECKERS:
        try:
            return {"type": kind, **ifc.check_arguments(kind, constraint, where)}
        except ValueError as e:
            raise UserError(str(e)) from None
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
        if key in required and key != "phrases" and (problem := ifc.argument_problem("patterns", list(value))):
            raise UserError(f"{where}: {key} must be {problem}")
    for key in ("phrase", "keyword", "splitter", "marker", "word"):
        if key in required and (not isinstance(out[key], str) or not out[key].strip()):
            raise UserError(f"{where}: {key} must be a non-empty string, got {out[key]!r}")
        if key in required and key in ("keyword", "splitter", "marker") and (problem := ifc.argument_problem("pattern", out[key])):
            raise UserError(f"{where}: {key} must be {problem}")
    if "letter" in required and (not isinstance(out["letter"], str) or len(out["letter"].strip()) != 1):
        raise UserError(f"{where}: letter must be one character, got {out['letter']!r}")
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
    return [bool(CHECKERS[c["type"]][1](text, c)) for c in constraints]  # ifc.follows' rule for IFEval ids


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


def _scores(completions, constraints, ids, kwargs, reduce) -> list[float | None]:
    """Per record: `reduce` of its verdicts, from its ``constraints`` field or IFEval's
    ``instruction_id_list`` + ``kwargs`` (None where it has neither: not applicable)."""
    from jaxtune.data.ifeval import constraints_from_ifeval
    from jaxtune.data.sources import SourceError

    if constraints is None and ids is None:
        raise UserError("reward 'instructions': the records have neither a 'constraints' field nor IFEval's "
                        "'instruction_id_list' + 'kwargs'")
    n = len(completions)
    constraints, ids, kwargs = (list(v) if v is not None else [None] * n for v in (constraints, ids, kwargs))
    out = []
    for i, text in enumerate(completions):
        where = f"record {i}"
        try:
            if constraints[i] is not None:
                value = as_constraints(constraints[i], f"{where}: field 'constraints'")
            elif ids[i] is not None:
                ifeval_record = {"instruction_id_list": ids[i], "kwargs": kwargs[i]}
                value = as_constraints(constraints_from_ifeval(ifeval_record, where), f"{where}: IFEval instructions")
            else:  # a record without constraints: not applicable
                out.append(None)
                continue
        except SourceError as e:
            raise UserError(str(e)) from None
        out.append(reduce(satisfied(text, value)))
    return out


def instruction_fraction(prompts: Sequence[str], completions: Sequence[str], *, constraints: Sequence[Any] | None = None,
                         instruction_id_list: Sequence[Any] | None = None, kwargs: Sequence[Any] | None = None,
                         **_: Any) -> list[float | None]:
    """The fraction of each record's constraints the completion satisfies (None: no constraints)."""
    return _scores(completions, constraints, instruction_id_list, kwargs, lambda ok: sum(ok) / len(ok))


def instruction_all(prompts: Sequence[str], completions: Sequence[str], *, constraints: Sequence[Any] | None = None,
                    instruction_id_list: Sequence[Any] | None = None, kwargs: Sequence[Any] | None = None,
                    **_: Any) -> list[float | None]:
    """1.0 when the completion satisfies every constraint of its record, else 0.0 (None: no constraints)."""
    return _scores(completions, constraints, instruction_id_list, kwargs, lambda ok: float(all(ok)))
