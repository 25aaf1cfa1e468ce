"""Training-vs-evaluation n-gram overlap (decontamination), as in GPT-3 and Tulu 3.

Every evaluation example's text fields are cut into word n-grams (ngrams.words: normalised,
13 words by default) and indexed; a training record is contaminated when it shares at least one
of them (`fraction` = 0, the default) or, with `fraction` > 0, when at least that fraction of its
distinct n-grams occur in some evaluation example. N-grams never span two fields, and a text
shorter than n words has none: it can neither contaminate nor be contaminated (the report counts
such evaluation examples, so a too-large n on short answers is visible).

Texts compared are the raw records' fields: every string in the record by default (prompt and
answer, chat contents, options), or the named `fields` / `eval_fields`. The rendered FLAN prompt
is deliberately not used: template words shared by train and eval would match each other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from jaxtune.datatools import ngrams
from jaxtune.datatools.records import KeptSets, RecordSet, record_id
from jaxtune.errors import UserError


@dataclasses.dataclass(frozen=True)
class DecontaminationSettings:
    n: int = 13  # words per n-gram
    fraction: float = 0.0  # 0: one shared n-gram contaminates; > 0: this fraction of the record's n-grams
    fields: tuple[str, ...] = ()  # training fields compared (default: every string in the record)
    eval_fields: tuple[str, ...] = ()  # evaluation fields compared (default: every string)

    def check(self, where: str = "decontamination") -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise UserError(f"{where}: n (words per n-gram) must be an integer >= 1, got {self.n!r}")
        if not 0.0 <= self.fraction <= 1.0:
            raise UserError(f"{where}: fraction must be in [0, 1] (0 = any shared n-gram), got {self.fraction}")


class EvalIndex:
    """Every n-gram of the evaluation sets -> the (set, example id) where it first occurs."""

    def __init__(self, sets: Sequence[RecordSet], settings: DecontaminationSettings):
        self.first: dict[str, tuple[str, str]] = {}
        self.examples = {s.name: len(s.records) for s in sets}
        self.too_short = {s.name: 0 for s in sets}  # examples with no n-gram (every field < n words)
        for s in sets:
            for record in s.records:
                grams = [g for w in ngrams.record_words(record, settings.eval_fields) for g in ngrams.ngrams(w, settings.n)]
                if not grams:
                    self.too_short[s.name] += 1
                for g in grams:
                    self.first.setdefault(g, (s.name, record_id(record)))


@dataclasses.dataclass
class Contaminated:
    set: str
    index: int
    id: str
    ngram: str  # the first shared n-gram, in the record's order
    eval_set: str
    eval_id: str
    shared: int  # distinct n-grams of the record found in the evaluation sets
    total: int  # distinct n-grams of the record
    eval_sets: tuple[str, ...]  # every evaluation set one of its shared n-grams comes from


def contamination(record: dict, index: EvalIndex, settings: DecontaminationSettings) -> tuple | None:
    """(first shared n-gram, its eval (set, id), shared, total, eval sets) when `record` is contaminated."""
    grams = list(dict.fromkeys(g for w in ngrams.record_words(record, settings.fields) for g in ngrams.ngrams(w, settings.n)))
    hits = [g for g in grams if g in index.first]
    if not hits or len(hits) < settings.fraction * len(grams):
        return None
    sets = tuple(dict.fromkeys(index.first[g][0] for g in hits))
    return hits[0], index.first[hits[0]], len(hits), len(grams), sets


@dataclasses.dataclass
class DecontaminationResult(KeptSets):
    sets: list[RecordSet]
    index: EvalIndex
    kept: dict[str, list[int]]
    contaminated: list[Contaminated]
    index_n: int = 13  # n, for the summary line

    def report(self, settings: DecontaminationSettings) -> dict:
        train = {}
        for s in self.sets:
            mine = [c for c in self.contaminated if c.set == s.name]
            train[s.name] = {
                "origin": s.origin, "records": len(s.records), "kept": len(self.kept[s.name]), "contaminated": len(mine),
                "examples": [{"id": c.id, "ngram": c.ngram, "eval_set": c.eval_set, "eval_id": c.eval_id,
                              "shared_ngrams": c.shared, "ngrams": c.total, "eval_sets": list(c.eval_sets)} for c in mine],
            }
        evals = {}
        for name, count in self.index.examples.items():
            hits = [c for c in self.contaminated if name in c.eval_sets]
            evals[name] = {
                "examples": count, "too_short": self.index.too_short[name],
                "training_records_contaminated": len(hits),
                "per_training_set": {s.name: sum(c.set == s.name for c in hits) for s in self.sets},
                "eval_ids_matched": sorted({c.eval_id for c in hits if c.eval_set == name}),
            }
        return {"settings": dataclasses.asdict(settings), "train": train, "eval": evals}

    def summary(self) -> str:
        total = sum(len(s.records) for s in self.sets)
        return (f"decontaminate: {len(self.contaminated)} of {total} training records share a {self.index_n}-gram "
                f"with {len(self.index.examples)} eval set(s) ({sum(self.index.examples.values())} examples); "
                f"kept {total - len(self.contaminated)}")


def decontaminate(train_sets: Sequence[RecordSet], eval_sets: Sequence[RecordSet],
                  settings: DecontaminationSettings = DecontaminationSettings(),
                  index: EvalIndex | None = None) -> DecontaminationResult:
    """Splits each training set into kept and contaminated records (source order kept)."""
    settings.check()
    if not eval_sets and index is None:
        raise UserError("decontaminate: no evaluation sets to compare against (give --eval FILE, --eval_tfds "
                        "NAME:SPLIT, or a --config with eval.tasks / data.eval_path)")
    index = index or EvalIndex(eval_sets, settings)
    kept: dict[str, list[int]] = {}
    found: list[Contaminated] = []
    for s in train_sets:
        kept[s.name] = []
        for i, record in enumerate(s.records):
            hit = contamination(record, index, settings)
            if hit is None:
                kept[s.name].append(i)
            else:
                gram, (eval_set, eval_id), shared, total, sets = hit
                found.append(Contaminated(s.name, i, record_id(record), gram, eval_set, eval_id, shared, total, sets))
    return DecontaminationResult(list(train_sets), index, kept, found, index_n=settings.n)
