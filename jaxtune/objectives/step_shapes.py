"""Per-step batch shapes that vary a little: packed pair steps (the rows a step's pairs need) and
reward-model rows cut to the batch's longest sequence.

Each is rounded up to a bucket of a short, fixed ladder, so the jitted step compiles a bounded
number of times, and agreed across processes (the largest any process needs), because every
process must hand the same global shape to the same step. Padding added here is empty rows or
columns (segment id 0, no pair in the slot): it changes no loss, metric or gradient.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from jaxtune import distributed

SMALLEST_LENGTH = 16  # the shortest length bucket


def agreed_max(value: int, what: str) -> int:
    """The largest `value` of all processes (one process: `value`)."""
    return max(int(v) for v in distributed.all_gather(int(value), what))


def row_multiple(data_parallel: int, accum: int, process_count: int) -> int:
    """The rows one process's batch must be a multiple of, so that the global batch gives every
    data-parallel device whole rows in every micro-batch."""
    unit = data_parallel * accum
    return unit // int(np.gcd(unit, process_count))


def pad_rows(batch: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """`batch` with empty rows appended (zeros) so that every key has `rows` leading entries."""
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        extra = rows - value.shape[0]
        out[key] = np.concatenate([value, np.zeros((extra,) + value.shape[1:], value.dtype)]) if extra else value
    return out


def length_buckets(seq_len: int) -> list[int]:
    """The lengths a step may take: powers of two from SMALLEST_LENGTH and the halfway points
    between them (16, 24, 32, 48, 64, 96, ...), so at most a third of a row is padding cut late;
    then `seq_len` itself. About 2 log2(seq_len / 16) shapes."""
    buckets, power = [], SMALLEST_LENGTH
    while power < seq_len:
        buckets += [b for b in (power, power * 3 // 2) if b < seq_len]
        power *= 2
    return buckets + [seq_len]


def length_bucket(need: int, seq_len: int) -> int:
    """The shortest of `length_buckets(seq_len)` that holds `need` tokens."""
    return next(b for b in length_buckets(seq_len) if b >= need)


def cut_length(batch: Mapping[str, np.ndarray], keys: Iterable[str], length: int) -> dict[str, np.ndarray]:
    """`batch` with the last axis of `keys` cut to `length` (the columns cut hold only padding)."""
    keys = set(keys)
    return {k: (np.asarray(v)[..., :length] if k in keys else v) for k, v in batch.items()}
