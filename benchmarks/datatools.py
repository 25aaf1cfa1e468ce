"""Throughput and memory of the instruction-data tools on synthetic Alpaca records, streamed from a JSONL file.

    PYTHONPATH=. python benchmarks/datatools.py [--records 20000] [--words 120] [--workers 1] \
        [--stages dedup,decontaminate,filter] [--tmp DIR]
    PYTHONPATH=. python benchmarks/datatools.py --accuracy 4   # dedup precision/recall vs exact truth, 4 seeds

Writes `records` Alpaca records (instruction + output of about `words` words from a 5,000-word
vocabulary; 5% exact and 5% near duplicates: one word changed, copied from the last 5,000 originals;
0.5% with 20 words of a 30-word evaluation prompt planted in the instruction) to a JSONL file, and an
evaluation set of 1,000 prompts; then runs each stage on the file as `jaxtune data` does (records
streamed, never all in memory) and prints one JSON line: records/s per stage (wall clock, the file
read included), what was found, and the process's peak RSS (workers' peak RSS separately).
`--accuracy` builds tests/datatools/planted.py's planted sets (perturbed copies at computed Jaccard
values, exact, metadata-only and field-swapped copies) and scores dedup against the exact greedy truth.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import tempfile
import time
from pathlib import Path

from jaxtune.datatools.decontaminate import DecontaminationSettings, decontaminate
from jaxtune.datatools.dedup import DedupSettings, dedup
from jaxtune.datatools.quality import QualityFilters, filter_stream
from jaxtune.datatools.records import read_files

PLANTED_WORDS = 20  # of a 30-word eval prompt: coverage 0.67, above Tulu 3's 0.5


def write_records(path: Path, n: int, words: int, seed: int, evals: list[dict] | None = None) -> int:
    """Streams the synthetic set to `path`; returns how many records carry a planted eval prompt."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(5000)]
    recent: list[dict] = []
    planted = 0
    carries: set[int] = set()  # id() of originals with a planted eval prompt (their copies carry it too)
    with path.open("w") as f:
        for i in range(n):
            if i and i % 20 == 0:
                source = rng.choice(recent)
                record = dict(source)  # exact duplicate
                planted += id(source) in carries
            elif i and i % 20 == 10:
                source = rng.choice(recent)
                record = dict(source)
                planted += id(source) in carries
                tokens = record["instruction"].split()
                tokens[len(tokens) // 2] = "changed"
                record["instruction"] = " ".join(tokens)  # near duplicate (one word of ~80 changed)
            else:
                text = " ".join(rng.choice(vocab) for _ in range(words))
                record = {"instruction": text[: len(text) * 2 // 3], "input": "", "output": text[len(text) * 2 // 3 :],
                          "id": f"r{i}"}
                if evals and i % 200 == 7:
                    prompt = rng.choice(evals)["prompt"].split()
                    record["instruction"] += " " + " ".join(prompt[:PLANTED_WORDS])
                    planted += 1
                    carries.add(id(record))
                recent.append(record)
                if len(recent) > 5000:
                    carries.discard(id(recent.pop(rng.randrange(len(recent)))))
            f.write(json.dumps(record) + "\n")
    return planted


def _peak_mib() -> dict:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"peak_rss_mib": round(own), "worker_peak_rss_mib": round(children)}


def throughput(args) -> dict:
    result = {"records": args.records, "words": args.words, "workers": args.workers}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        rng = random.Random(1)
        evals = [{"prompt": " ".join(f"e{rng.randrange(10**6)}" for _ in range(30)), "answer": "Sure, here it is."}
                 for _ in range(1000)]
        eval_path = Path(tmp) / "eval.jsonl"
        eval_path.write_text("".join(json.dumps(e) + "\n" for e in evals))
        path = Path(tmp) / "train.jsonl"
        t = time.perf_counter()
        result["planted_contaminated"] = write_records(path, args.records, args.words, 0, evals)
        result["write_s"] = round(time.perf_counter() - t, 1)
        stages = args.stages.split(",")
        if "dedup" in stages:
            t = time.perf_counter()
            d = dedup(read_files([str(path)]), DedupSettings(workers=args.workers))
            seconds = time.perf_counter() - t
            result.update(dedup_s=round(seconds, 1), dedup_records_per_s=round(args.records / seconds),
                          dedup_removed=len(d.removed), dedup_lsh=d.stats)
            del d
        if "decontaminate" in stages:
            t = time.perf_counter()
            c = decontaminate(read_files([str(path)]), read_files([str(eval_path)]),
                              DecontaminationSettings(workers=args.workers))
            seconds = time.perf_counter() - t  # eval index included
            result.update(decontaminate_s=round(seconds, 1), decontaminate_records_per_s=round(args.records / seconds),
                          contaminated=len(c.contaminated))
            del c
        if "filter" in stages:
            # Gopher rules run by datatrove (the synthetic words have no stop words: quality's stop-word
            # rule is off here so that records reach the later rules) and lid.176 language identification
            filters = QualityFilters(min_words=3, max_words=2000, scripts=("latin",), nonempty=("output",),
                                     gopher=("repetition", "quality"), gopher_overrides=(("min_stop_words", None),),
                                     languages=("en",), min_language_score=0.0)
            t = time.perf_counter()
            _, dropped, count, _ = filter_stream(read_files([str(path)])[0].records, filters, args.workers)
            seconds = time.perf_counter() - t
            result.update(filter_records_per_s=round(count / seconds), filter_dropped=len(dropped))
    result.update(_peak_mib())
    return result


def accuracy(seeds: int) -> dict:
    """Precision and recall of dedup's defaults against the exact greedy truth on planted sets."""
    from tests.datatools.planted import jaccard_planted
    from tests.datatools.test_dedup import _set, _truth

    removed = correct = 0
    bands = {"J>=0.85": [0, 0], "0.80<=J<0.85": [0, 0]}
    for seed in range(seeds):
        records, _ = jaccard_planted(100 + seed, originals=3000, perturbed=2000, each=100)
        truth = _truth(records)
        found = {d.index for d in dedup([_set("a", records)]).removed}
        removed += len(found)
        correct += len(found & set(truth))
        for position, j in truth.items():
            band = bands["J>=0.85" if j >= 0.85 else "0.80<=J<0.85"]
            band[0] += position in found
            band[1] += 1
    return {"seeds": seeds, "removed": removed, "precision": correct / removed,
            **{f"recall {k}": f"{found}/{total} = {found / total:.4f}" for k, (found, total) in bands.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--words", type=int, default=120)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--stages", default="dedup,decontaminate,filter")
    parser.add_argument("--tmp", default=None, help="folder for the synthetic files (default: the system's)")
    parser.add_argument("--accuracy", type=int, default=0, metavar="SEEDS")
    args = parser.parse_args()
    print(json.dumps(accuracy(args.accuracy) if args.accuracy else throughput(args)), flush=True)


if __name__ == "__main__":
    main()
