"""Input-pipeline throughput: template + tokenize + pack, in one process on one CPU core.

    python benchmarks/data_pipeline.py [--jsonl PATH] [--seq_len 2048] [--strategy best_fit] [--bins 64]

Reads an Alpaca / Self-Instruct / chat / prompt-response JSONL file (the format is detected from
its first record), or generates instruction-length Alpaca records; trains a SentencePiece
tokenizer on the data (outside the timing) and prints one JSON line with `examples_per_s`,
`tokens_per_s` (non-pad tokens) and `packing_efficiency` (non-pad fraction of the batches).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

from jaxtune.config import task_config
from jaxtune.data import datasets
from jaxtune.data.examples import ExampleBuilder
from jaxtune.data.pipeline import build_dataset
from jaxtune.data.tokenizers import train_sentencepiece

_WORDS = ("the model data train token batch answer question explain write list summary reason example input "
          "output result value number city river history science music story describe compare plan step").split()


def generate_alpaca(path: Path, n: int, seed: int = 0) -> None:
    """Instruction-tuning-shaped records: short instructions, optional inputs, 20-400 word outputs."""
    rng = random.Random(seed)
    words = lambda k: " ".join(rng.choice(_WORDS) for _ in range(k))  # noqa: E731
    with path.open("w") as f:
        for _ in range(n):
            record = {"instruction": words(rng.randint(5, 25)).capitalize() + "?",
                      "input": words(rng.randint(10, 80)) if rng.random() < 0.4 else "",
                      "output": words(int(rng.lognormvariate(4.3, 0.7)) + 20)}
            f.write(json.dumps(record) + "\n")


def detect_format(path: Path) -> str:
    first = json.loads(path.open().readline())
    if "instances" in first:
        return "self_instruct"
    if "messages" in first:
        return "chat"
    return "alpaca" if "instruction" in first else "fields"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jsonl", type=Path, help="data file (default: generated Alpaca records)")
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--strategy", default="best_fit", choices=("first_fit", "best_fit"))
    parser.add_argument("--bins", type=int, default=64, help="open packing bins")
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--vocab_size", type=int, default=8000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = args.jsonl
        if path is None:
            path = Path(tmp) / "alpaca.jsonl"
            generate_alpaca(path, 20_000)
        fmt = detect_format(path)
        task = task_config(path=str(path), format=fmt, chat_template="chatml" if fmt == "chat" else "",
                           templates="alpaca" if fmt != "fields" else (("{prompt}", "{response}"),))
        spec = datasets.task_spec("bench", task)
        corpus = [t for i in range(min(len(spec.records), 5000)) for t in ExampleBuilder(spec, 0, None, seq_len=0, seed=0).texts(spec.records[i], i)]
        tokenizer = train_sentencepiece(corpus, Path(tmp) / "tok", vocab_size=args.vocab_size)
        ds, stats = build_dataset([spec], tokenizer, seq_len=args.seq_len, batch_size=args.batch_size, seed=0,
                                  packing_strategy=args.strategy, packing_bins=args.bins)
        it = iter(ds)
        next(it)  # warm-up: first bins filled
        stats.slots = stats.filled = 0
        start_examples = stats.tasks["bench"].examples
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for _ in range(args.batches):
            next(it)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    examples = stats.tasks["bench"].examples - start_examples
    print(json.dumps({
        "data": str(args.jsonl or "generated alpaca"), "format": fmt, "seq_len": args.seq_len,
        "strategy": args.strategy, "bins": args.bins, "examples": examples,
        "examples_per_s": round(examples / cpu, 1), "tokens_per_s": round(stats.filled / cpu, 1),
        "packing_efficiency": round(stats.packing_efficiency, 4), "cpu_s": round(cpu, 2), "wall_s": round(wall, 2),
        "load_avg_1m": os.getloadavg()[0],
    }))


if __name__ == "__main__":
    main()
