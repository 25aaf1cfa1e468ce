"""Exact and near-duplicate removal within a set and across the sets of a mixture, confirmed exactly.

Records are visited in a fixed order, the sets in the order given (a config's data.tasks order,
or the command line's) and each set in source order; a record is kept unless it duplicates one
kept before it. So the FIRST occurrence always stays: within a set the earlier line, across a
mixture the task listed first. Texts compared are those a task trains on (fields.record_texts:
by format, not ids or provenance), or the named `fields`.

- exact: the 128-bit BLAKE2b hash of the normalised text (ngrams.normalize + word tokens, fields
  joined), so records differing only in case, punctuation or whitespace are exact duplicates
  (a chance collision among 10^6 records has probability ~1e-27);
- near: word n-gram shingle sets with Jaccard similarity >= `threshold`. MinHash-LSH (datasketch's
  MinHash, `num_perm` permutations from `seed`; `lsh_bands` picks bands x rows) only proposes
  candidate pairs; every candidate is then CONFIRMED with the exact Jaccard similarity of the two
  shingle sets (as text-dedup's and NeMo Curator's false-positive checks do), so precision is 1.0
  and only recall depends on the hashing (a pair at Jaccard J is a candidate with probability
  1 - (1 - J^rows)^bands: 0.998 at 0.80 with the defaults).

Memory is bounded by design, for sets far larger than RAM: pass 1 streams the records once (in
`workers` processes) and keeps per record only its exact hash and its band keys (8 bytes per band);
candidate pairs come from sorting the band keys; pass 2 streams the records again and holds the
shingle sets of only those records that are candidates of a later one, until that one is reached.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import zlib
from collections.abc import Sequence

import numpy as np

from jaxtune.datatools import fields as fields_lib
from jaxtune.datatools import ngrams
from jaxtune.datatools.parallel import ordered_map
from jaxtune.datatools.records import KeptSets, RecordSet, record_id
from jaxtune.errors import UserError

RECALL_AT_THRESHOLD = 0.99  # lsh_bands' target: probability that a pair exactly at the threshold is a candidate
MAX_GROUP_PAIRS = 64  # in a band bucket of more records, each is paired with the 64 before it (and the first)


def lsh_bands(threshold: float, num_perm: int, target: float = RECALL_AT_THRESHOLD) -> tuple[int, int]:
    """(bands, rows): the most rows per band (fewest chance candidates) whose candidate probability at
    `threshold` still reaches `target` (at 0.8 with 128 permutations: 21 bands of 6 rows, 0.998)."""
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if 1.0 - (1.0 - threshold**rows) ** bands >= target:
            return bands, rows
    return num_perm, 1


def candidate_probability(jaccard: float, bands: int, rows: int) -> float:
    return 1.0 - (1.0 - jaccard**rows) ** bands


@dataclasses.dataclass(frozen=True)
class DedupSettings:
    ngram: int = 5  # words per shingle
    threshold: float = 0.8  # exact Jaccard similarity of shingle sets at which a record is a near duplicate
    num_perm: int = 128  # MinHash permutations (more: fewer missed candidates, slower)
    seed: int = 1  # MinHash permutation seed: the same seed gives the same result on every run
    near: bool = True  # False: exact duplicates only
    fields: tuple[str, ...] = ()  # text fields compared (default: the trained-on fields by format)
    workers: int = 1  # processes computing MinHash signatures

    def check(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise UserError(f"dedup threshold must be in (0, 1], got {self.threshold}")
        if self.ngram < 1:
            raise UserError(f"dedup n-gram size must be >= 1, got {self.ngram}")
        if self.num_perm < 16:
            raise UserError(f"dedup num_perm must be >= 16 (MinHash permutations), got {self.num_perm}")
        if self.workers < 1:
            raise UserError(f"dedup workers must be >= 1, got {self.workers}")


@dataclasses.dataclass
class Duplicate:
    set: str
    index: int  # position in its set
    id: str  # the record's file:line
    kind: str  # exact | near
    of_set: str  # the kept record it duplicates
    of_id: str
    jaccard: float  # exact Jaccard similarity of the shingle sets (1.0 for exact duplicates)


@dataclasses.dataclass
class DedupResult(KeptSets):
    sets: list[RecordSet]
    kept: dict[str, list[int]]  # per set: indices kept, in order
    removed: list[Duplicate]
    counts: dict[str, int]  # per set: records read
    fields: dict[str, int]  # compared fields -> records (fields.FieldTally)
    stats: dict  # bands, rows, candidate pairs, confirmation counts

    def report(self, settings: DedupSettings) -> dict:
        per_set = {}
        for s in self.sets:
            mine = [d for d in self.removed if d.set == s.name]
            per_set[s.name] = {
                "origin": s.origin, "records": self.counts[s.name], "kept": len(self.kept[s.name]),
                "exact_duplicates": sum(d.kind == "exact" for d in mine),
                "near_duplicates": sum(d.kind == "near" for d in mine),
                "removed": [{"id": d.id, "kind": d.kind, "duplicate_of": d.of_id, "duplicate_of_set": d.of_set,
                             "jaccard": round(d.jaccard, 4)} for d in mine],
            }
        return {"settings": dataclasses.asdict(settings), "fields_compared": self.fields, "lsh": self.stats,
                "sets": per_set}

    def clusters(self) -> list[dict]:
        """Duplicate clusters: each kept record with the records removed as its duplicates (kept order)."""
        groups: dict[tuple[str, str], list[Duplicate]] = {}
        for d in self.removed:
            groups.setdefault((d.of_set, d.of_id), []).append(d)
        return [{"kept": {"set": kept_set, "id": kept_id},
                 "duplicates": [{"set": d.set, "id": d.id, "kind": d.kind, "jaccard": round(d.jaccard, 4)} for d in ds]}
                for (kept_set, kept_id), ds in groups.items()]

    def summary(self) -> str:
        total = sum(self.counts.values())
        exact = sum(d.kind == "exact" for d in self.removed)
        return (f"dedup: {total} records in {len(self.sets)} set(s), removed {exact} exact and "
                f"{len(self.removed) - exact} near duplicates, kept {total - len(self.removed)}")


def exact_key(fields_words: Sequence[Sequence[str]]) -> int:
    text = "\n".join(" ".join(w) for w in fields_words).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(text, digest_size=16).digest(), "little")


class MinHasher:
    """MinHash signatures of shingle sets with one shared set of permutations (built once).

    Shingles are hashed with CRC-32 (C speed, the same in every process; datasketch's default SHA-1
    was half of dedup's time). Two distinct shingles share a CRC with probability 2^-32, which can
    only perturb a signature: near duplicates are confirmed on the shingles themselves."""

    def __init__(self, num_perm: int, seed: int):
        from datasketch import MinHash

        self._empty = MinHash(num_perm=num_perm, seed=seed, hashfunc=zlib.crc32)

    def __call__(self, shingles: set[str]):
        m = self._empty.copy()  # shares the permutations instead of drawing them again
        m.update_batch([s.encode("utf-8") for s in shingles])  # a minimum: the order does not matter
        return m


def record_shingles(fields_words: Sequence[Sequence[str]], n: int) -> set[str]:
    """Union of each field's shingles (never spanning two fields)."""
    out: set[str] = set()
    for w in fields_words:
        out |= ngrams.shingles(w, n)
    return out


def jaccard(a: set, b: set) -> float:
    if not a and not b:
        return 1.0
    shared = len(a & b)
    return shared / (len(a) + len(b) - shared)


_worker: dict = {}  # per process: settings, hasher and band shape (parallel.ordered_map's initializer)


def _init_worker(settings: DedupSettings) -> None:
    _worker["settings"] = settings
    _worker["hasher"] = MinHasher(settings.num_perm, settings.seed) if settings.near else None
    _worker["bands"] = lsh_bands(settings.threshold, settings.num_perm)
    # Band key = sum of the band's MinHash values times fixed random odd 64-bit multipliers (mod 2^64):
    # one vectorised op; two different bands sharing a key only adds a candidate that pass 2 rejects.
    rng = np.random.default_rng(settings.seed)
    _worker["mix"] = rng.integers(1, 2**63, size=_worker["bands"][1], dtype=np.uint64) * np.uint64(2) + np.uint64(1)


def _features(record: dict) -> tuple[int, bytes | None, tuple[str, ...]]:
    """(exact key, band keys as bytes (8 per band) or None, compared fields) of one record."""
    settings = _worker["settings"]
    texts, used = fields_lib.record_texts(record, settings.fields)
    fields_words = [w for w in (ngrams.words(t) for t in texts) if w]
    key = exact_key(fields_words)
    if _worker["hasher"] is None:
        return key, None, used
    shingles = record_shingles(fields_words, settings.ngram)
    if not shingles:
        return key, None, used
    bands, rows = _worker["bands"]
    values = _worker["hasher"](shingles).hashvalues[: bands * rows].reshape(bands, rows)
    with np.errstate(over="ignore"):
        band_keys = (values * _worker["mix"]).sum(axis=1, dtype=np.uint64)
    return key, band_keys.tobytes(), used


def _candidate_pairs(indices: np.ndarray, band_keys: np.ndarray) -> dict[int, set[int]]:
    """{later record: earlier records sharing at least one band key with it} (global indices)."""
    candidates: dict[int, set[int]] = {}
    for band in range(band_keys.shape[1]):
        column = band_keys[:, band]
        order = np.argsort(column, kind="stable")  # equal keys stay in record order
        sorted_keys = column[order]
        same = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])
        if not len(same):
            continue
        starts = same[np.r_[True, same[1:] != same[:-1] + 1]]  # first position of each run of equal keys
        for start in starts.tolist():
            end = start + 1
            while end < len(sorted_keys) and sorted_keys[end] == sorted_keys[start]:
                end += 1
            members = indices[order[start:end]].tolist()
            for k in range(1, len(members)):
                earlier = members[max(0, k - MAX_GROUP_PAIRS) : k]
                if k > MAX_GROUP_PAIRS:
                    earlier.append(members[0])
                candidates.setdefault(members[k], set()).update(earlier)
    return candidates


def dedup(sets: Sequence[RecordSet], settings: DedupSettings = DedupSettings()) -> DedupResult:
    """Removes exact and near duplicates (see the module docstring for the order, the rules and memory)."""
    settings.check()
    bands, rows = lsh_bands(settings.threshold, settings.num_perm)
    tally = fields_lib.FieldTally()
    # Pass 1: exact keys and band keys, streamed (records are never held).
    first_of: dict[int, int] = {}  # exact key -> the first record (global index) with it
    exact_of: dict[int, int] = {}  # exact duplicate -> that first record
    band_rows = bytearray()  # 8 bytes per band per record, no per-record objects
    band_indices: list[int] = []
    starts, counts = {}, {}
    g = 0
    for s in sets:
        starts[s.name] = g
        stream = ordered_map(_features, iter(s.records), workers=settings.workers, initializer=_init_worker,
                             initargs=(settings,))
        for key, band_keys, used in stream:
            tally.add(used)
            if key in first_of:
                exact_of[g] = first_of[key]
            else:
                first_of[key] = g
                if band_keys is not None:
                    band_rows += band_keys
                    band_indices.append(g)
            g += 1
        counts[s.name] = g - starts[s.name]
    del first_of
    candidates: dict[int, set[int]] = {}
    if band_rows:
        keys = np.frombuffer(band_rows, dtype=np.uint64).reshape(len(band_indices), bands)
        candidates = _candidate_pairs(np.asarray(band_indices, dtype=np.int64), keys)
        del keys, band_rows
    # Pass 2: confirm candidates with the exact Jaccard of their shingle sets, in record order.
    last_use: dict[int, int] = {}
    for later, earlier in candidates.items():
        for j in earlier:
            last_use[j] = max(last_use.get(j, -1), later)
    wanted_ids = set(exact_of.values())
    stored: dict[int, tuple[set[str], str, str]] = {}  # kept candidate -> (shingles, set, id) until last use
    expiry: list[tuple[int, int]] = []
    ids: dict[int, tuple[str, str]] = {}
    near_of: dict[int, tuple[int, float]] = {}  # near duplicate -> (kept record, Jaccard)
    kept: dict[str, list[int]] = {}
    removed: list[Duplicate] = []
    confirmed = rejected = 0
    g = 0
    for s in sets:
        kept[s.name] = []
        for index, record in enumerate(s.records):
            while expiry and expiry[0][0] < g:
                stored.pop(heapq.heappop(expiry)[1], None)
            rid = record_id(record)
            if g in exact_of:
                original = exact_of[g]
                if original in near_of:  # its first copy is itself a near duplicate of a kept record
                    root, j = near_of[original]
                    removed.append(Duplicate(s.name, index, rid, "near", *ids[root], j))
                else:
                    removed.append(Duplicate(s.name, index, rid, "exact", *ids[original], 1.0))
                g += 1
                continue
            shingles = None
            if g in candidates or g in last_use:
                shingles = record_shingles(fields_lib.record_words(record, settings.fields), settings.ngram)
            best = None
            for j in sorted(candidates.get(g, ())):
                if j not in stored:  # removed itself, so not a kept original
                    continue
                similarity = jaccard(shingles, stored[j][0])
                if similarity >= settings.threshold and (best is None or similarity > best[1]):
                    best = (j, similarity)
            if candidates.get(g):
                confirmed += best is not None
                rejected += best is None
            if best is not None:
                near_of[g] = best
                removed.append(Duplicate(s.name, index, rid, "near", *stored[best[0]][1:], best[1]))
                if g in wanted_ids:  # its exact copies will point at its kept original
                    ids[best[0]] = stored[best[0]][1:]
            else:
                kept[s.name].append(index)
                if g in wanted_ids:
                    ids[g] = (s.name, rid)
                if g in last_use:
                    stored[g] = (shingles, s.name, rid)
                    heapq.heappush(expiry, (last_use[g], g))
            g += 1
    stats = {"bands": bands, "rows": rows,
             "candidate_probability_at_threshold": round(candidate_probability(settings.threshold, bands, rows), 4),
             "records_with_candidates": len(candidates), "confirmed": confirmed, "rejected_by_exact_jaccard": rejected}
    return DedupResult(list(sets), kept, removed, counts, tally.counts, stats)
