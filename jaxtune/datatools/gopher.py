"""Gopher's repetition and quality rules (Rae et al. 2021, Table A1), run by datatrove's filters.

datatrove (Hugging Face's web-data pipeline) implements both rule sets with the published thresholds
as its defaults, so they are used as they are rather than re-written:
- repetition: duplicate lines > 0.30 and duplicate paragraphs > 0.30 of their count, duplicate lines
  > 0.20 and paragraphs > 0.20 of the characters, the most frequent 2/3/4-gram covering > 0.20/0.18/0.16
  of the characters, duplicated 5..10-grams covering > 0.15, 0.14, 0.13, 0.12, 0.11, 0.10;
- quality: 50 to 100,000 words, mean word length 3 to 10 characters, '#' or ellipsis to word ratio
  > 0.1, > 90% of lines starting with a bullet, > 30% ending with an ellipsis, < 80% of words with
  a letter, fewer than 2 of the stop words (the, be, to, of, and, that, have, with).
Overrides are datatrove's own parameter names (e.g. min_doc_words=5 for short instruction data).

datatrove tokenises English words with spaCy; a regex tokenizer (words, and runs of punctuation as
their own tokens, as spaCy splits them) stands in so that spaCy is not needed.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping, Sequence
from typing import Any

from jaxtune.errors import UserError

RULE_SETS = ("repetition", "quality")
_TOKEN = re.compile(r"\w+|[^\w\s]+")
_SENTENCE = re.compile(r"[^.!?]+[.!?]*")


def _filter_class(rule_set: str):
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter

    return {"repetition": GopherRepetitionFilter, "quality": GopherQualityFilter}[rule_set]


def parameters(rule_set: str) -> dict[str, Any]:
    """The overridable thresholds of a rule set with their published defaults."""
    signature = inspect.signature(_filter_class(rule_set).__init__)
    return {name: p.default for name, p in signature.parameters.items()
            if name not in ("self", "exclusion_writer", "language")}


def _tokenizer():
    from datatrove.utils.word_tokenizers import WordTokenizer

    class RegexWordTokenizer(WordTokenizer):
        def word_tokenize(self, text: str) -> list[str]:
            return _TOKEN.findall(text)

        def sent_tokenize(self, text: str) -> list[str]:
            return [s.strip() for s in _SENTENCE.findall(text) if s.strip()]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [m.span() for m in _SENTENCE.finditer(text) if m.group().strip()]

    return RegexWordTokenizer("en")


class GopherRules:
    """The selected rule sets, each a datatrove filter; `reason(text)` names the first rule broken."""

    def __init__(self, rule_sets: Sequence[str], overrides: Mapping[str, Any] = (), where: str = "filters"):
        overrides = dict(overrides)
        self.filters = []
        used = set()
        for rule_set in rule_sets:
            if rule_set not in RULE_SETS:
                raise UserError(f"{where}: unknown Gopher rule set {rule_set!r} (known: {', '.join(RULE_SETS)})")
            known = parameters(rule_set)
            mine = {k: v for k, v in overrides.items() if k in known}
            used |= set(mine)
            self.filters.append((rule_set, _filter_class(rule_set)(**mine, language=_tokenizer())))
        unknown = sorted(set(overrides) - used)
        if unknown:
            names = sorted(k for r in rule_sets if r in RULE_SETS for k in parameters(r))
            raise UserError(f"{where}: {', '.join(unknown)} is not a threshold of the Gopher rule sets "
                            f"{'/'.join(rule_sets) or '(none given)'} (thresholds: {', '.join(names)})")

    def reason(self, text: str) -> str | None:
        from datatrove.data import Document

        document = Document(text=text, id="")
        for rule_set, f in self.filters:
            verdict = f.filter(document)
            if verdict is not True and verdict is not None:
                detail = verdict[1] if isinstance(verdict, tuple) else "failed"
                return f"gopher_{rule_set}.{detail}"
        return None


def parse_override(text: str, where: str = "--gopher") -> tuple[str, Any]:
    """KEY=VALUE with a Python literal value (numbers, None, tuples such as ((2, 0.2), (3, 0.18)))."""
    import ast

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"{where} {text!r}: expected KEY=VALUE, e.g. min_doc_words=5")
    try:
        return key.strip(), ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        raise UserError(f"{where} {text!r}: the value is not a number, None or a tuple") from None
