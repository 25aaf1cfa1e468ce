"""Exact and near-duplicate removal within a set and across the sets of a mixture.

Records are visited in a fixed order, the sets in the order given (a config's data.tasks order,
or the command line's) and each set in source order; a record is kept unless it duplicates one
kept before it. So the FIRST occurrence always stays: within a set the earlier line, across a
mixture the task listed first. Two checks, in this order:

- exact: the SHA-1 of the normalised text (ngrams.normalize + word tokens, fields joined), so
  records differing only in case, punctuation or whitespace are exact duplicates;
- near: MinHash (datasketch, `num_perm` permutations from `seed`) of the record's word n-gram
  shingles, looked up in a MinHash-LSH index of the kept records tuned to `threshold` (for recall,
  LSH_WEIGHTS); an LSH
  candidate counts only when its estimated Jaccard similarity is >= `threshold` (the best one,
  the earliest on ties, is reported as the original).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

from jaxtune.datatools import ngrams
from jaxtune.datatools.records import KeptSets, RecordSet, record_id
from jaxtune.errors import UserError


# (false positive, false negative) weights datasketch optimises the LSH bands for: recall first,
# since every candidate's Jaccard estimate is checked anyway. At threshold 0.8 with 128 permutations
# this gives 16 bands of 8 rows: a pair at Jaccard 0.85 is a candidate with probability 0.994
# (the default (0.5, 0.5) gives 9 x 13 and misses 1 in 14 pairs at Jaccard 0.9).
LSH_WEIGHTS = (0.05, 0.95)


@dataclasses.dataclass(frozen=True)
class DedupSettings:
    ngram: int = 5  # words per shingle
    threshold: float = 0.8  # estimated Jaccard similarity at which a record is a near duplicate
    num_perm: int = 128  # MinHash permutations (accuracy of the estimate ~ 1/sqrt(num_perm))
    seed: int = 1  # MinHash permutation seed: the same seed gives the same result on every run
    near: bool = True  # False: exact duplicates only
    fields: tuple[str, ...] = ()  # text fields compared (default: every string in the record)

    def check(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise UserError(f"dedup threshold must be in (0, 1], got {self.threshold}")
        if self.ngram < 1:
            raise UserError(f"dedup n-gram size must be >= 1, got {self.ngram}")
        if self.num_perm < 16:
            raise UserError(f"dedup num_perm must be >= 16 (MinHash permutations), got {self.num_perm}")


@dataclasses.dataclass
class Duplicate:
    set: str
    index: int  # position in its set
    id: str  # the record's file:line
    kind: str  # exact | near
    of_set: str
    of_id: str
    jaccard: float  # 1.0 for exact duplicates; the MinHash estimate for near ones


@dataclasses.dataclass
class DedupResult(KeptSets):
    sets: list[RecordSet]
    kept: dict[str, list[int]]  # per set: indices kept, in order
    removed: list[Duplicate]

    def report(self, settings: DedupSettings) -> dict:
        per_set = {}
        for s in self.sets:
            mine = [d for d in self.removed if d.set == s.name]
            per_set[s.name] = {
                "origin": s.origin, "records": len(s.records), "kept": len(self.kept[s.name]),
                "exact_duplicates": sum(d.kind == "exact" for d in mine),
                "near_duplicates": sum(d.kind == "near" for d in mine),
                "removed": [{"id": d.id, "kind": d.kind, "duplicate_of": d.of_id, "duplicate_of_set": d.of_set,
                             "jaccard": round(d.jaccard, 4)} for d in mine],
            }
        return {"settings": dataclasses.asdict(settings), "sets": per_set}

    def summary(self) -> str:
        total = sum(len(s.records) for s in self.sets)
        exact = sum(d.kind == "exact" for d in self.removed)
        return (f"dedup: {total} records in {len(self.sets)} set(s), removed {exact} exact and "
                f"{len(self.removed) - exact} near duplicates, kept {total - len(self.removed)}")


def exact_key(fields_words: Sequence[Sequence[str]]) -> str:
    return hashlib.sha1("\n".join(" ".join(w) for w in fields_words).encode("utf-8")).hexdigest()


class MinHasher:
    """MinHash signatures of shingle sets with one shared set of permutations (built once)."""

    def __init__(self, num_perm: int, seed: int):
        from datasketch import MinHash

        self._empty = MinHash(num_perm=num_perm, seed=seed)

    def __call__(self, shingles: set[str]):
        m = self._empty.copy()  # shares the permutations instead of drawing them again
        m.update_batch([s.encode("utf-8") for s in sorted(shingles)])
        return m


def record_shingles(fields_words: Sequence[Sequence[str]], n: int) -> set[str]:
    """Union of each field's shingles (never spanning two fields)."""
    out: set[str] = set()
    for w in fields_words:
        out |= ngrams.shingles(w, n)
    return out


def dedup(sets: Sequence[RecordSet], settings: DedupSettings = DedupSettings()) -> DedupResult:
    """Removes exact and near duplicates (see the module docstring for the order and the rules)."""
    settings.check()
    lsh = hasher = None
    if settings.near:
        from datasketch import MinHashLSH

        lsh = MinHashLSH(threshold=settings.threshold, num_perm=settings.num_perm, weights=LSH_WEIGHTS)
        hasher = MinHasher(settings.num_perm, settings.seed)
    seen: dict[str, tuple[str, str]] = {}  # exact key -> (set, id) of the kept record
    signatures: dict[int, tuple] = {}  # LSH key -> (minhash, set, id, order)
    kept: dict[str, list[int]] = {}
    removed: list[Duplicate] = []
    order = 0
    for s in sets:
        kept[s.name] = []
        for index, record in enumerate(s.records):
            fields_words = ngrams.record_words(record, settings.fields)
            key = exact_key(fields_words)
            rid = record_id(record)
            if key in seen:
                removed.append(Duplicate(s.name, index, rid, "exact", *seen[key], 1.0))
                continue
            if lsh is not None:
                shingles = record_shingles(fields_words, settings.ngram)
                if shingles:
                    m = hasher(shingles)
                    best = None
                    for candidate in lsh.query(m):
                        other, other_set, other_id, other_order = signatures[candidate]
                        j = m.jaccard(other)
                        if j >= settings.threshold and (best is None or (j, -other_order) > (best[0], -best[3])):
                            best = (j, other_set, other_id, other_order)
                    if best is not None:
                        removed.append(Duplicate(s.name, index, rid, "near", best[1], best[2], float(best[0])))
                        continue
                    lsh.insert(order, m)
                    signatures[order] = (m, s.name, rid, order)
            seen[key] = (s.name, rid)
            kept[s.name].append(index)
            order += 1
    return DedupResult(list(sets), kept, removed)
