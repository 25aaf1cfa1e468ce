"""IFEval's own record format (google-research `instruction_following_eval/data/input_data.jsonl`).

A record is ``{"key", "prompt", "instruction_id_list": ["punctuation:no_comma", ...], "kwargs": [{...}, ...]}``
(one kwargs dict per instruction; ``{}``, null, or null-valued keys where an instruction takes none,
as in the Hugging Face copy). `constraints_from_ifeval` maps each instruction onto jaxtune's own
checker (`jaxtune.rewards.instructions`, the one implementation RL rewards use too) and returns
the ids it cannot check, which the evaluation counts and reports, never drops silently.

Every IFEval instruction type maps except ``language:response_language`` (it needs a language
detector). IFEval's relations are ``less than`` and ``at least``; ``less than n`` is ``at most n - 1``
(counts are integers). The checkers are jaxtune's, so some edge cases differ from IFEval's code:
keywords match as whole words (IFEval: a case-insensitive regex search, so "cat" also matches
"catalog"), ``english_lowercase``/``english_capital`` run no language detector, a bullet needs a
space after its ``*``/``-``, capital words are letter runs (IFEval: NLTK tokens), and paragraphs
for ``nth_paragraph_first_word`` are counted without empty ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from jaxtune.data.sources import SourceError

IFEVAL_RELATIONS = ("less than", "at least")
CONSTRAINED_RESPONSES = ("My answer is yes.", "My answer is no.", "My answer is maybe.")  # IFEval's fixed options


def _relation(where: str, relation: Any, n: Any) -> dict[str, Any]:
    """IFEval's (relation, threshold) as jaxtune's: `less than n` -> `at most n - 1`."""
    if relation not in IFEVAL_RELATIONS:
        raise SourceError(f"{where}: relation must be one of {', '.join(IFEVAL_RELATIONS)}, got {relation!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < (1 if relation == "less than" else 0):
        raise SourceError(f"{where}: the threshold must be an integer >= {1 if relation == 'less than' else 0} "
                          f"for relation {relation!r}, got {n!r}")
    return {"relation": "at most", "n": n - 1} if relation == "less than" else {"relation": "at least", "n": n}


Builder = Callable[[Mapping[str, Any], str], dict[str, Any]]

# IFEval instruction id -> (its kwargs, the equivalent jaxtune constraint built from them)
SUPPORTED: dict[str, tuple[tuple[str, ...], Builder]] = {
    "punctuation:no_comma": ((), lambda k, w: {"type": "no_commas"}),
    "change_case:english_lowercase": ((), lambda k, w: {"type": "lowercase"}),
    "change_case:english_capital": ((), lambda k, w: {"type": "uppercase"}),
    "length_constraints:number_words": (
        ("relation", "num_words"), lambda k, w: {"type": "word_count", **_relation(w, k["relation"], k["num_words"])}),
    "length_constraints:number_sentences": (
        ("relation", "num_sentences"),
        lambda k, w: {"type": "sentence_count", **_relation(w, k["relation"], k["num_sentences"])}),
    "length_constraints:number_paragraphs": (
        ("num_paragraphs",), lambda k, w: {"type": "paragraph_count", "n": k["num_paragraphs"]}),
    "keywords:existence": (("keywords",), lambda k, w: {"type": "include_keywords", "keywords": k["keywords"]}),
    "keywords:forbidden_words": (
        ("forbidden_words",), lambda k, w: {"type": "forbidden_words", "words": k["forbidden_words"]}),
    "keywords:frequency": (
        ("keyword", "relation", "frequency"),
        lambda k, w: {"type": "keyword_frequency", "keyword": k["keyword"], **_relation(w, k["relation"], k["frequency"])}),
    "detectable_format:json_format": ((), lambda k, w: {"type": "json_format"}),
    "detectable_format:number_bullet_lists": (("num_bullets",), lambda k, w: {"type": "bullet_count", "n": k["num_bullets"]}),
    "startend:end_checker": (("end_phrase",), lambda k, w: {"type": "ends_with", "phrase": k["end_phrase"]}),
    "startend:quotation": ((), lambda k, w: {"type": "quoted"}),
    "combination:repeat_prompt": (("prompt_to_repeat",), lambda k, w: {"type": "starts_with", "phrase": k["prompt_to_repeat"]}),
    "combination:two_responses": ((), lambda k, w: {"type": "two_responses"}),
    "keywords:letter_frequency": (
        ("letter", "let_relation", "let_frequency"),
        lambda k, w: {"type": "letter_frequency", "letter": k["letter"], **_relation(w, k["let_relation"], k["let_frequency"])}),
    "change_case:capital_word_frequency": (
        ("capital_relation", "capital_frequency"),
        lambda k, w: {"type": "capital_word_count", **_relation(w, k["capital_relation"], k["capital_frequency"])}),
    "detectable_content:number_placeholders": (
        ("num_placeholders",), lambda k, w: {"type": "placeholder_count", **_relation(w, "at least", k["num_placeholders"])}),
    "detectable_content:postscript": (("postscript_marker",), lambda k, w: {"type": "postscript", "marker": k["postscript_marker"]}),
    "detectable_format:number_highlighted_sections": (
        ("num_highlights",), lambda k, w: {"type": "highlight_count", **_relation(w, "at least", k["num_highlights"])}),
    "detectable_format:multiple_sections": (
        ("section_spliter", "num_sections"),  # sic: IFEval's spelling
        lambda k, w: {"type": "section_count", "splitter": k["section_spliter"], **_relation(w, "at least", k["num_sections"])}),
    "detectable_format:title": ((), lambda k, w: {"type": "title"}),
    "detectable_format:constrained_response": ((), lambda k, w: {"type": "contains_any", "phrases": list(CONSTRAINED_RESPONSES)}),
    "length_constraints:nth_paragraph_first_word": (
        ("num_paragraphs", "nth_paragraph", "first_word"),
        lambda k, w: {"type": "paragraph_first_word", "n": k["num_paragraphs"], "nth": k["nth_paragraph"], "word": k["first_word"]}),
}


def is_ifeval_record(record: Mapping[str, Any]) -> bool:
    return "instruction_id_list" in record


def constraints_from_ifeval(record: Mapping[str, Any], where: str) -> tuple[list[dict[str, Any]], list[str]]:
    """(jaxtune constraints, IFEval ids with no jaxtune checker) of one IFEval record.

    Raises SourceError (naming `where` and the instruction) for a malformed record: ids not a
    list of strings, kwargs not aligned with them, a missing kwarg or a bad relation/threshold."""
    ids, kwargs = record.get("instruction_id_list"), record.get("kwargs")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise SourceError(f"{where}: field 'instruction_id_list' must be a non-empty list of IFEval instruction ids, "
                          f"got {ids!r}")
    if kwargs is None:
        kwargs = [None] * len(ids)
    if not isinstance(kwargs, list) or len(kwargs) != len(ids):
        raise SourceError(f"{where}: field 'kwargs' must be a list with one entry per instruction "
                          f"({len(ids)}), got {kwargs!r}")
    constraints, unsupported = [], []
    for i, (instruction, args) in enumerate(zip(ids, kwargs)):
        label = f"{where}: instruction {i} ({instruction!r})"
        if args is not None and not isinstance(args, Mapping):
            raise SourceError(f"{label}: kwargs must be an object, got {args!r}")
        args = {k: v for k, v in (args or {}).items() if v is not None}  # the HF copy fills absent kwargs with null
        if instruction not in SUPPORTED:
            unsupported.append(instruction)
            continue
        needed, build = SUPPORTED[instruction]
        missing = [k for k in needed if k not in args]
        if missing:
            raise SourceError(f"{label}: kwargs lack {', '.join(missing)}")
        constraints.append(build(args, label))
    return constraints, unsupported
