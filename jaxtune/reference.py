"""Precomputed reference log-probs (objective.<dpo|kto>.reference='precomputed').

One forward pass of the reference model over the training pairs, in source order, before
training starts; afterwards the reference model is not needed in memory at all. The result is
a float32 [num_records, 2] table (chosen, rejected; NaN for a pair the truncation policy drops)
keyed by the record's source index, which the data pipeline attaches to each pair as
`ref_chosen_logps` / `ref_rejected_logps`, whatever order training visits the pairs in.

The pass is resumable: it writes `<workdir>/reference_logps/chunk_NNNNN.npy` one chunk at a time
(atomically, by rename) and skips chunks already on disk; `logps.npy` + `done.json` (with a
fingerprint of what the numbers depend on) mark it complete.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxtune import distributed, paths
from jaxtune import workdir as workdir_lib
from jaxtune.data import preference
from jaxtune.errors import UserError

log = logging.getLogger(__name__)

STORE_DIR = workdir_lib.REFERENCE_LOGPS
CHUNK_RECORDS = 4096


def _save_atomic(path, array: np.ndarray) -> None:
    """Locally: write a temporary file and rename it. Object stores (gs://) publish an object whole."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    if paths.is_remote(path):
        path.write_bytes(buffer.getvalue())
        return
    tmp = path.with_name(path.name + ".tmp.npy")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)


def _chunk(
    score_fn: Callable, source: Sequence[dict], transform: preference.PreferenceTransform, keys: Sequence[str],
    start: int, stop: int, *, batch_size: int, put: Callable,
) -> np.ndarray:
    """Reference log-probs [stop - start, 2] of records start..stop-1 (NaN where a pair is dropped)."""
    out = np.full((stop - start, 2), np.nan, np.float32)
    examples = [(i, transform(i, {**source[i], "_index": i})) for i in range(start, stop)]
    examples = [(i, ex) for i, ex in examples if ex is not None]
    for b in range(0, len(examples), batch_size):
        part = examples[b : b + batch_size]
        rows = [ex for _, ex in part]
        rows += [rows[-1]] * (batch_size - len(rows))  # pad the last batch with a repeat
        batch = {k: np.stack([r[k] for r in rows]) for k in keys}
        logps = np.asarray(jax.device_get(score_fn(put(batch))))
        for j, (i, _) in enumerate(part):
            out[i - start] = logps[j]
    return out


def _stored(directory: Path, fingerprint: dict, n: int, chunk_records: int) -> dict:
    """{"complete": bool, "chunks": [indices of finished chunk files]}; refuses a table made for other settings."""
    done = directory / "done.json"
    if done.is_file():
        saved = json.loads(done.read_text())
        changed = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
        if changed:
            raise UserError(
                f"{directory}: precomputed reference log-probs were made for different settings ({', '.join(changed)}); "
                "delete the directory to recompute them"
            )
        return {"complete": True, "chunks": []}
    directory.mkdir(parents=True, exist_ok=True)
    chunks = [k for k in range(-(-n // chunk_records)) if (directory / f"chunk_{k:05d}.npy").is_file()]
    return {"complete": False, "chunks": chunks}


def precompute(
    score_fn: Callable[[Any, dict[str, jax.Array]], jax.Array],
    params_fn: Callable[[], Any],
    source: Sequence[dict],
    transform: preference.PreferenceTransform,
    workdir: str | Path,
    *,
    batch_size: int,
    put: Callable[[dict[str, np.ndarray]], dict[str, jax.Array]],
    fingerprint: Mapping[str, Any],
    chunk_records: int = CHUNK_RECORDS,
) -> np.ndarray:
    """[len(source), 2] reference log-probs, read from the workdir or computed (and stored) now.

    `score_fn(params, batch) -> [B, 2]` scores a [B, 2, T] batch; `params_fn()` gives the reference
    params (called only when something is left to compute); `put` places a host batch on the
    devices. Only process 0 writes; every process computes (the pass is sharded).
    """
    directory = paths.path(workdir) / STORE_DIR
    done, table = directory / "done.json", directory / "logps.npy"
    fingerprint = json.loads(json.dumps(dict(fingerprint)))
    n = len(source)
    # What is on disk is read once, by process 0: every process must take the same branches (the
    # computed chunks run collectives). Assumes a workdir all processes share.
    stored = distributed.share(lambda: _stored(directory, fingerprint, n, chunk_records), "reference_logps")
    if stored["complete"]:
        with table.open("rb") as f:
            return np.load(f)
    keys = preference.row_keys(transform)
    chunks = []
    params = None
    for k, start in enumerate(range(0, n, chunk_records)):
        path = directory / f"chunk_{k:05d}.npy"
        if k in stored["chunks"]:
            with path.open("rb") as f:
                chunks.append(np.load(f))
            continue
        if params is None:
            params = params_fn()
        values = _chunk(functools.partial(score_fn, params), source, transform, keys, start, min(start + chunk_records, n),
                        batch_size=batch_size, put=put)
        if jax.process_index() == 0:
            _save_atomic(path, values)
        chunks.append(values)
        log.info("reference log-probs: %d / %d records", min(start + chunk_records, n), n)
    logps = np.concatenate(chunks, axis=0)
    distributed.barrier("reference_logps_read")  # every process has read the chunks process 0 now removes
    if jax.process_index() == 0:
        _save_atomic(table, logps)
        done.write_text(json.dumps(fingerprint, indent=1))
        for k in range(len(chunks)):
            (directory / f"chunk_{k:05d}.npy").unlink(missing_ok=True)
    return logps
