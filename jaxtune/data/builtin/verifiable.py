"""A built-in verifiable task set for RL (GRPO): generated problems whose answers a program checks.

Two families, each record carrying what its reward function reads:
- ``arithmetic``: short multi-step word problems ("Mia has 3 pens. She finds 4 more. She gives
  away 2. How many pens does Mia have now?") with the numeric ``answer`` (reward: ``math``) and a
  worked ``solution`` ending in ``#### N`` (the SFT target);
- ``constraints``: "List 3 animals in lowercase."-style prompts with their IFEval-style
  ``constraints`` (reward: ``instructions``) and one ``solution`` that satisfies them.

Every record has the same keys (``task``, ``prompt``, ``solution``, ``answer``, ``constraints``;
the field a family does not use is None, and reward functions return None there), so one batch
can mix both families. The held-out split is disjoint by *problem*, not only by seed: a
problem's inputs (numbers and operations, or constraint, category and count) hash to a split, so
no held-out problem is ever trained on. Both splits use the same phrasings: what RL is measured
on is solving unseen problems, not reading unseen wordings (a from-scratch SFT model of this
size does not transfer to a question phrasing it never saw).

Sized for a ~1M-parameter model trained from scratch on the SFT targets for a few CPU minutes:
numbers stay single-digit per step (the quickstart calibration found multi-digit addition out of
reach), so the SFT model is right on some problems and wrong on others when sampling, which is
what group-relative advantages need.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from jaxtune.data.builtin.quickstart import CATEGORIES

NAMES = ("Tom", "Ann", "Sam", "Mia", "Ben", "Eva", "Max", "Zoe")
ITEMS = ("apples", "pens", "cards", "coins", "books", "shells", "eggs", "cups")
# (verb phrase, sign); "{n}" is the amount.
GAINS = ("buys {n} more", "finds {n} more", "gets {n} more")
LOSSES = ("gives away {n}", "loses {n}", "sells {n}")
QUESTIONS = ("How many {items} does {name} have now?", "How many {items} are left?",
             "How many {items} does {name} have at the end?")
# Constraint prompts: kind -> wordings. {n} = count, {category} = word category.
_CONSTRAINT_KINDS = {
    "lowercase": ("List {n} {category}s in lowercase.", "Name {n} {category}s in small letters.",
                  "Write {n} {category}s, all lowercase."),
    "uppercase": ("List {n} {category}s in capital letters.", "Name {n} {category}s in uppercase.",
                  "Write {n} {category}s, all in capitals."),
    "bullets": ("List {n} {category}s as bullet points.", "Give {n} {category}s, one bullet each.",
                "Write {n} {category}s as a bulleted list."),
    "ends_with": ("Name {n} {category}s and end with the word done.", "List {n} {category}s, then say done.",
                  "Write {n} {category}s and finish with done."),
}
SPLITS = ("train", "heldout")
HELDOUT_FRACTION = 0.2


def _split_of(key: tuple) -> str:
    digest = hashlib.sha256(json.dumps(key).encode()).digest()
    return "heldout" if digest[0] < HELDOUT_FRACTION * 256 else "train"


def _arithmetic(rng: np.random.Generator, split: str, max_steps: int, min_steps: int = 1) -> dict | None:
    steps = int(rng.integers(min_steps, max_steps + 1))
    start = int(rng.integers(1, 10))
    ops, value = [], start
    for _ in range(steps):
        if value > 1 and rng.random() < 0.5:
            n = int(rng.integers(1, min(value, 9) + 1))
            ops.append(("-", n))
            value -= n
        else:
            n = int(rng.integers(1, 10))
            ops.append(("+", n))
            value += n
    if _split_of(("arithmetic", start, ops)) != split:
        return None
    name, items = NAMES[int(rng.integers(len(NAMES)))], ITEMS[int(rng.integers(len(ITEMS)))]
    sentences = [f"{name} has {start} {items}."]
    work, current = [], start
    for sign, n in ops:
        verbs = GAINS if sign == "+" else LOSSES
        sentences.append("Then " + ("he" if name in ("Tom", "Sam", "Ben", "Max") else "she") + " "
                         + verbs[int(rng.integers(len(verbs)))].format(n=n) + ".")
        new = current + n if sign == "+" else current - n
        work.append(f"{current} {sign} {n} = {new}.")
        current = new
    sentences.append(QUESTIONS[int(rng.integers(len(QUESTIONS)))].format(items=items, name=name))
    return {"task": "arithmetic", "prompt": " ".join(sentences), "solution": " ".join(work) + f" #### {value}",
            "answer": str(value), "constraints": None}


def _constraint(rng: np.random.Generator, split: str) -> dict | None:
    kind = list(_CONSTRAINT_KINDS)[int(rng.integers(len(_CONSTRAINT_KINDS)))]
    category = list(CATEGORIES)[int(rng.integers(len(CATEGORIES)))]
    n = int(rng.integers(2, 5))
    if _split_of(("constraints", kind, category, n)) != split:
        return None
    wordings = _CONSTRAINT_KINDS[kind]
    prompt = wordings[int(rng.integers(len(wordings)))].format(n=n, category=category)
    chosen = [CATEGORIES[category][int(i)] for i in rng.choice(len(CATEGORIES[category]), size=n, replace=False)]
    count = {"type": "word_count", "relation": "exactly", "n": n}
    if kind == "lowercase":
        solution, constraints = " ".join(chosen), [{"type": "lowercase"}, count]
    elif kind == "uppercase":
        solution, constraints = " ".join(w.upper() for w in chosen), [{"type": "uppercase"}, count]
    elif kind == "bullets":
        solution, constraints = "\n".join(f"* {w}" for w in chosen), [{"type": "bullet_count", "n": n}, count]
    else:
        solution = " ".join(chosen) + " done"
        constraints = [{"type": "ends_with", "phrase": "done"}, {**count, "n": n + 1}]
    return {"task": "constraints", "prompt": prompt, "solution": solution, "answer": None, "constraints": constraints}


FAMILIES = ("arithmetic", "constraints")


def check_families(families, key: str = "data.verifiable_families") -> tuple[str, ...]:
    """The configured families, or a UserError naming the config key."""
    from jaxtune.errors import UserError

    families = tuple(families)
    if not families or any(f not in FAMILIES for f in families):
        raise UserError(f"config key '{key}' must be a non-empty tuple of {', '.join(FAMILIES)}; got {families!r}")
    return families


def generate_records(num_examples: int, *, split: str = "train", seed: int = 0, families=FAMILIES,
                     max_steps: int = 2, min_steps: int = 1) -> list[dict]:
    """``num_examples`` records of ``split`` ("train" or "heldout"), families in turn.

    Deterministic for (split, seed); problems of one split never occur in the other.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        raise ValueError(f"unknown families {unknown}; expected some of {FAMILIES}")
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    records: list[dict] = []
    while len(records) < num_examples:
        family = families[len(records) % len(families)]
        record = _arithmetic(rng, split, max_steps, min_steps) if family == "arithmetic" else _constraint(rng, split)
        if record is not None:
            records.append(record)
    return records


def tokenizer_corpus(seed: int = 0, num_examples: int = 4000, max_steps: int = 2, min_steps: int = 1):
    """Prompts and solutions of both splits (so every word of a held-out wording is in-vocab)."""
    for split in SPLITS:
        for record in generate_records(num_examples // 2, split=split, seed=seed, max_steps=max_steps,
                                       min_steps=min_steps):
            yield record["prompt"]
            yield record["solution"]
