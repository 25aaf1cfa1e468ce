"""Task clusters for measuring FLAN's claim: more training clusters, phrased with more templates,
help zero-shot on clusters never trained on (Wei et al. 2021, figure 5 / 7).

Every family applies operations to a short list of items (letters or digits), and every
instruction is written from one shared phrase per operation, so a family of a held-out cluster is
solvable from its instruction *in principle* by a model that learned its parts elsewhere:
- ``digits`` (held out) applies operations trained on letters (reverse, first, sort, previous) to
  digits: same instruction words, new input kind;
- ``compose`` (held out) chains two trained operations with "then" ("Write them backwards, then
  give them in uppercase"), which no training family does.
Six clusters are trained (two families each, each a different operation or input kind); a
cluster in ``HELDOUT_CLUSTERS`` is never trained on in any phrasing. Families are phrased like the
quickstart's (shared frames x family wordings, three combinations per family held out), so
trained families are also evaluated on held-out phrasings.

Records look like ``{"task": "reverse_letters", "items": "c a f", "answer": "f a c"}``.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from jaxtune.data.builtin.quickstart import compose_templates
from jaxtune.data.templates import Template, render

LETTERS = "abcdefghijkl"  # short lists over few letters: every letter and its neighbours are trained
DIGITS = "0123456789"
KINDS = {"letters": (LETTERS, "Here are some letters", "Letters"), "digits": (DIGITS, "Here are some numbers", "Numbers")}


@dataclasses.dataclass(frozen=True)
class Operation:
    """A function of an item list and its instruction wordings (the shared words families reuse)."""

    apply: Callable[[list[str]], list[str]]
    wordings: tuple[str, ...]
    needs: Callable[[list[str], str], bool] = lambda items, pool: True  # which inputs it is defined on


def _shift(step: int) -> Callable[[list[str]], list[str]]:
    def apply(items: list[str]) -> list[str]:
        pool = DIGITS if items[0].isdigit() else LETTERS
        return [pool[pool.index(i) + step] for i in items]
    return apply


OPERATIONS: dict[str, Operation] = {
    "uppercase": Operation(lambda xs: [x.upper() for x in xs],
                           ("Write them in capital letters", "Give them in uppercase", "Convert them to uppercase",
                            "Spell them in capitals")),
    "reverse": Operation(lambda xs: xs[::-1],
                         ("Write them backwards", "Reverse their order", "Give them in reverse order", "Say them backwards")),
    "first": Operation(lambda xs: xs[:1],
                       ("Give the first one", "Tell me which one comes first", "Output the first item",
                        "Write the item at the start")),
    "last": Operation(lambda xs: xs[-1:],
                      ("Give the last one", "Tell me which one comes last", "Output the last item", "Write the item at the end")),
    "count": Operation(lambda xs: [str(len(xs))],
                       ("Count them", "Tell me how many there are", "Give the number of items", "Say how many items there are")),
    "sort": Operation(sorted,
                      ("Sort them", "Put them in order", "Write them in increasing order", "Give them sorted, smallest first")),
    "smallest": Operation(lambda xs: [min(xs)],
                          ("Give the smallest one", "Tell me which one is smallest", "Output the smallest item",
                           "Write the lowest one")),
    "next": Operation(_shift(1),
                      ("Replace each with the one after it", "Move each one up by one", "Write the one that follows each",
                       "Give each one's successor"),
                      needs=lambda xs, pool: pool[-1] not in xs),
    "previous": Operation(_shift(-1),
                          ("Replace each with the one before it", "Move each one down by one",
                           "Write the one that comes before each", "Give each one's predecessor"),
                          needs=lambda xs, pool: pool[0] not in xs),
    "sum": Operation(lambda xs: [str(sum(int(x) for x in xs))],
                     ("Add them up", "Give their sum", "Tell me their total", "Write the sum of the numbers")),
}


@dataclasses.dataclass(frozen=True)
class Family:
    """Operations applied in order to a list of `kind` items; `sizes` = list lengths."""

    name: str
    cluster: str
    operations: tuple[str, ...]
    kind: str
    sizes: tuple[int, int] = (3, 5)

    def wordings(self) -> tuple[str, ...]:
        """One wording per index; a chain reads "<first>, then <second, lowercased>" (rotated so
        the parts vary together)."""
        parts = [OPERATIONS[op].wordings for op in self.operations]
        out = []
        for i in range(len(parts[0])):
            words = [p[(i + k) % len(p)] for k, p in enumerate(parts)]
            out.append(", then ".join([words[0], *(w[0].lower() + w[1:] for w in words[1:])]))
        return tuple(out)

    def make_fields(self, rng: np.random.Generator) -> dict[str, str]:
        pool = KINDS[self.kind][0]
        while True:
            size = int(rng.integers(self.sizes[0], self.sizes[1] + 1))
            items = [pool[int(i)] for i in rng.choice(len(pool), size=size, replace=False)]
            if all(OPERATIONS[op].needs(items, pool) for op in self.operations):
                break
        out = items
        for op in self.operations:
            out = OPERATIONS[op].apply(out)
        return {"items": " ".join(items), "answer": " ".join(out)}


_FAMILY_LIST = (
    # the six training clusters, two families each
    Family("uppercase_letters", "transform", ("uppercase",), "letters"),
    Family("reverse_letters", "transform", ("reverse",), "letters"),
    Family("first_letter", "select", ("first",), "letters"),
    Family("last_letter", "select", ("last",), "letters"),
    Family("count_letters", "count", ("count",), "letters", (2, 6)),
    Family("count_digits", "count", ("count",), "digits", (2, 6)),
    Family("sort_letters", "order", ("sort",), "letters"),
    Family("smallest_letter", "order", ("smallest",), "letters"),
    Family("next_letters", "shift", ("next",), "letters", (2, 4)),
    Family("previous_letters", "shift", ("previous",), "letters", (2, 4)),
    Family("next_digits", "arithmetic", ("next",), "digits", (2, 4)),
    Family("sum_digits", "arithmetic", ("sum",), "digits", (2, 2)),
    # held out: trained operations on a new input kind
    Family("reverse_digits", "digits", ("reverse",), "digits"),
    Family("first_digit", "digits", ("first",), "digits"),
    Family("sort_digits", "digits", ("sort",), "digits"),
    Family("previous_digits", "digits", ("previous",), "digits", (2, 4)),
    # held out: two trained operations chained
    Family("reverse_then_uppercase", "compose", ("reverse", "uppercase"), "letters"),
    Family("sort_then_last", "compose", ("sort", "last"), "letters"),
    Family("reverse_then_first", "compose", ("reverse", "first"), "letters"),
    Family("next_then_reverse", "compose", ("next", "reverse"), "letters", (2, 4)),
)
FAMILIES: dict[str, Family] = {f.name: f for f in _FAMILY_LIST}
# In the order flan_effect.py adds them: 1 cluster = transform, 2 = transform + select, ...
TRAIN_CLUSTERS = ("transform", "select", "count", "order", "shift", "arithmetic")
HELDOUT_CLUSTERS = ("digits", "compose")
CLUSTERS: dict[str, tuple[str, ...]] = {c: tuple(f.name for f in _FAMILY_LIST if f.cluster == c)
                                        for c in TRAIN_CLUSTERS + HELDOUT_CLUSTERS}


def _templates(index: int, family: Family) -> tuple[list[Template], list[Template]]:
    _, here, label = KINDS[family.kind]
    return compose_templates(index, "items", here, label, family.wordings())


_TEMPLATES = {f.name: _templates(i, f) for i, f in enumerate(_FAMILY_LIST)}


def check_clusters(clusters: Sequence[str], key: str = "data.clusters") -> tuple[str, ...]:
    """The training clusters to use (empty: all of TRAIN_CLUSTERS), or a ValueError naming `key`."""
    clusters = tuple(clusters) or TRAIN_CLUSTERS
    bad = [c for c in clusters if c not in TRAIN_CLUSTERS]
    if bad or len(set(clusters)) != len(clusters):
        held = " (held-out clusters are never trained on)" if any(c in HELDOUT_CLUSTERS for c in bad) else ""
        raise ValueError(f"config key '{key}' must list distinct training clusters among {', '.join(TRAIN_CLUSTERS)}; "
                         f"got {clusters!r}{held}")
    return clusters


def generate_records(families: Sequence[str], num_examples: int, *, seed: int) -> list[dict]:
    """``num_examples`` records of `families` in shuffled rounds (any prefix is balanced)."""
    rng = np.random.default_rng(seed)
    records: list[dict] = []
    while len(records) < num_examples:
        for i in rng.permutation(len(families)):
            if len(records) == num_examples:
                break
            family = FAMILIES[families[int(i)]]
            records.append({"task": family.name, **family.make_fields(rng)})
    return records


def train_templates(family: str, limit: int = 0) -> list[Template]:
    """The training phrasings of `family`; `limit` > 0 keeps the first `limit` (1: one template
    per task, FLAN's ablation)."""
    train = _TEMPLATES[family][0]
    return list(train[:limit] if limit > 0 else train)


def eval_templates(family: str) -> list[Template]:
    """What `family` is evaluated with: its held-out phrasings if its cluster is trainable (held-out
    phrasings of a trained task), every phrasing if its cluster is held out (an unseen task)."""
    train, heldout = _TEMPLATES[family]
    return list(heldout if FAMILIES[family].cluster in TRAIN_CLUSTERS else train + heldout)


def eval_families(train_clusters: Sequence[str]) -> list[str]:
    """The trained clusters' families (held-out phrasings), then every held-out cluster's."""
    return [f for c in (*train_clusters, *HELDOUT_CLUSTERS) for f in CLUSTERS[c]]


def tokenizer_corpus(seed: int = 0, *, records_per_family: int = 60) -> Iterator[str]:
    """Every template of every family (held-out ones included) rendered over generated records,
    prompts and answers: the same tokenizer whichever clusters a run trains on."""
    for name in FAMILIES:
        train, heldout = _TEMPLATES[name]
        records = generate_records([name], records_per_family, seed=seed)
        for (input_pattern, target_pattern), record in zip(itertools.cycle(train + heldout), records):
            yield render(input_pattern, record)
            yield render(target_pattern, record)
