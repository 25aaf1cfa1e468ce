"""The quickstart multitask set: small FLAN-style instruction families, generated.

Sized so a ~1M-parameter model trained from scratch for a few CPU minutes reaches high
exact match on *held-out phrasings* (template strings never trained on); see
shared/notes/quickstart-calibration.md. Hence: only single-step tasks (no multi-digit
addition), one small shared word pool, space-separated inputs that tokenize one item per
piece, short prompts and answers, the instruction both before and after the input in
training phrasings, and held-out phrasings built from words the model has seen.
"""

from __future__ import annotations

import dataclasses
import itertools
import string
from collections.abc import Callable, Iterator

import numpy as np

from jaxtune.data.templates import Template, render

# The shared word pool, by category (category is itself a task). Words are short so
# their uppercase forms stay a few tokens.
CATEGORIES: dict[str, tuple[str, ...]] = {
    "animal": ("cat", "dog", "cow", "pig", "fox", "owl", "bee", "hen", "bird", "fish", "lion", "bear", "frog", "duck", "goat"),
    "colour": ("red", "blue", "green", "pink", "brown", "gray", "black", "white", "gold", "purple", "yellow", "silver"),
    "fruit": ("apple", "pear", "plum", "lime", "lemon", "grape", "peach", "mango", "kiwi", "fig", "melon", "cherry"),
    "object": ("book", "cup", "pen", "hat", "box", "car", "bus", "key", "bell", "lamp", "ball", "door", "ring", "bag", "sock"),
}
WORDS: tuple[str, ...] = tuple(w for ws in CATEGORIES.values() for w in ws)
_CATEGORY_OF = {w: c for c, ws in CATEGORIES.items() for w in ws}

# Each word is in exactly one pair, so every opposite is unambiguous.
_OPPOSITE_PAIRS = (
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("old", "new"),
    ("day", "night"), ("wet", "dry"), ("hard", "soft"), ("light", "dark"), ("high", "low"),
    ("full", "empty"), ("good", "bad"), ("left", "right"), ("early", "late"), ("rich", "poor"),
    ("happy", "sad"), ("long", "short"), ("thick", "thin"), ("near", "far"), ("win", "lose"),
)
OPPOSITES: dict[str, str] = {**dict(_OPPOSITE_PAIRS), **{b: a for a, b in _OPPOSITE_PAIRS}}
_OPPOSITE_WORDS = tuple(OPPOSITES)
LETTERS = string.ascii_lowercase


@dataclasses.dataclass(frozen=True)
class TaskFamily:
    """One task: a field generator (fields include ``"answer"``) and its phrasings."""

    name: str
    make_fields: Callable[[np.random.Generator], dict[str, str]]
    train_templates: list[Template]
    heldout_templates: list[Template]


def _pick(rng: np.random.Generator, pool, k: int | None = None, *, replace: bool = False):
    if k is None:
        return pool[int(rng.integers(len(pool)))]
    return [pool[int(i)] for i in rng.choice(len(pool), size=k, replace=replace)]


def _uppercase(rng):
    word = _pick(rng, WORDS)
    return {"word": word, "answer": word.upper()}


def _count(rng):
    letters = _pick(rng, LETTERS[:8], int(rng.integers(2, 7)), replace=True)
    return {"items": " ".join(letters), "answer": str(len(letters))}


def _opposite(rng):
    word = _pick(rng, _OPPOSITE_WORDS)
    return {"word": word, "answer": OPPOSITES[word]}


def _next_number(rng):
    n = int(rng.integers(0, 99))
    return {"number": str(n), "answer": str(n + 1)}


def _repeat(rng):
    word, times = _pick(rng, WORDS), int(rng.integers(2, 4))
    return {"word": word, "times": str(times), "answer": " ".join([word] * times)}


def _word_list(rng):
    return _pick(rng, WORDS, int(rng.integers(3, 6)))


def _first_item(rng):
    items = _word_list(rng)
    return {"items": " ".join(items), "answer": items[0]}


def _last_item(rng):
    items = _word_list(rng)
    return {"items": " ".join(items), "answer": items[-1]}


def _sort_digits(rng):
    digits = [int(d) for d in rng.choice(10, size=3, replace=False)]
    return {"digits": " ".join(map(str, digits)), "answer": " ".join(map(str, sorted(digits)))}


def _reverse(rng):
    letters = _pick(rng, LETTERS, 3)
    return {"letters": " ".join(letters), "answer": " ".join(reversed(letters))}


def _category(rng):
    word = _pick(rng, WORDS)
    return {"word": word, "answer": _CATEGORY_OF[word]}


def _next_letter(rng):
    letter = _pick(rng, LETTERS[:-1])
    return {"letter": letter, "answer": LETTERS[LETTERS.index(letter) + 1]}


# Phrasings are composed: a frame (shared by every family) places an instruction wording
# (specific to the family) before or after the input. Training sees every frame and every
# wording, but three frame x wording combinations per family are held out for evaluation: a
# held-out phrasing is a template string the model has never been trained on, built only from
# parts it has seen, the way FLAN evaluates unseen templates of known tasks. Frames 0, 2, 5
# put the instruction first, frames 1, 3, 4 after the input.
FRAMES = (
    "{instruction}: {input}",
    "{input} {instruction}.",
    "Q: {instruction}. {input} A:",
    "{here}: {input}. {instruction}.",
    "{label}: {input}. {instruction}.",
    "{instruction}. {label}: {input}",
)
_HELDOUT_PER_FAMILY = 3


def compose_templates(index: int, field: str, here: str, label: str, wordings: tuple[str, ...]) -> tuple[list[Template], list[Template]]:
    """(train, held-out) templates for the family at `index` in the family list.

    Held-out combinations use frames index, index+2, index+4 (so both instruction positions)
    with consecutive wordings, so each family holds out different combinations.
    """
    heldout_pairs = {((index + 2 * k) % len(FRAMES), (index + k) % len(wordings)) for k in range(_HELDOUT_PER_FAMILY)}
    train, heldout = [], []
    for f, frame in enumerate(FRAMES):
        for w, wording in enumerate(wordings):
            pattern = frame.format(instruction=wording, input="{" + field + "}", here=here, label=label)
            (heldout if (f, w) in heldout_pairs else train).append((pattern, "{answer}"))
    return train, heldout


_SPECS = (
    # name, field generator, input field, "here" phrase, label, instruction wordings
    ("uppercase", _uppercase, "word", "Here is a word", "Word",
     ("Write it in capital letters", "Give it in uppercase", "Convert it to uppercase", "Spell it in capitals")),
    ("count", _count, "items", "Here are some letters", "Letters",
     ("Count the letters", "Tell me how many letters there are", "Give the number of letters", "Say how many letters it has")),
    ("opposite", _opposite, "word", "Here is a word", "Word",
     ("Give its opposite", "Write the opposite word", "Tell me the opposite", "Output the word with the opposite meaning")),
    ("next_number", _next_number, "number", "Here is a number", "Number",
     ("Give the next number", "Add one to it", "Write the number that comes after it", "Tell me the number that follows")),
    ("repeat", _repeat, "word", "Here is a word", "Word",
     ("Repeat it {times} times", "Write it {times} times", "Say it {times} times", "Output the word {times} times")),
    ("first_item", _first_item, "items", "Here are some words", "Words",
     ("Give the first word", "Tell me which word comes first", "Output the first item", "Write the word at the start")),
    ("last_item", _last_item, "items", "Here are some words", "Words",
     ("Give the last word", "Tell me which word comes last", "Output the last item", "Write the word at the end")),
    ("sort_digits", _sort_digits, "digits", "Here are some digits", "Digits",
     ("Sort them from smallest to largest", "Put the digits in order", "Write them in increasing order", "Give them sorted, smallest first")),
    ("reverse", _reverse, "letters", "Here are some letters", "Letters",
     ("Write them backwards", "Reverse their order", "Give them in reverse order", "Say them backwards")),
    ("category", _category, "word", "Here is a word", "Word",
     ("Give its category", "Tell me what kind of thing it is", "Say which category it is in", "Write its category: animal, colour, fruit or object")),
    ("next_letter", _next_letter, "letter", "Here is a letter", "Letter",
     ("Give the next letter", "Write the letter that comes after it", "Tell me the letter that follows", "Output the next letter of the alphabet")),
)
_FAMILIES = [
    TaskFamily(name, make_fields, *compose_templates(i, field, here, label, wordings))
    for i, (name, make_fields, field, here, label, wordings) in enumerate(_SPECS)
]
FAMILIES: dict[str, TaskFamily] = {f.name: f for f in _FAMILIES}


def generate_records(num_examples: int, *, seed: int) -> list[dict]:
    """``num_examples`` records like ``{"task": "count", "items": "a b b", "answer": "3"}``.

    Families come in shuffled rounds (each round has every family once), so any prefix is
    balanced and the output for ``n`` is a prefix of the output for ``n + k``. Use
    different seeds for train and eval so evaluation sees mostly unseen inputs.
    """
    rng = np.random.default_rng(seed)
    names = list(FAMILIES)
    records: list[dict] = []
    while len(records) < num_examples:
        for i in rng.permutation(len(names)):
            if len(records) == num_examples:
                break
            family = FAMILIES[names[int(i)]]
            records.append({"task": family.name, **family.make_fields(rng)})
    return records


def templates(split: str) -> dict[str, list[Template]]:
    """Phrasings per family: ``"train"`` ones, or ``"heldout"`` ones for evaluation."""
    if split == "train":
        return {name: list(f.train_templates) for name, f in FAMILIES.items()}
    if split == "heldout":
        return {name: list(f.heldout_templates) for name, f in FAMILIES.items()}
    raise ValueError(f"unknown quickstart template split {split!r}; expected 'train' or 'heldout'")


def tokenizer_corpus(seed: int = 0, *, records_per_template: int = 100) -> Iterator[str]:
    """Text to train the quickstart tokenizer on: every template (train and held-out)
    rendered over generated records, prompts and targets, so every word is in-vocab."""
    records = generate_records(records_per_template * len(FAMILIES), seed=seed)
    by_task: dict[str, list[dict]] = {name: [] for name in FAMILIES}
    for r in records:
        by_task[r["task"]].append(r)
    for name, family in FAMILIES.items():
        for input_pattern, target_pattern in itertools.chain(family.train_templates, family.heldout_templates):
            for r in by_task[name]:
                yield render(input_pattern, r)
                yield render(target_pattern, r)
