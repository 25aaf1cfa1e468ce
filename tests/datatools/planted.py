"""Small record sets with planted duplicates and eval overlaps (exact counts known by construction)."""

from __future__ import annotations

import json
import random
from pathlib import Path

VOCAB = [f"{a}{b}" for a in ("ka", "lo", "mi", "nu", "pe", "ri", "su", "ta", "vo", "ze") for b in
         ("bar", "cel", "dun", "fim", "gor", "hep", "jix", "kol", "mur", "nop", "qas", "rit", "sov", "tuk", "wez")]


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def unique_records(n: int, seed: int, words: int = 40) -> list[dict]:
    """Alpaca records whose texts share no 5-gram (random words from 150: collisions are vanishingly rare)."""
    rng = random.Random(seed)
    return [{"instruction": sentence(rng, words), "input": "", "output": sentence(rng, 8)} for _ in range(n)]


def one_word_changed(record: dict, position: int = 50) -> dict:
    words = record["instruction"].split()
    words[position] = "CHANGED" if words[position] != "CHANGED" else "OTHER"
    return {**record, "instruction": " ".join(words)}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def dedup_set() -> tuple[list[dict], dict[int, int], dict[int, int]]:
    """50 records = 41 originals (first 4 long: 100 words) + 5 exact copies + 4 near copies (one word of
    100 changed: Jaccard of 5-gram sets = 91/101 = 0.90), spread through the file.
    Returns (records, {exact copy line: original line}, {near copy line: original line}) (1-based lines)."""
    originals = unique_records(4, seed=1, words=100) + unique_records(37, seed=2)
    records = list(originals)
    exact, near = {}, {}
    # Exact copies: the same text up to case, punctuation and whitespace (normalised equal).
    for k, source in enumerate((5, 9, 20, 30, 40)):
        r = dict(originals[source])
        if k % 2:
            r["instruction"] = r["instruction"].upper().replace(" ", "  ,  ") + "!"
        records.insert(source + 3 + k, r)
    for k, source in enumerate(range(4)):
        records.append(one_word_changed(originals[source]))
    line_of = {id(r): i + 1 for i, r in enumerate(records)}
    for i, r in enumerate(records):
        for j, o in enumerate(originals):
            if r is not o and r["instruction"].lower().replace("  ,  ", " ").rstrip("!") == o["instruction"]:
                exact[i + 1] = line_of[id(o)]
            elif r is not o and j < 4 and "CHANGED" in r["instruction"] and r["output"] == o["output"]:
                near[i + 1] = line_of[id(o)]
    return records, exact, near
