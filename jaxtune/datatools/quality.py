"""Quality filters for instruction data, and LIMA-style selection of the N most diverse records.

Filters (each off by default; a record failing any is dropped with the first failing rule as reason):
- length: words (ngrams.words) and characters of the record's text, within [min, max] (0 = no bound);
- script: at least `min_script_fraction` of the letters belong to the allowed Unicode `scripts`
  (the first word of a letter's Unicode name: latin, cyrillic, greek, arabic, cjk, hiragana, ...;
  "ascii" = ASCII letters) - a dependency-free charset/language check, not language identification;
- repetition (Gopher's rules, Rae et al. 2021): the fraction of non-empty lines that repeat an earlier
  line, and the fraction of word characters covered by the most frequent word n-gram (counted only
  when it occurs at least twice; Gopher drops documents above 0.30 and 0.20 for 2-grams);
- answer format: named fields must hold non-blank text (`nonempty`), and named fields must match a
  regular expression (`regex`, Python `re.search`);
- Gopher's full repetition and quality rule sets with their published thresholds (gopher.py, run by
  datatrove; `gopher` names the sets, `gopher_overrides` changes thresholds);
- language: fastText lid.176's top language must be one of `languages` with probability at least
  `min_language_score` (langid.py; 0.65 as in datatrove's LanguageFilter).
The text measured is what the record trains on (fields.record_texts), joined by newlines.

`select_diverse` picks N records by greedy farthest-point (k-center) selection on MinHash
signatures of word n-gram shingles, distance = 1 - estimated Jaccard similarity: start from the
record with the most distinct shingles, then repeatedly add the record farthest from everything
chosen (ties: the earliest record). No embeddings, deterministic for a seed; a 2-approximation of the
k-center objective, O(N * N_selected * num_perm) time.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxtune.datatools import fields as fields_lib
from jaxtune.datatools import langid, ngrams
from jaxtune.errors import UserError

_LETTER = re.compile(r"[^\W\d_]")
_ASCII_LETTER = re.compile(r"[A-Za-z]")


@dataclasses.dataclass(frozen=True)
class QualityFilters:
    min_words: int = 0
    max_words: int = 0  # 0 = no upper bound
    min_chars: int = 0
    max_chars: int = 0  # 0 = no upper bound
    scripts: tuple[str, ...] = ()  # allowed scripts of letters, e.g. ("latin",); () = no script check
    min_script_fraction: float = 0.9  # with `scripts`: at least this fraction of letters in them
    max_duplicate_line_fraction: float = 1.0  # 1 = off; Gopher: 0.30
    max_top_ngram_fraction: float = 1.0  # 1 = off; Gopher: 0.20 (2-grams), 0.18 (3), 0.16 (4)
    top_ngram: int = 2  # n of the top n-gram rule
    nonempty: tuple[str, ...] = ()  # fields that must hold non-blank text
    regex: tuple[tuple[str, str], ...] = ()  # (field, pattern) pairs the field's text must match
    gopher: tuple[str, ...] = ()  # Gopher rule sets: repetition, quality (datatrove, published thresholds)
    gopher_overrides: tuple[tuple[str, Any], ...] = ()  # (datatrove parameter, value) pairs
    languages: tuple[str, ...] = ()  # allowed lid.176 languages (ISO 639 codes, e.g. en); () = no check
    min_language_score: float = 0.65  # with `languages`: lid.176 probability of the top language
    fields: tuple[str, ...] = ()  # text measured (default: the trained-on fields by format)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str) -> QualityFilters:
        """From a config mapping (`data.tasks.<t>.filters`); `regex` may be a {field: pattern} mapping."""
        known = [f.name for f in dataclasses.fields(cls)]
        kwargs = {}
        for key, value in values.items():
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
                raise UserError(f"config key '{where}.{key}' is not a filter" + (f"; did you mean '{close[0]}'?" if close else "")
                                + f" (filters: {', '.join(known)})")
            if key in ("regex", "gopher_overrides"):
                value = tuple(value.items()) if hasattr(value, "items") else tuple(tuple(p) for p in value)
            elif key in ("scripts", "nonempty", "fields", "gopher", "languages"):
                value = (value,) if isinstance(value, str) else tuple(value)
            kwargs[key] = value
        filters = cls(**kwargs)
        filters.check(where)
        return filters

    @property
    def active(self) -> bool:
        return self != QualityFilters(fields=self.fields, min_script_fraction=self.min_script_fraction,
                                      top_ngram=self.top_ngram, gopher_overrides=self.gopher_overrides,
                                      min_language_score=self.min_language_score)

    @functools.cached_property
    def _gopher(self):
        from jaxtune.datatools.gopher import GopherRules

        return GopherRules(self.gopher, self.gopher_overrides) if self.gopher else None

    def check(self, where: str = "filters") -> None:
        for key in ("min_words", "max_words", "min_chars", "max_chars"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UserError(f"{where}: {key} must be an integer >= 0 (0 = no bound), got {value!r}")
        for low, high in (("min_words", "max_words"), ("min_chars", "max_chars")):
            if getattr(self, high) and getattr(self, low) > getattr(self, high):
                raise UserError(f"{where}: {low}={getattr(self, low)} is above {high}={getattr(self, high)}")
        for key in ("min_script_fraction", "max_duplicate_line_fraction", "max_top_ngram_fraction",
                    "min_language_score"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise UserError(f"{where}: {key} must be a fraction in [0, 1], got {value!r}")
        if self.top_ngram < 1:
            raise UserError(f"{where}: top_ngram must be >= 1, got {self.top_ngram}")
        if self.gopher_overrides and not self.gopher:
            raise UserError(f"{where}: Gopher thresholds given without a Gopher rule set (gopher: repetition, quality)")
        if self.gopher:
            from jaxtune.datatools.gopher import GopherRules

            GopherRules(self.gopher, self.gopher_overrides, where)  # unknown sets and thresholds fail here
        for field, pattern in self.regex:
            try:
                re.compile(pattern)
            except re.error as e:
                raise UserError(f"{where}: regex for field {field!r} does not compile: {e} ({pattern!r})") from None

    def reason(self, record: Mapping[str, Any]) -> str | None:
        """Why `record` is dropped ("rule: detail", the first rule it fails), or None to keep it."""
        for field in self.nonempty:
            if not "".join(ngrams.text_fields(record, (field,))).strip():
                return f"nonempty: field {field!r} is blank"
        for field, pattern in self.regex:
            if not re.search(pattern, "\n".join(ngrams.text_fields(record, (field,)))):
                return f"regex: field {field!r} does not match {pattern!r}"
        texts, _ = fields_lib.record_texts(record, self.fields)
        text = "\n".join(texts)
        tokens = ngrams.words(text)
        for name, value, low, high in (("words", len(tokens), self.min_words, self.max_words),
                                       ("chars", len(text), self.min_chars, self.max_chars)):
            if value < low or (high and value > high):
                return f"{name}: {value} outside [{low}, {high or 'inf'}]"
        if self.scripts:
            fraction = script_fraction(text, self.scripts)
            if fraction < self.min_script_fraction:
                return f"scripts: {fraction:.2f} of letters in {'/'.join(self.scripts)} (< {self.min_script_fraction})"
        if self.max_duplicate_line_fraction < 1.0:
            fraction = duplicate_line_fraction(texts)
            if fraction > self.max_duplicate_line_fraction:
                return f"duplicate_lines: {fraction:.2f} of lines repeated (> {self.max_duplicate_line_fraction})"
        if self.max_top_ngram_fraction < 1.0:
            fraction = top_ngram_fraction(tokens, self.top_ngram)
            if fraction > self.max_top_ngram_fraction:
                return f"top_ngram: the top {self.top_ngram}-gram covers {fraction:.2f} of characters (> {self.max_top_ngram_fraction})"
        if self.gopher:
            why = self._gopher.reason(text)
            if why is not None:
                return f"{why}: Gopher rule broken"
        if self.languages:
            language, score = langid.identify(text)
            if language not in self.languages or score < self.min_language_score:
                return (f"language: lid.176 says {language or 'none'} ({score:.2f}); expected "
                        f"{'/'.join(self.languages)} with probability >= {self.min_language_score}")
        return None


def script_of(char: str) -> str:
    """The script of a letter: the first word of its Unicode name, lowercased (LATIN SMALL LETTER A -> latin)."""
    name = unicodedata.name(char, "")
    return name.split(" ", 1)[0].lower() if name else "unknown"


def script_fraction(text: str, scripts: Sequence[str]) -> float:
    """Fraction of the letters of `text` in `scripts` ("ascii": ASCII letters); 1.0 when it has no letters."""
    allowed = {s.lower() for s in scripts}
    letters = _LETTER.findall(text)  # \w minus digits and _: letters (and combining marks) of any script
    if not letters:
        return 1.0
    ascii_letters = len(_ASCII_LETTER.findall(text))
    ok = ascii_letters if allowed & {"ascii", "latin"} else 0  # ASCII letters are Latin: counted without lookups
    ok += sum(script_of(c) in allowed for c in letters if not c.isascii())
    return ok / len(letters)


def duplicate_line_fraction(texts: Sequence[str]) -> float:
    """Fraction of non-blank lines (all fields) equal to an earlier line."""
    lines = [line.strip() for t in texts for line in t.splitlines() if line.strip()]
    if not lines:
        return 0.0
    return (len(lines) - len(set(lines))) / len(lines)


def top_ngram_fraction(tokens: Sequence[str], n: int) -> float:
    """Fraction of word characters covered by the most frequent n-gram's occurrences (0 unless it repeats)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    gram, count = max(Counter(grams).items(), key=lambda kv: kv[1])
    if count < 2:
        return 0.0
    return min(1.0, count * sum(map(len, gram)) / sum(map(len, tokens)))


_worker: dict = {}


def _init_worker(filters: QualityFilters) -> None:
    _worker["filters"] = filters


def _verdict(record: dict) -> tuple[str, str | None, tuple[str, ...]]:
    filters = _worker["filters"]
    return str(record.get("_where", "record")), filters.reason(record), fields_lib.record_texts(record, filters.fields)[1]


def filter_stream(records: Iterable[dict], filters: QualityFilters, workers: int = 1
                  ) -> tuple[list[int], list[tuple[int, str, str]], int, dict[str, int]]:
    """Streams records through the filters (in `workers` processes): (passed indices,
    [(dropped index, id, reason)], records read, compared fields -> records)."""
    from jaxtune.datatools.parallel import ordered_map

    passed, dropped = [], []
    tally = fields_lib.FieldTally()
    count = 0
    stream = ordered_map(_verdict, iter(records), workers=workers, initializer=_init_worker, initargs=(filters,))
    for i, (rid, why, used) in enumerate(stream):
        count += 1
        tally.add(used)
        if why is None:
            passed.append(i)
        else:
            dropped.append((i, rid, why))
    return passed, dropped, count, tally.counts


def apply_filters(records: Sequence[dict], filters: QualityFilters) -> tuple[list[int], list[tuple[int, str]]]:
    """(kept indices, [(dropped index, reason)])."""
    passed, dropped, _, _ = filter_stream(records, filters)
    return passed, [(i, why) for i, _, why in dropped]


def signatures(records: Sequence[dict], *, ngram: int = 3, num_perm: int = 64, seed: int = 1,
               fields: Sequence[str] = ()) -> tuple[np.ndarray, np.ndarray]:
    """([N, num_perm] MinHash values of each record's shingles, [N] distinct shingle counts)."""
    from jaxtune.datatools.dedup import MinHasher, record_shingles

    hasher = MinHasher(num_perm, seed)
    rows, sizes = [], []
    for record in records:
        shingles = record_shingles(fields_lib.record_words(record, fields), ngram)
        rows.append(hasher(shingles).hashvalues)
        sizes.append(len(shingles))
    return np.asarray(rows).reshape(len(records), num_perm), np.asarray(sizes)


def select_diverse(records: Sequence[dict], n: int, *, ngram: int = 3, num_perm: int = 64, seed: int = 1,
                   fields: Sequence[str] = ()) -> list[int]:
    """Indices of `n` mutually dissimilar records, in selection order (see the module docstring)."""
    if n < 1:
        raise UserError(f"select N most diverse: N must be >= 1, got {n}")
    if n >= len(records):
        return list(range(len(records)))
    sigs, sizes = signatures(records, ngram=ngram, num_perm=num_perm, seed=seed, fields=fields)
    first = int(np.argmax(sizes))  # argmax: the earliest on ties
    chosen = [first]
    distance = 1.0 - (sigs == sigs[first]).mean(axis=1)
    distance[first] = -1.0
    while len(chosen) < n:
        nxt = int(np.argmax(distance))
        chosen.append(nxt)
        distance = np.minimum(distance, 1.0 - (sigs == sigs[nxt]).mean(axis=1))
        distance[chosen] = -1.0
    return chosen
