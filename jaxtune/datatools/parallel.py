"""One ordered map over worker processes, shared by the data tools' per-record work (MinHash, n-gram lookups).

Results come back in input order, so a parallel run gives exactly the sequential result. Workers are
spawned (not forked: the parent may hold JAX's threads) and get their read-only state once through
`initializer(*initargs)` (e.g. the evaluation index), never per record.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from typing import Any


def ordered_map(fn: Callable[[Any], Any], items: Iterable, *, workers: int = 1, chunk: int = 256,
                initializer: Callable | None = None, initargs: tuple = ()) -> Iterator:
    """fn over items in order; with workers > 1, in that many processes (chunks of `chunk` items each)."""
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        yield from map(fn, items)
        return
    with multiprocessing.get_context("spawn").Pool(workers, initializer=initializer, initargs=initargs) as pool:
        yield from pool.imap(fn, items, chunksize=chunk)
