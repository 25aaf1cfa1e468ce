"""The quickstart multitask set: small FLAN-style instruction families, generated.

Sized so a ~1M-parameter model trained from scratch for a few CPU minutes reaches high
exact match on *held-out phrasings* (templates never trained on); see
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
    letters = _pick(rng, LETTERS, int(rng.integers(3, 5)))
    return {"letters": " ".join(letters), "answer": " ".join(reversed(letters))}


def _category(rng):
    word = _pick(rng, WORDS)
    return {"word": word, "answer": _CATEGORY_OF[word]}


def _next_letter(rng):
    letter = _pick(rng, LETTERS[:-1])
    return {"letter": letter, "answer": LETTERS[LETTERS.index(letter) + 1]}


def _t(*inputs: str) -> list[Template]:
    return [(i, "{answer}") for i in inputs]


# Training phrasings put the instruction before the input and after it; held-out ones are
# new sentences made of words that training phrasings (of any family) use.
_FAMILIES = [
    TaskFamily(
        "uppercase",
        _uppercase,
        _t(
            "Write {word} in capital letters.",
            "Uppercase: {word}",
            "Convert the word {word} to uppercase.",
            "{word} Write this word in uppercase:",
            "Word: {word}. Give it in capital letters.",
            "Q: What is {word} in capital letters? A:",
            "{word} In uppercase:",
            "Here is a word: {word}. Output it in uppercase.",
        ),
        _t(
            "Tell me the word {word} with only capital letters.",
            "{word} Convert it to capital letters.",
        ),
    ),
    TaskFamily(
        "count",
        _count,
        _t(
            "How many letters are in this list: {items}?",
            "Count the letters: {items}",
            "{items} How many letters are there?",
            "List: {items}. Count the items.",
            "Q: How many items are in {items}? A:",
            "{items} Number of letters:",
            "Tell me how many letters there are in {items}.",
            "Here are some letters: {items}. How many are there?",
        ),
        _t(
            "Give the number of letters in {items}.",
            "{items} Tell me the number of items.",
        ),
    ),
    TaskFamily(
        "opposite",
        _opposite,
        _t(
            "What is the opposite of {word}?",
            "Opposite of {word}:",
            "{word} The opposite word is:",
            "Give the opposite of the word {word}.",
            "Word: {word}. Write its opposite.",
            "Q: Which word is the opposite of {word}? A:",
            "{word} What is its opposite?",
        ),
        _t(
            "Here is a word: {word}. Output its opposite.",
            "{word} Tell me the opposite of this word.",
        ),
    ),
    TaskFamily(
        "next_number",
        _next_number,
        _t(
            "What number comes after {number}?",
            "Next number after {number}:",
            "{number} What is the next number?",
            "Add one to {number}.",
            "Number: {number}. Give the number that follows it.",
            "Q: Which number is one more than {number}? A:",
            "{number} The next number is:",
        ),
        _t(
            "Here is a number: {number}. Write the number that comes next.",
            "{number} Tell me the number after this one.",
        ),
    ),
    TaskFamily(
        "repeat",
        _repeat,
        _t(
            "Repeat {word} {times} times.",
            "Write the word {word} {times} times.",
            "{word} Repeat this word {times} times:",
            "Say {word} {times} times.",
            "Word: {word}. Times: {times}. Repeat it.",
            "Q: What is {word} repeated {times} times? A:",
        ),
        _t(
            "Here is a word: {word}. Output it {times} times.",
            "{times} times, write the word {word}.",
        ),
    ),
    TaskFamily(
        "first_item",
        _first_item,
        _t(
            "What is the first word in this list: {items}?",
            "First item: {items}",
            "{items} Which word comes first?",
            "List: {items}. Give the first word.",
            "Q: What is the first item of {items}? A:",
            "{items} The first one is:",
            "Here are some words: {items}. Output the first one.",
        ),
        _t(
            "Tell me only the first of these words: {items}",
            "{items} Give me the word that comes first.",
        ),
    ),
    TaskFamily(
        "last_item",
        _last_item,
        _t(
            "What is the last word in this list: {items}?",
            "Last item: {items}",
            "{items} Which word comes last?",
            "List: {items}. Give the last word.",
            "Q: What is the last item of {items}? A:",
            "{items} The last one is:",
            "Here are some words: {items}. Output the last one.",
        ),
        _t(
            "Tell me only the last of these words: {items}",
            "{items} Give me the word that comes last.",
        ),
    ),
    TaskFamily(
        "sort_digits",
        _sort_digits,
        _t(
            "Sort these digits: {digits}",
            "Sort {digits} from smallest to largest.",
            "{digits} Sort them in order:",
            "Put the digits {digits} in order.",
            "Digits: {digits}. Write them from smallest to largest.",
            "Q: What is {digits} sorted? A:",
            "Write {digits} with the smallest digit first.",
        ),
        _t(
            "Here are some digits: {digits}. Output them in order, smallest first.",
            "{digits} Tell me these digits in order.",
        ),
    ),
    TaskFamily(
        "reverse",
        _reverse,
        _t(
            "Reverse the list: {letters}",
            "Write {letters} backwards.",
            "{letters} Reverse the order:",
            "Letters: {letters}. Give them in reverse order.",
            "Q: What is {letters} backwards? A:",
            "{letters} Write these letters backwards.",
        ),
        _t(
            "Here are some letters: {letters}. Output them backwards.",
            "{letters} Tell me these letters in reverse order.",
        ),
    ),
    TaskFamily(
        "category",
        _category,
        _t(
            "What kind of thing is {word}?",
            "Category of {word}:",
            "{word} Is it an animal, a colour, a fruit or an object?",
            "Word: {word}. Give its category.",
            "Q: Which category is {word} in? A:",
            "{word} Category:",
        ),
        _t(
            "Here is a word: {word}. Tell me what kind of thing it is.",
            "Give the category of this word: {word}",
        ),
    ),
    TaskFamily(
        "next_letter",
        _next_letter,
        _t(
            "What letter comes after {letter}?",
            "Next letter after {letter}:",
            "{letter} What is the next letter?",
            "Letter: {letter}. Give the letter that follows it.",
            "Q: Which letter is after {letter} in the alphabet? A:",
            "{letter} The next letter is:",
            "Give only the letter after {letter}.",
        ),
        _t(
            "Here is a letter: {letter}. Output the letter that comes next.",
            "{letter} Tell me the letter after this one.",
        ),
    ),
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
