"""The one text normalisation and word n-gram features that dedup, decontamination and selection share.

Normalisation is Unicode NFKC + casefold; words are maximal runs of Unicode word characters
(`\\w+`: letters, digits, underscore in any script), so punctuation, whitespace and case never make
two texts differ. An n-gram is `n` consecutive words joined by one space; its bytes feed MinHash
(datasketch hashes them with SHA-1, so features are the same in every process and on every run).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from jaxtune.data.formats import MISSING, nested_value
from jaxtune.data.sources import SourceError

_WORD = re.compile(r"\w+")
# Keys that hold markup, not text: the source's location label, a chat message's role.
_NOT_TEXT = ("_where", "_error", "role")


def normalize(text: str) -> str:
    return unicodedata.normalize("NFKC", text).casefold()


def words(text: str) -> list[str]:
    """The normalised word tokens of `text`."""
    return _WORD.findall(normalize(text))


def ngrams(tokens: Sequence[str], n: int) -> list[str]:
    """The word n-grams of `tokens` in order (with repeats); none when there are fewer than n words."""
    return [" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def shingles(tokens: Sequence[str], n: int) -> set[str]:
    """Distinct n-grams for set similarity; a text shorter than n words is one shingle (itself), so
    short records still compare (an empty text has none)."""
    if len(tokens) < n:
        return {" ".join(tokens)} if tokens else set()
    return set(ngrams(tokens, n))


def strings(value: Any) -> Iterator[str]:
    """Every string inside a value (nested lists and dicts, e.g. chat messages' contents), in order."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if key not in _NOT_TEXT:
                yield from strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from strings(item)


def _lookup(record: Mapping[str, Any], path: str) -> Any:
    value = nested_value(record, path)
    if value is MISSING:
        where = record.get("_where", "record")
        available = ", ".join(sorted(k for k in record if k not in _NOT_TEXT)) or "(none)"
        raise SourceError(f"{where}: no field {path!r}; available fields: {available}")
    return value


def text_fields(record: Mapping[str, Any], fields: Sequence[str] = ()) -> list[str]:
    """The texts of a record that the tools compare: the named fields ("a.b.0" reads nested values;
    a list or dict field gives every string in it), or by default every string in the record
    (chat `messages` contents, Self-Instruct `instances`, ...) except labels such as `_where`/`role`."""
    if not fields:
        return list(strings({k: v for k, v in record.items() if k not in _NOT_TEXT}))
    return [text for field in fields for text in strings(_lookup(record, field))]


def record_words(record: Mapping[str, Any], fields: Sequence[str] = ()) -> list[list[str]]:
    """Normalised words per text field (n-grams never span two fields); fields.record_words picks
    the trained-on fields by the record's format instead of every string."""
    return [w for w in (words(t) for t in text_fields(record, fields)) if w]
