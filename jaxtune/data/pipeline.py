"""The Grain graph: records -> FLAN-style template -> tokens + loss mask -> pack/pad -> batches.

Every stage is deterministic for a seed and the whole graph's iterator state is checkpointable,
so a resumed run sees exactly the batches it would have seen. Examples follow the batch contract
in DESIGN.md: `inputs`, `targets` (already shifted), `loss_mask`, `segment_ids`, `positions`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from jaxtune.data import templates as templates_lib
from jaxtune.data.tokenizers import Tokenizer
from jaxtune.errors import UserError

BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")
DEFAULT_TASK = "default"


@dataclasses.dataclass
class TokenizeStats:
    """Counts of examples changed or removed by the truncation policy (in-process workers only)."""

    examples: int = 0
    truncated: int = 0
    dropped: int = 0


def encode_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """BOS (when the tokenizer has one) + prompt tokens: the exact prefix training saw."""
    ids = tokenizer.encode(prompt)
    if tokenizer.bos_id is not None and (not ids or ids[0] != tokenizer.bos_id):
        ids = [tokenizer.bos_id] + ids
    return ids


def tokenize_pair(
    prompt_ids: Sequence[int],
    target_ids: Sequence[int],
    *,
    seq_len: int,
    truncation: str,
    where: str = "",
    stats: TokenizeStats | None = None,
) -> dict[str, np.ndarray] | None:
    """Aligned (inputs, targets, loss_mask) for prompt + target, shifted once here.

    `truncate` keeps the prompt's start and as much target as fits; an example with no target
    token left is dropped (counted), as is any over-long example under `drop`.
    """
    tokens = list(prompt_ids) + list(target_ids)
    mask = [0] * (len(prompt_ids) - 1) + [1] * len(target_ids)
    if stats is not None:
        stats.examples += 1
    if not target_ids:
        if stats is not None:
            stats.dropped += 1
        return None
    if len(tokens) - 1 > seq_len:
        if truncation == "error":
            raise UserError(
                f"{where or 'example'}: {len(tokens) - 1} tokens exceed data.seq_len={seq_len} "
                "(set data.truncation to 'truncate' or 'drop')"
            )
        if truncation == "drop" or len(prompt_ids) >= seq_len:
            if stats is not None:
                stats.dropped += 1
            return None
        tokens, mask = tokens[: seq_len + 1], mask[:seq_len]
        if stats is not None:
            stats.truncated += 1
    return {
        "inputs": np.asarray(tokens[:-1], np.int32),
        "targets": np.asarray(tokens[1:], np.int32),
        "loss_mask": np.asarray(mask, np.int32),
    }


class RenderAndTokenize:
    """Grain map (with the stream index): pick a template, render, tokenize, mask the prompt.

    The template and word-dropout draws depend only on (seed, index), so they are identical
    after a resume and independent of the number of worker processes.
    """

    def __init__(
        self,
        task_templates: Mapping[str, Sequence[templates_lib.Template]],
        tokenizer: Tokenizer,
        *,
        seq_len: int,
        truncation: str,
        seed: int,
        word_dropout: float = 0.0,
        process_index: int = 0,
        process_count: int = 1,
    ):
        self.task_templates = dict(task_templates)
        self.process_index = process_index
        self.process_count = process_count
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.truncation = truncation
        self.seed = seed
        self.word_dropout = word_dropout
        self.stats = TokenizeStats()

    def __call__(self, local_index: int, record: dict) -> dict[str, np.ndarray] | None:
        # The global stream index (not this process's) seeds the draws: same data on any host count.
        index = local_index * self.process_count + self.process_index
        task = record.get("task", DEFAULT_TASK)
        if task not in self.task_templates:
            where = record.get("_where", f"record {index}")
            raise UserError(f"{where}: no templates for task {task!r}; known tasks: {', '.join(sorted(self.task_templates))}")
        fields = {k: v for k, v in record.items() if k not in ("task", "_where")}
        prompt, target = templates_lib.render_example(
            self.task_templates[task], fields, seed=self.seed, index=int(index),
            word_dropout=self.word_dropout, task=task,
        )
        return tokenize_pair(
            encode_prompt(self.tokenizer, prompt),
            self.tokenizer.encode(target) + [self.tokenizer.eos_id],
            seq_len=self.seq_len, truncation=self.truncation,
            where=record.get("_where", f"task {task!r}, record {index}"), stats=self.stats,
        )


def pad_example(example: dict[str, np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
    """Padding mode: one example per row, segment 1 for real tokens and 0 for padding."""
    n = len(example["inputs"])
    out = {key: np.zeros(seq_len, np.int32) for key in BATCH_KEYS}
    for key in ("inputs", "targets", "loss_mask"):
        out[key][:n] = example[key]
    out["segment_ids"][:n] = 1
    out["positions"][:n] = np.arange(n)
    return out


def _is_example(example) -> bool:
    return example is not None


def _from_packed(example: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Grain's packer names segment/position features per key; keep the contract's names."""
    return {
        "inputs": example["inputs"],
        "targets": example["targets"],
        "loss_mask": example["loss_mask"],
        "segment_ids": example["inputs_segment_ids"],
        "positions": example["inputs_positions"],
    }


def train_dataset(
    source: Sequence[dict],
    task_templates: Mapping[str, Sequence[templates_lib.Template]],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    packing: bool = True,
    shuffle: bool = True,
    truncation: str = "truncate",
    word_dropout: float = 0.0,
    process_index: int = 0,
    process_count: int = 1,
    worker_count: int = 0,
    read_threads: int = 0,
    prefetch: int = 0,
) -> tuple[grain.IterDataset, RenderAndTokenize]:
    """An endless, per-process stream of batches of `batch_size` rows (this process's share).

    Order: shuffle the record indices (a fresh permutation every epoch), take this process's
    disjoint slice, render + tokenize, then pack (first-fit) or pad, then batch.
    """
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(None)
    ds = ds[process_index::process_count]
    transform = RenderAndTokenize(
        task_templates, tokenizer, seq_len=seq_len, truncation=truncation, seed=seed,
        word_dropout=word_dropout, process_index=process_index, process_count=process_count,
    )
    ds = ds.map_with_index(transform)
    ds = ds.filter(_is_example)
    # Grain's defaults (16 threads, 500 prefetched elements) cost more in bookkeeping than the
    # per-example work here; reading in the training thread is cheapest, and JAX's asynchronous
    # dispatch already overlaps it with the device step. Heavy pipelines raise read_threads or
    # use worker processes.
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch))
    if packing:
        lengths = {"inputs": seq_len, "targets": seq_len, "loss_mask": seq_len}
        it = grain.experimental.FirstFitPackIterDataset(
            it, length_struct=lengths, num_packing_bins=batch_size, shuffle_bins=False
        )
        it = it.map(_from_packed)
    else:
        it = it.map(functools.partial(pad_example, seq_len=seq_len))
    if worker_count > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return it.batch(batch_size, drop_remainder=True), transform


def tokenize_prompts(tokenizer: Tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Generation inputs: the same BOS + prompt prefix the model was trained on."""
    return [encode_prompt(tokenizer, p) for p in prompts]


def render_eval_set(
    records: Sequence[dict[str, Any]],
    task_templates: Mapping[str, Sequence[templates_lib.Template]],
    *,
    seed: int,
) -> list[dict[str, str]]:
    """(task, prompt, answer) triples for generative evaluation; no word dropout."""
    out = []
    for index, record in enumerate(records):
        task = record.get("task", DEFAULT_TASK)
        fields = {k: v for k, v in record.items() if k not in ("task", "_where")}
        prompt, target = templates_lib.render_example(task_templates[task], fields, seed=seed, index=index, task=task)
        out.append({"task": task, "prompt": prompt, "answer": target})
    return out
