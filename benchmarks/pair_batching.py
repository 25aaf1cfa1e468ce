"""Pairs per step and real-token fraction of preference batches, before and after issue 25's
packing by step (data layer only, no model): DPO padded / packed by row budget (data.pair_batching
='rows') / packed by step ('pairs', rows rounded to the bucket ladder), and reward-model rows padded
to data.seq_len vs cut to the step's length bucket vs packed by step.

    PYTHONPATH=$PWD python benchmarks/pair_batching.py --pairs ../shared/data/hh_rlhf_harmless_base_test.jsonl.gz \
        --seq_len 512 --batch 8 --steps 200 --row_multiple 1

Prints one JSON line. Rows per step are per process; --row_multiple is the data-parallel rows a
process must give (1 on one device).
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np

from jaxtune.config import base_config
from jaxtune.data import datasets, preference
from jaxtune.data.sources import JsonlSource
from jaxtune.data.tokenizers import train_sentencepiece
from jaxtune.objectives import reward_model, step_shapes


def _data(args, work: Path):
    path = Path(args.pairs)
    if path.suffix == ".gz":
        plain = work / path.stem
        if not plain.exists():
            plain.write_bytes(gzip.decompress(path.read_bytes()))
        path = plain
    spm = work / f"spm{args.vocab}.model"
    if not spm.exists():
        source = JsonlSource(str(path))
        train_sentencepiece(list(preference.corpus(source, unpaired=False, limit=len(source))()), spm.with_suffix(""),
                            vocab_size=args.vocab)
    config = base_config()
    config.data.train_path, config.data.tokenizer, config.data.seq_len = str(path), str(spm), args.seq_len
    return config, datasets.load_preference_data(config.data, work, unpaired=False)


def _steps(args, config, data, *, packing, batching="pairs", wrap=None):
    config.data.packing, config.data.pair_batching = packing, batching
    it, stats = datasets.preference_train_dataset(data, config.data, batch_size=args.batch, seed=0, unpaired=False,
                                                  wrap=wrap, packing=packing)
    it = iter(it)
    return [next(it) for _ in range(args.steps)], stats.pipeline


def _summary(batches, pairs, slots) -> dict:
    real = sum(int(np.count_nonzero(b["segment_ids"])) for b in batches)
    return {"pairs_per_step": round(statistics.mean(pairs), 2), "pairs_per_step_min_max": [min(pairs), max(pairs)],
            "real_token_fraction": round(real / slots, 3)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pairs", required=True)
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--row_multiple", type=int, default=1)
    args = p.parse_args()
    work = Path(tempfile.gettempdir()) / "jaxtune_pair_batching"
    work.mkdir(exist_ok=True)
    config, data = _data(args, work)
    out = {"pairs_file": Path(args.pairs).name, "seq_len": args.seq_len, "batch": args.batch, "steps": args.steps}

    padded, _ = _steps(args, config, data, packing=False)
    out["dpo_padded"] = _summary(padded, [args.batch] * len(padded), sum(b["segment_ids"].size for b in padded))
    rows, _ = _steps(args, config, data, packing=True, batching="rows")
    out["dpo_packed_rows"] = _summary(rows, [int(b["pair_mask"].sum()) for b in rows],
                                      sum(b["segment_ids"].size for b in rows))
    steps, stats = _steps(args, config, data, packing=True, batching="pairs")
    bucketed = [stats.step_rows.bucket(len(b["inputs"]), args.row_multiple) for b in steps]
    out["dpo_packed_pairs"] = dict(
        _summary(steps, [int(b["pair_mask"].sum()) for b in steps], sum(r * 2 * args.seq_len for r in bucketed)),
        ladder=stats.step_rows.ladder(args.row_multiple), rows_per_step=round(statistics.mean(bucketed), 2),
        shapes=sorted(set(bucketed)))

    def wrap(transform, task):
        return reward_model.RewardRows(transform, data.tokenizer.pad_id)

    full, _ = _steps(args, config, data, packing=False, wrap=wrap)
    out["reward_padded_to_seq_len"] = _summary(full, [args.batch] * len(full), sum(b["segment_ids"].size for b in full))
    lengths = [step_shapes.length_bucket(int(np.max(np.sum(b["segment_ids"] > 0, -1))), args.seq_len) for b in full]
    out["reward_cut_to_bucket"] = dict(
        _summary(full, [args.batch] * len(full), sum(args.batch * 2 * n for n in lengths)),
        lengths=sorted(set(lengths)))
    packed, stats = _steps(args, config, data, packing=True, wrap=wrap)
    bucketed = [stats.step_rows.bucket(len(b["inputs"]), args.row_multiple) for b in packed]
    out["reward_packed_pairs"] = dict(
        _summary(packed, [int(b["pair_mask"].sum()) for b in packed], sum(r * 2 * args.seq_len for r in bucketed)),
        ladder=stats.step_rows.ladder(args.row_multiple), rows_per_step=round(statistics.mean(bucketed), 2))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
