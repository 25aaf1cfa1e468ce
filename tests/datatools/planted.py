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


def _words(rng: random.Random, n: int) -> list[str]:
    return [f"t{rng.randrange(10**7)}" for _ in range(n)]


def jaccard_planted(seed: int, originals: int = 600, perturbed: int = 400, each: int = 30, n: int = 5
                    ) -> tuple[list[dict], dict[int, str]]:
    """Alpaca records (with id/source metadata) and planted copies: `perturbed` copies whose instruction
    has k words replaced (spaced n apart, so each replacement changes exactly n shingles) with k chosen
    for a Jaccard similarity drawn in [0.70, 0.97]; `each` exact copies (case and punctuation changed),
    copies differing only in metadata (id, source, most_similar) and field-swapped copies (instruction
    and output exchanged). Returns (records in file order, {position: kind of planted copy})."""
    rng = random.Random(seed)
    base = []
    for i in range(originals):
        words = _words(rng, rng.randrange(30, 160))
        base.append({"id": f"r{i}", "instruction": " ".join(words), "input": "", "output": " ".join(_words(rng, 12)),
                     "source": "seed"})
    copies: list[tuple[int, dict, str]] = []
    targets = rng.sample(range(originals), perturbed + 3 * each)
    for t in targets[:perturbed]:
        words = base[t]["instruction"].split()
        total = (len(words) - n + 1) + (12 - n + 1)
        goal = rng.uniform(0.70, 0.97)
        k = max(1, min(round(total * (1 - goal) / (n * (1 + goal))), (len(words) - 2 * n) // n))
        for j in range(k):
            words[n + j * n] = f"x{rng.randrange(10**7)}"
        copies.append((t, {**base[t], "id": f"p{t}", "instruction": " ".join(words)}, "perturbed"))
    for t in targets[perturbed : perturbed + each]:
        copies.append((t, {**base[t], "instruction": base[t]["instruction"].upper().replace(" ", " ,  ") + "!"}, "exact"))
    for t in targets[perturbed + each : perturbed + 2 * each]:
        copies.append((t, {**base[t], "id": f"m{t}", "source": "self-instruct", "most_similar": base[t]["id"]}, "metadata"))
    for t in targets[perturbed + 2 * each :]:
        copies.append((t, {**base[t], "instruction": base[t]["output"], "output": base[t]["instruction"]}, "swapped"))
    records = list(base)
    kinds: dict[int, str] = {}
    for t, copy, kind in copies:  # each copy somewhere after its original
        at = next(i for i, r in enumerate(records) if r is base[t])
        position = rng.randrange(at + 1, len(records) + 1)
        records.insert(position, copy)
        kinds[id(copy)] = kind
    return records, {i: kinds[id(r)] for i, r in enumerate(records) if id(r) in kinds}
