"""Packed preference pairs (padding-free DPO): many pairs' chosen and rejected sequences per row.

A pair arrives as two padded rows ([2, T], see preference.py). Packing trims them and lays the
chosen sequence and then the rejected one side by side as one unit, so a pair never spans two
rows; Grain's first/best-fit packer fills rows of `2 * seq_len` tokens (the room of one padded
pair) with whole units, at most `max_pairs` per row. Pair k of a row becomes segments 2k + 1
(chosen) and 2k + 2 (rejected), positions restart at 0 in each segment, and the per-pair
numbers (source index, KTO label, precomputed reference log-probs) become [max_pairs] arrays
beside `pair_mask` (1 = a pair is in that slot). A packed batch is therefore rows [R, 2T] plus
pair slots [R, max_pairs]; objectives/segments.py sums log-probs per segment back into pairs.
"""

from __future__ import annotations

from collections.abc import Sequence

import grain
import numpy as np

from jaxtune.batch import BATCH_KEYS, PAIR_MASK_KEY  # PAIR_MASK_KEY [R, max_pairs]: 1 where the slot holds a pair

_SEQUENCE_KEYS = ("inputs", "targets", "loss_mask", "positions", "rejected")
PACKERS = {"first_fit": grain.experimental.FirstFitPackIterDataset,
           "best_fit": grain.experimental.BestFitPackIterDataset}


def row_length(seq_len: int) -> int:
    """Tokens per packed row: the room of one padded pair (two rows of seq_len)."""
    return 2 * seq_len


class PairUnit:
    """Grain map: a padded [2, T] pair -> one variable-length unit (chosen then rejected, trimmed)."""

    def __init__(self, pair_keys: Sequence[str]):
        self.pair_keys = tuple(pair_keys)  # per-pair numbers carried along (index, label, ref log-probs)

    def __call__(self, example: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        lengths = [int(np.count_nonzero(example["segment_ids"][i])) for i in range(2)]
        unit = {key: np.concatenate([example[key][i, :n] for i, n in enumerate(lengths)])
                for key in ("inputs", "targets", "loss_mask", "positions")}
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
        it.map(PairUnit(pair_keys)), length_struct={k: length for k in _SEQUENCE_KEYS}, num_packing_bins=bins,
        shuffle_bins=False, meta_features=tuple(pair_keys), max_sequences_per_bin=max_pairs)
    return packer.map(PackedPairRows(pair_keys, max_pairs))


def packed_keys(pair_keys: Sequence[str]) -> tuple[str, ...]:
    """The keys of a packed pair batch: rows ([R, 2T]) then pair slots ([R, max_pairs])."""
    return BATCH_KEYS + (PAIR_MASK_KEY,) + tuple(pair_keys)
