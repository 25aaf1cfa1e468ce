"""Throughput of the instruction-data tools on synthetic Alpaca records, in one process on one CPU core.

    python benchmarks/datatools.py [--records 20000] [--words 120] [--select 500]

Generates `records` Alpaca records (instruction + output of about `words` words from a 5,000-word
vocabulary) with 5% exact and 5% near (one word changed) duplicates, and an evaluation set of
1,000 examples; prints one JSON line of records/s for dedup (exact + MinHash-LSH, 128 permutations,
5-grams), decontamination (13-grams), the quality filters, and the seconds of a diverse selection.
"""

from __future__ import annotations

import argparse
import json
import random
import time

from jaxtune.datatools.decontaminate import decontaminate
from jaxtune.datatools.dedup import dedup
from jaxtune.datatools.quality import QualityFilters, apply_filters, select_diverse
from jaxtune.datatools.records import RecordSet


def _records(n: int, words: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(5000)]
    out = []
    for i in range(n):
        if i and i % 20 == 0:
            out.append(dict(out[rng.randrange(len(out))]))  # exact duplicate
        elif i and i % 20 == 10:
            r = dict(out[rng.randrange(len(out))])
            tokens = r["instruction"].split()
            tokens[len(tokens) // 2] = "changed"
            out.append({**r, "instruction": " ".join(tokens)})  # near duplicate
        else:
            text = " ".join(rng.choice(vocab) for _ in range(words))
            out.append({"instruction": text[: len(text) * 2 // 3], "input": "", "output": text[len(text) * 2 // 3 :]})
    return [{**r, "_where": f"bench:{i + 1}"} for i, r in enumerate(out)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--words", type=int, default=120)
    parser.add_argument("--select", type=int, default=500)
    args = parser.parse_args()
    train = RecordSet("train", _records(args.records, args.words, 0), "synthetic")
    evals = RecordSet("eval", _records(1000, args.words, 1), "synthetic")
    result = {"records": args.records, "words": args.words}
    t = time.perf_counter()
    d = dedup([train])
    result["dedup_records_per_s"] = round(args.records / (time.perf_counter() - t))
    result["dedup_removed"] = len(d.removed)
    t = time.perf_counter()
    c = decontaminate([train], [evals])
    result["decontaminate_records_per_s"] = round(args.records / (time.perf_counter() - t))  # eval index included
    result["contaminated"] = len(c.contaminated)
    t = time.perf_counter()
    apply_filters(train.records, QualityFilters(min_words=3, max_words=2000, scripts=("latin",),
                                                max_duplicate_line_fraction=0.3, max_top_ngram_fraction=0.2,
                                                nonempty=("output",)))
    result["filter_records_per_s"] = round(args.records / (time.perf_counter() - t))
    t = time.perf_counter()
    select_diverse(train.records, args.select)
    result[f"select_{args.select}_diverse_s"] = round(time.perf_counter() - t, 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
