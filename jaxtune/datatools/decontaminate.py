"""Training-vs-evaluation overlap (decontamination) as Tulu 3 / open-instruct measures it.

open-instruct (decontamination/search.py) indexes the training prompts (user turns only) and scores
each evaluation item by n-gram *coverage*: the fraction of the item's words that lie inside one of its
n-grams (8 words in Tulu 3) also found in a training record; a training record is contaminated when
it covers some item above `--match_threshold` (Tulu 3: 0.5). Without n-grams it matches items
exactly (the item's text as a phrase). Here the same, on normalised words (ngrams.words: case,
punctuation and whitespace never matter) and without a search server:

- part="prompt" (default): only the prompt side of both sides is compared - user turns of chat
  records, instruction/input, `prompt`, `question` (fields.trained_texts) - so generic assistant
  phrases never flag a record; part="all" compares answers too;
- mode="ngram" (default): coverage as above with n words per n-gram (per evaluation set: `eval_n`),
  contaminated when coverage >= `threshold` (and > 0: `threshold` 0 = any shared n-gram; open-instruct
  uses > threshold, which differs only at exact ties). Evaluation items shorter than `min_words`
  (default: that set's n) have no n-gram: they are matched WHOLE, when a compared training text (one
  field, one user turn, or all of them joined) equals the item;
- mode="exact": an item matches when each of its texts occurs as a phrase in a training text.

N-grams never span two texts. Memory: the evaluation index (all its n-grams) is held, the training
records are streamed (in `workers` processes, each with its own copy of the index).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from jaxtune.datatools import fields as fields_lib
from jaxtune.datatools import ngrams
from jaxtune.datatools.parallel import ordered_map
from jaxtune.datatools.records import KeptSets, RecordSet, record_id
from jaxtune.errors import UserError

MODES = ("ngram", "exact")
EXAMPLES_PER_EVAL_SET = 20  # contaminated pairs shown per evaluation set in the report
_ANCHOR = 4  # exact mode finds phrases by their first (up to) 4 words, then compares the rest


@dataclasses.dataclass(frozen=True)
class DecontaminationSettings:
    n: int = 8  # words per n-gram (Tulu 3)
    threshold: float = 0.5  # coverage of an evaluation item at which a training record is contaminated (0: any n-gram)
    mode: str = "ngram"  # ngram | exact
    part: str = "prompt"  # prompt | all: compare only prompts (user turns) or answers too
    min_words: int = 0  # evaluation items with fewer words are matched whole (0: the set's n)
    eval_n: tuple[tuple[str, int], ...] = ()  # per evaluation set n, overriding `n`
    fields: tuple[str, ...] = ()  # training fields compared (default: by format and `part`)
    eval_fields: tuple[str, ...] = ()  # evaluation fields compared (default: by format and `part`)
    workers: int = 1  # processes scoring training records

    def check(self, where: str = "decontamination", threshold_key: str = "threshold") -> None:
        for key, value in (("n", self.n), *((f"n of {name}", n) for name, n in self.eval_n)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{where}: {key} (words per n-gram) must be an integer >= 1, got {value!r}")
        if not isinstance(self.threshold, (int, float)) or not 0.0 <= self.threshold <= 1.0:
            raise UserError(f"{where}: {threshold_key} must be in [0, 1] (0 = any shared n-gram), got {self.threshold}")
        if self.mode not in MODES:
            raise UserError(f"{where}: mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.part not in fields_lib.PARTS:
            raise UserError(f"{where}: part must be one of {', '.join(fields_lib.PARTS)}, got {self.part!r}")
        if isinstance(self.min_words, bool) or not isinstance(self.min_words, int) or self.min_words < 0:
            raise UserError(f"{where}: min_words must be an integer >= 0 (0 = n), got {self.min_words!r}")
        if self.workers < 1:
            raise UserError(f"{where}: workers must be >= 1, got {self.workers}")

    def n_of(self, eval_set: str) -> int:
        return dict(self.eval_n).get(eval_set, self.n)


def _texts_words(record: dict, fields: Sequence[str], part: str) -> tuple[list[list[str]], tuple[str, ...]]:
    texts, used = fields_lib.record_texts(record, fields, part)
    return [w for w in (ngrams.words(t) for t in texts) if w], used


class EvalIndex:
    """The evaluation items: their n-grams (with word positions), whole short items and exact-mode anchors."""

    def __init__(self, sets: Sequence[RecordSet], settings: DecontaminationSettings):
        self.settings = settings
        self.items: list[tuple[str, str, int, int]] = []  # (set, id, words, texts)
        self.grams: dict[int, dict[str, list[tuple[int, int]]]] = {}  # n -> n-gram -> [(item, position)]
        self.whole: dict[str, list[int]] = {}  # normalised text of a short item -> items
        self.anchors: dict[tuple[int, str], list[tuple[int, int, tuple[str, ...]]]] = {}  # exact mode
        self.phrases: dict[int, str] = {}  # exact mode: item -> its texts, for the report
        self.examples = {s.name: 0 for s in sets}
        self.too_short = {s.name: 0 for s in sets}  # items matched whole (fewer than min_words words)
        self.empty = {s.name: 0 for s in sets}  # items with no text compared
        self.fields: dict[str, dict[str, int]] = {}
        unknown = sorted(set(dict(settings.eval_n)) - set(self.examples))
        if unknown:
            raise UserError(f"--eval_n names {', '.join(unknown)}, which is not an evaluation set "
                            f"(sets: {', '.join(self.examples) or 'none'})")
        for s in sets:
            n = settings.n_of(s.name)
            shortest = settings.min_words or n
            tally = fields_lib.FieldTally()
            for record in s.records:
                self.examples[s.name] += 1
                words, used = _texts_words(record, settings.eval_fields, settings.part)
                tally.add(used)
                total = sum(map(len, words))
                if not total:
                    self.empty[s.name] += 1
                    continue
                item = len(self.items)
                self.items.append((s.name, record_id(record), total, len(words)))
                if settings.mode == "exact":
                    self.phrases[item] = " / ".join(" ".join(w) for w in words)
                    for t, w in enumerate(words):
                        k = min(len(w), _ANCHOR)
                        self.anchors.setdefault((k, " ".join(w[:k])), []).append((item, t, tuple(w)))
                elif total < shortest:
                    self.too_short[s.name] += 1
                    self.whole.setdefault(" ".join(x for w in words for x in w), []).append(item)
                else:
                    index = self.grams.setdefault(n, {})
                    offset = 0
                    for w in words:
                        for i in range(len(w) - n + 1):
                            index.setdefault(" ".join(w[i : i + n]), []).append((item, offset + i))
                        offset += len(w)
            self.fields[s.name] = tally.counts


@dataclasses.dataclass
class Match:
    """The evaluation item a training record covers most."""

    eval_set: str
    eval_id: str
    coverage: float  # fraction of the item's words covered (1.0 for whole / exact matches)
    how: str  # ngram | whole | exact
    text: str  # the first shared n-gram, or the matched item text
    eval_sets: tuple[str, ...]  # every evaluation set with an item at or above the threshold
    items: int  # evaluation items at or above the threshold


def _exact_items(words: list[list[str]], index: EvalIndex) -> dict[int, set[int]]:
    """Exact mode: item -> its texts found as phrases in the training texts."""
    found: dict[int, set[int]] = {}
    lengths = sorted({k for k, _ in index.anchors})
    for w in words:
        for i in range(len(w)):
            for k in lengths:
                for item, t, phrase in index.anchors.get((k, " ".join(w[i : i + k])), ()):
                    if tuple(w[i : i + len(phrase)]) == phrase:
                        found.setdefault(item, set()).add(t)
    return found


def contamination(record: dict, index: EvalIndex, settings: DecontaminationSettings) -> Match | None:
    """The evaluation match that makes `record` contaminated (see the module docstring), or None."""
    return _match(_texts_words(record, settings.fields, settings.part)[0], index, settings)


def _match(words: list[list[str]], index: EvalIndex, settings: DecontaminationSettings) -> Match | None:
    if not words:
        return None
    scores: dict[int, tuple[float, str, str]] = {}  # item -> (coverage, how, text)
    if settings.mode == "exact":
        for item, texts in _exact_items(words, index).items():
            if len(texts) == index.items[item][3]:
                scores[item] = (1.0, "exact", index.phrases[item])
    else:
        for key in {" ".join(w) for w in words} | {" ".join(x for w in words for x in w)}:
            for item in index.whole.get(key, ()):
                scores[item] = (1.0, "whole", key)
        for n, grams in index.grams.items():
            covered: dict[int, set[int]] = {}
            first: dict[int, str] = {}
            for w in words:
                for i in range(len(w) - n + 1):
                    gram = " ".join(w[i : i + n])
                    for item, position in grams.get(gram, ()):
                        covered.setdefault(item, set()).update(range(position, position + n))
                        first.setdefault(item, gram)
            for item, positions in covered.items():
                coverage = len(positions) / index.items[item][2]
                if coverage > scores.get(item, (0.0,))[0]:
                    scores[item] = (coverage, "ngram", first[item])
    hits = {item: s for item, s in scores.items() if s[0] > 0 and s[0] >= settings.threshold}
    if not hits:
        return None
    best = min(hits, key=lambda item: (-hits[item][0], item))  # highest coverage, earliest item on ties
    eval_set, eval_id, _, _ = index.items[best]
    sets = tuple(dict.fromkeys(index.items[item][0] for item in sorted(hits)))
    return Match(eval_set, eval_id, hits[best][0], hits[best][1], hits[best][2], sets, len(hits))


@dataclasses.dataclass
class Contaminated:
    set: str
    index: int
    id: str
    match: Match


@dataclasses.dataclass
class DecontaminationResult(KeptSets):
    sets: list[RecordSet]
    index: EvalIndex
    kept: dict[str, list[int]]
    contaminated: list[Contaminated]
    counts: dict[str, int]  # per training set: records read
    fields: dict[str, dict[str, int]]  # per training set: compared fields -> records
    settings: DecontaminationSettings = DecontaminationSettings()

    def report(self, settings: DecontaminationSettings | None = None) -> dict:
        settings = settings or self.settings
        train = {}
        for s in self.sets:
            mine = [c for c in self.contaminated if c.set == s.name]
            train[s.name] = {
                "origin": s.origin, "records": self.counts[s.name], "kept": len(self.kept[s.name]),
                "contaminated": len(mine), "fields_compared": self.fields[s.name],
                "examples": [{"id": c.id, "eval_set": c.match.eval_set, "eval_id": c.match.eval_id,
                              "coverage": round(c.match.coverage, 4), "how": c.match.how, "text": c.match.text,
                              "eval_items_matched": c.match.items, "eval_sets": list(c.match.eval_sets)}
                             for c in mine],
            }
        evals = {}
        for name, count in self.index.examples.items():
            hits = [c for c in self.contaminated if name in c.match.eval_sets]
            best_here = [c for c in hits if c.match.eval_set == name]
            evals[name] = {
                "examples": count, "n": settings.n_of(name), "matched_whole": self.index.too_short[name],
                "no_text": self.index.empty[name], "fields_compared": self.index.fields[name],
                "training_records_contaminated": len(hits),
                "per_training_set": {s.name: sum(c.set == s.name for c in hits) for s in self.sets},
                "eval_ids_matched": sorted({c.match.eval_id for c in best_here}),
                "examples_matched": [{"train_set": c.set, "train_id": c.id, "eval_id": c.match.eval_id,
                                      "coverage": round(c.match.coverage, 4), "how": c.match.how,
                                      "text": c.match.text} for c in best_here[:EXAMPLES_PER_EVAL_SET]],
            }
        return {"settings": dataclasses.asdict(settings), "train": train, "eval": evals}

    def summary(self) -> str:
        total = sum(self.counts.values())
        s = self.settings
        how = ("contain an eval item" if s.mode == "exact" else
               f"cover >= {s.threshold:g} of an eval item with {s.n}-grams")
        return (f"decontaminate: {len(self.contaminated)} of {total} training records {how} ({s.part} text; "
                f"{len(self.index.examples)} eval set(s), {sum(self.index.examples.values())} examples); "
                f"kept {total - len(self.contaminated)}")


_worker: dict = {}


def _init_worker(index: EvalIndex, settings: DecontaminationSettings) -> None:
    _worker["index"], _worker["settings"] = index, settings


def _score(record: dict) -> tuple[str, Match | None, tuple[str, ...]]:
    settings = _worker["settings"]
    words, used = _texts_words(record, settings.fields, settings.part)
    return record_id(record), _match(words, _worker["index"], settings), used


def decontaminate(train_sets: Sequence[RecordSet], eval_sets: Sequence[RecordSet],
                  settings: DecontaminationSettings = DecontaminationSettings(),
                  index: EvalIndex | None = None) -> DecontaminationResult:
    """Splits each training set into kept and contaminated records (source order kept, streamed)."""
    settings.check()
    if not eval_sets and index is None:
        raise UserError("decontaminate: no evaluation sets to compare against (give --eval FILE, --eval_tfds "
                        "NAME:SPLIT, or a --config with eval.tasks / data.eval_path)")
    index = index or EvalIndex(eval_sets, settings)
    kept: dict[str, list[int]] = {}
    found: list[Contaminated] = []
    counts, tallies = {}, {}
    for s in train_sets:
        kept[s.name] = []
        tally = fields_lib.FieldTally()
        stream = ordered_map(_score, iter(s.records), workers=settings.workers, initializer=_init_worker,
                             initargs=(index, settings))
        i = -1
        for i, (rid, match, used) in enumerate(stream):
            tally.add(used)
            if match is None:
                kept[s.name].append(i)
            else:
                found.append(Contaminated(s.name, i, rid, match))
        counts[s.name], tallies[s.name] = i + 1, tally.counts
    return DecontaminationResult(list(train_sets), index, kept, found, counts, tallies, settings)
