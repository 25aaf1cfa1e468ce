"""Packed preference pairs (padding-free DPO): many pairs' chosen and rejected sequences per row.

A pair arrives as two padded rows ([2, T], see preference.py). Packing trims them and lays the
chosen sequence and then the rejected one side by side as one unit, so a pair never spans two
rows; Grain's first/best-fit packer fills rows of `2 * seq_len` tokens (the room of one padded
pair) with whole units, at most `max_pairs` per row. Pair k of a row becomes segments 2k + 1
(chosen) and 2k + 2 (rejected), positions restart at 0 in each segment, and the per-pair
numbers (source index, KTO label, precomputed reference log-probs) become [max_pairs] arrays
beside `pair_mask` (1 = a pair is in that slot). A packed batch is therefore rows [R, 2T] plus
pair slots [R, max_pairs]; objectives/segments.py sums log-probs per segment back into pairs.

Two ways to batch packed pairs (`data.pair_batching`):

* ``pairs`` (the default): a step holds exactly the step's pairs (train.global_batch_size, split
  evenly over processes and data shards), as the padded layout does, so packing changes only the
  padding and never what a step trains on. `pack_steps` takes each shard's next pairs in stream
  order (none dropped, none moved to another step) and packs them first-fit-decreasing into as
  many rows as they need. Row counts come from a short ladder of buckets (`StepRows`): the base
  is the rows a step needs at the 90th percentile of the data's length statistics (the first
  records of each source, tokenized), and a step that does not fit goes to the next bucket,
  twice as many rows, up to one pair per row (always enough). So at most
  log2(pairs / base) + 1 shapes are ever compiled. The trainer-side objective picks the bucket
  (a multiple of the data-parallel rows, the same on every process) and pads with empty rows.
* ``rows``: the row budget of earlier versions: train.global_batch_size packed rows, each filled
  by Grain's first/best-fit packer with up to `max_pairs` pairs, so a step holds a varying
  number of pairs (more pairs per step than the padded layout; the loss is still a mean per pair).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import grain
import numpy as np

from jaxtune.errors import UserError
from jaxtune.batch import BATCH_KEYS, PAIR_MASK_KEY  # PAIR_MASK_KEY [R, max_pairs]: 1 where the slot holds a pair

BATCHINGS = ("pairs", "rows")  # data.pair_batching: a step is train.global_batch_size pairs | packed rows
ROW_QUANTILE = 0.9  # the base row count fits this fraction of the sampled steps
SAMPLE_RECORDS = 256  # records per source whose lengths set the base row count
PACKERS = {"first_fit": grain.experimental.FirstFitPackIterDataset,
           "best_fit": grain.experimental.BestFitPackIterDataset}


def row_length(seq_len: int) -> int:
    """Tokens per packed row: the room of one padded pair (two rows of seq_len)."""
    return 2 * seq_len


SEQUENCE_KEYS = ("inputs", "targets", "loss_mask", "positions")  # per-token keys a unit concatenates
_PACKED_KEYS = SEQUENCE_KEYS + ("rejected",)  # what Grain's packer lays out per token


class PairUnit:
    """Grain map: a padded [2, T] pair -> one variable-length unit (chosen then rejected, trimmed)."""

    def __init__(self, pair_keys: Sequence[str], sequence_keys: Sequence[str] = SEQUENCE_KEYS):
        self.pair_keys = tuple(pair_keys)  # per-pair numbers carried along (index, label, ref log-probs)
        self.sequence_keys = tuple(sequence_keys)

    def __call__(self, example: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        lengths = [int(np.count_nonzero(example["segment_ids"][i])) for i in range(2)]
        unit = {key: np.concatenate([example[key][i, :n] for i, n in enumerate(lengths)])
                for key in self.sequence_keys}
        unit["rejected"] = np.repeat(np.arange(2, dtype=np.int32), lengths)
        unit.update({key: example[key] for key in self.pair_keys})
        return unit


class PackedPairRows:
    """Grain map: a packer's bin -> a packed row in the batch contract plus [max_pairs] pair slots."""

    def __init__(self, pair_keys: Sequence[str], max_pairs: int):
        self.pair_keys, self.max_pairs = tuple(pair_keys), max_pairs

    def __call__(self, packed: dict) -> dict[str, np.ndarray]:
        unit = packed["inputs_segment_ids"]  # 1.. per packed pair, 0 = padding
        row = {key: packed[key] for key in ("inputs", "targets", "loss_mask", "positions")}
        row["segment_ids"] = np.where(unit > 0, 2 * (unit - 1) + packed["rejected"] + 1, 0).astype(np.int32)
        n = len(packed[self.pair_keys[0]]) if self.pair_keys else int(unit.max())
        row[PAIR_MASK_KEY] = (np.arange(self.max_pairs) < n).astype(np.int32)
        for key in self.pair_keys:
            values = np.asarray(packed[key])
            slots = np.zeros(self.max_pairs, values.dtype)
            slots[: len(values)] = values
            row[key] = slots
        return row


def pack_pairs(it: grain.IterDataset, *, seq_len: int, max_pairs: int, pair_keys: Sequence[str], bins: int,
               strategy: str = "first_fit") -> grain.IterDataset:
    """[2, T] padded pairs -> packed rows of `row_length(seq_len)` tokens holding up to `max_pairs` pairs."""
    length = row_length(seq_len)
    packer = PACKERS[strategy](
        it.map(PairUnit(pair_keys)), length_struct={k: length for k in _PACKED_KEYS}, num_packing_bins=bins,
        shuffle_bins=False, meta_features=tuple(pair_keys), max_sequences_per_bin=max_pairs)
    return packer.map(PackedPairRows(pair_keys, max_pairs))


def packed_keys(pair_keys: Sequence[str]) -> tuple[str, ...]:
    """The keys of a packed pair batch: rows ([R, 2T]) then pair slots ([R, max_pairs])."""
    return BATCH_KEYS + (PAIR_MASK_KEY,) + tuple(pair_keys)


def first_fit_decreasing(lengths: Sequence[int], capacity: int, max_items: int) -> list[list[int]]:
    """Bins of item indices: longest first, each into the first bin with room (tokens and items)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"a pair of {n} tokens does not fit a row of {capacity}")
        b = next((b for b in range(len(bins)) if room[b] >= n and len(bins[b]) < max_items), None)
        if b is None:
            bins.append([])
            room.append(capacity)
            b = len(bins) - 1
        bins[b].append(i)
        room[b] -= n
    return bins


class StepPacker:
    """Grain batch_fn: one step's pair units (PairUnit) -> packed rows holding exactly those pairs.

    Rows [n, 2T] (n = the rows these pairs need, first-fit-decreasing) and pair slots
    [n, max_pairs] (or [n, max_pairs, 2] for a [2]-valued key), in the layout PackedPairRows gives
    the row-budget packer. `offset_keys`: per-pair [2] token positions within the pair's two
    sequences (a reward model's score index), moved to where those sequences sit in the row.
    """

    def __init__(self, seq_len: int, pair_keys: Sequence[str], max_pairs: int,
                 sequence_keys: Sequence[str] = SEQUENCE_KEYS, offset_keys: Sequence[str] = ()):
        self.length, self.pair_keys, self.max_pairs = row_length(seq_len), tuple(pair_keys), max_pairs
        self.sequence_keys, self.offset_keys = tuple(sequence_keys), tuple(offset_keys)

    def __call__(self, units: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        bins = first_fit_decreasing([len(u["inputs"]) for u in units], self.length, self.max_pairs)
        rows = {key: np.zeros((len(bins), self.length), np.int32) for key in self.sequence_keys + ("segment_ids",)}
        rows[PAIR_MASK_KEY] = np.zeros((len(bins), self.max_pairs), np.int32)
        for key in self.pair_keys:
            value = np.asarray(units[0][key])
            rows[key] = np.zeros((len(bins), self.max_pairs) + value.shape, value.dtype)
        for r, members in enumerate(bins):
            at = 0
            for k, i in enumerate(members):
                unit = units[i]
                n = len(unit["inputs"])
                for key in self.sequence_keys:
                    rows[key][r, at:at + n] = unit[key]
                rows["segment_ids"][r, at:at + n] = 2 * k + 1 + unit["rejected"]
                rows[PAIR_MASK_KEY][r, k] = 1
                for key in self.pair_keys:
                    rows[key][r, k] = unit[key]
                starts = np.array([at, at + int(np.count_nonzero(unit["rejected"] == 0))])
                for key in self.offset_keys:
                    rows[key][r, k] = starts + np.asarray(unit[key])
                at += n
        return rows


def pack_steps(it: grain.IterDataset, *, seq_len: int, max_pairs: int, pair_keys: Sequence[str], pairs: int,
               sequence_keys: Sequence[str] = SEQUENCE_KEYS, offset_keys: Sequence[str] = ()) -> grain.IterDataset:
    """[2, T] padded pairs -> one element per step: exactly `pairs` pairs, packed into the rows they need."""
    packer = StepPacker(seq_len, pair_keys, max_pairs, sequence_keys, offset_keys)
    return it.map(PairUnit(pair_keys, sequence_keys)).batch(pairs, drop_remainder=True, batch_fn=packer)


@dataclasses.dataclass(frozen=True)
class StepRows:
    """The row counts a process's packed step may take: base, 2 x base, 4 x base ... up to `top`.

    `base` comes from the data's length statistics (`estimate_step_rows`); `top` is the process's
    pairs per step (one pair per row, enough for any step). Each rung is rounded up to `multiple`
    (the rows one process must give so that every device and micro-batch gets whole rows).
    """

    base: int
    top: int

    def ladder(self, multiple: int = 1) -> list[int]:
        rungs, rows = [], max(1, self.base)
        while True:
            rung = min(-(-rows // multiple) * multiple, self.top)
            rungs.append(rung)
            if rung >= self.top:
                return sorted(set(rungs))
            rows *= 2

    def bucket(self, need: int, multiple: int = 1) -> int:
        """The smallest rung that holds `need` rows."""
        for rung in self.ladder(multiple):
            if rung >= need:
                return rung
        raise ValueError(f"a step needs {need} rows, more than its {self.top} pairs")


def estimate_step_rows(lengths: Sequence[int], *, seq_len: int, max_pairs: int, pairs_per_shard: int,
                       shards: int) -> StepRows:
    """StepRows for a process that packs `shards` slices of `pairs_per_shard` pairs each, from sampled
    pair lengths (chosen + rejected tokens): consecutive groups of the sample are packed as a step
    would be, and the base is the ROW_QUANTILE quantile of the rows they needed."""
    top = pairs_per_shard * shards
    if not lengths:
        return StepRows(base=top, top=top)
    sample = list(lengths)
    while len(sample) < pairs_per_shard:
        sample += list(lengths)
    groups = [sample[i:i + pairs_per_shard] for i in range(0, len(sample) - pairs_per_shard + 1, pairs_per_shard)]
    needed = sorted(len(first_fit_decreasing(g, row_length(seq_len), max_pairs)) for g in groups)
    rows = needed[min(len(needed) - 1, int(np.ceil(ROW_QUANTILE * len(needed))) - 1)]
    return StepRows(base=min(top, rows * shards), top=top)


def sample_lengths(sources: Sequence[Sequence[dict]], transforms: Sequence[Callable], *,
                   limit: int = SAMPLE_RECORDS) -> list[int]:
    """Tokens per pair (chosen + rejected rows) of the first `limit` records of each source, through
    the training transforms; records the transform drops or rejects are left out of the sample.
    The transforms' counters are left as they were (the sample is not training data)."""
    lengths = []
    for source, transform in zip(sources, transforms):
        counters = transform.stats
        before = dataclasses.replace(counters)
        for index in range(min(limit, len(source))):
            try:
                rows = transform(index, source[index])
            except UserError:  # a bad record: the training pass reports it (or skips it) itself
                continue
            if rows is not None:
                lengths.append(int(np.count_nonzero(rows["segment_ids"])))
        for field in dataclasses.fields(before):
            setattr(counters, field.name, getattr(before, field.name))
    return lengths
