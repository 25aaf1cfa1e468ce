"""The Grain graph: records -> FLAN-style template -> tokens + loss mask -> pack/pad -> batches.

Every stage is deterministic for a seed and the whole graph's iterator state is checkpointable,
so a resumed run sees exactly the batches it would have seen. Examples follow the batch contract
in docs/architecture.md: `inputs`, `targets` (already shifted), `loss_mask`, `segment_ids`, `positions`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from jaxtune.batch import BATCH_KEYS, SEQ2SEQ_BATCH_KEYS
from jaxtune.data import templates as templates_lib
from jaxtune.data.examples import (
    DEFAULT_TASK, CountExamples, ExampleBuilder, TaskSpec, TaskStats, TokenizeStats, encode_prompt, is_example,
    seq2seq_example, seq2seq_ids, shift_and_truncate, strip_meta,
)
from jaxtune.data.flan import FlanSpec
from jaxtune.data.tokenizers import Tokenizer

PACKING_STRATEGIES = ("first_fit", "best_fit")  # data.packing_strategy


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
    if stats is not None:
        stats.examples += 1
    example, truncated = shift_and_truncate(
        list(prompt_ids) + list(target_ids), [0] * len(prompt_ids) + [1] * len(target_ids),
        seq_len=seq_len, truncation=truncation, where=where,
    )
    if stats is not None:
        stats.truncated += truncated
        stats.dropped += example is None
    return example


def pad_example(example: dict[str, np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
    """Padding mode: one example per row, segment 1 for real tokens and 0 for padding."""
    n = len(example["inputs"])
    out = {key: np.zeros(seq_len, np.int32) for key in BATCH_KEYS}
    for key in ("inputs", "targets", "loss_mask"):
        out[key][:n] = example[key]
    out["segment_ids"][:n] = 1
    out["positions"][:n] = np.arange(n)
    return out


def pad_seq2seq_example(example: dict[str, np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
    """Padding mode for encoder-decoder examples: both streams padded to `seq_len`, segment 1 each."""
    out = {key: np.zeros(seq_len, np.int32) for key in SEQ2SEQ_BATCH_KEYS}
    for stream, keys in (("", ("inputs",)), ("decoder_", ("decoder_inputs", "targets", "loss_mask"))):
        n = len(example[keys[0]])
        for key in keys:
            out[key][:n] = example[key]
        out[f"{stream}segment_ids"][:n] = 1
        out[f"{stream}positions"][:n] = np.arange(n)
    return out


def _seq2seq_from_packed(example: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """T5X-style packed rows: the k-th example of a row is segment k in both streams (Grain numbers
    each feature's segments in packing order, and every example has tokens in both)."""
    return {
        "inputs": example["inputs"],
        "segment_ids": example["inputs_segment_ids"],
        "positions": example["inputs_positions"],
        "decoder_inputs": example["decoder_inputs"],
        "targets": example["targets"],
        "loss_mask": example["loss_mask"],
        "decoder_segment_ids": example["targets_segment_ids"],
        "decoder_positions": example["targets_positions"],
    }


def _from_packed(example: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Grain's packer names segment/position features per key; keep the contract's names."""
    return {
        "inputs": example["inputs"],
        "targets": example["targets"],
        "loss_mask": example["loss_mask"],
        "segment_ids": example["inputs_segment_ids"],
        "positions": example["inputs_positions"],
    }


def pack_examples(it: grain.IterDataset, *, seq_len: int, bins: int, strategy: str = "first_fit",
                  seq2seq: bool = False) -> grain.IterDataset:
    """Examples packed into rows of `seq_len` (first/best fit over `bins` open rows), in the batch
    contract's keys. Encoder-decoder examples fill both streams of a row together (T5X-style): an
    example goes where its encoder input and its decoder tokens both fit."""
    packer = {"first_fit": grain.experimental.FirstFitPackIterDataset,
              "best_fit": grain.experimental.BestFitPackIterDataset}[strategy]
    keys = ("inputs", "decoder_inputs", "targets", "loss_mask") if seq2seq else ("inputs", "targets", "loss_mask")
    packed = packer(it, length_struct={k: seq_len for k in keys}, num_packing_bins=bins, shuffle_bins=False)
    return packed.map(_seq2seq_from_packed if seq2seq else _from_packed)


@dataclasses.dataclass
class PipelineStats:
    """Per-task counts (examples, tokens, policies) and packing efficiency of the batches produced.

    Counted in the main process as batches are drawn, so they cover this run (not a resumed
    run's earlier part), whatever the number of worker processes.
    """

    tasks: dict[str, TaskStats]
    slots: int = 0  # batch positions produced
    filled: int = 0  # of which hold a token (segment_ids > 0)
    step_rows: Any = None  # packed pairs by step (pair_packing.StepRows): the row counts a step may take

    @property
    def packing_efficiency(self) -> float:
        return self.filled / self.slots if self.slots else 0.0

    def report(self) -> list[str]:
        lines = [f"{name}: {s.summary()}" for name, s in self.tasks.items()]
        lines.append(f"packing efficiency (non-pad fraction): {self.packing_efficiency:.1%}")
        return lines

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Grain map over batches: counts filled positions."""
        self.slots += batch["segment_ids"].size
        self.filled += int(np.count_nonzero(batch["segment_ids"]))
        return batch


def _absl_flags_parsed() -> None:
    """Grain's worker processes read absl flags; outside an absl app nobody parses them (defaults are fine)."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def record_stream(
    sources: Sequence[Sequence[dict]],
    transforms: Sequence[Any],
    *,
    seed: int,
    rates: Sequence[float] | None = None,
    shuffle: bool = True,
    process_index: int = 0,
    process_count: int = 1,
    worker_count: int = 0,
    read_threads: int = 0,
    prefetch: int = 0,
) -> grain.IterDataset:
    """The shared skeleton's front: per source, shuffle (a fresh permutation every epoch), repeat
    and map the objective's transform `(stream index, record) -> example | marker`; mix the
    sources at `rates`; take this process's slice; optionally fan the transform out to workers.

    Every objective's data goes through here (SFT examples, preference pairs, KTO examples), so
    shuffling, mixing, sharding and reading are written once.
    """
    streams = []
    for i, (records, transform) in enumerate(zip(sources, transforms)):
        ds = grain.MapDataset.source(records)
        if shuffle:
            ds = ds.shuffle(seed=seed + i)
        streams.append(ds.repeat(None).map_with_index(transform))
    ds = streams[0] if len(streams) == 1 else grain.MapDataset.mix(streams, weights=list(rates or [1.0] * len(streams)))
    ds = ds[process_index::process_count]
    # Grain's defaults (16 threads, 500 prefetched elements) cost more in bookkeeping than the
    # per-example work here; reading in the training thread is cheapest, and JAX's asynchronous
    # dispatch already overlaps it with the device step. Heavy pipelines raise read_threads or
    # use worker processes.
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch))
    if worker_count > 0:
        _absl_flags_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return it


def example_stream(
    tasks: Sequence[TaskSpec],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    seed: int,
    **stream_options,
) -> grain.IterDataset:
    """The mixed, per-process stream of SFT examples and skip markers (see `build_dataset`)."""
    builders = [ExampleBuilder(task, i, tokenizer, seq_len=seq_len, seed=seed) for i, task in enumerate(tasks)]
    return record_stream([t.records for t in tasks], builders, seed=seed, **stream_options)


def sharded_batches(
    stream: Callable[[int, int], grain.IterDataset],
    finish: Callable[[grain.IterDataset, int], grain.IterDataset],
    *,
    batch_size: int,
    shards: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    batched: bool = False,
) -> grain.IterDataset:
    """The shared skeleton's back: this process's batches of `batch_size` rows.

    `stream(shard, num_shards)` is one slice of the example stream (counted, markers filtered);
    `finish(it, rows)` packs or pads it into rows (the objective's choice); each slice is batched
    on its own. `shards` (default: one per process) splits the stream into that many slices, each
    packed into its own rows; a process builds `shards / process_count` of them and puts their
    rows side by side. A fixed shard count therefore gives the same global batches (and losses)
    for any process count that divides it. `batched`: `finish(it, n)` already yields whole batches
    for `n` of the batch's units (e.g. a step's pairs packed into the rows they need).
    """
    shards = shards or process_count
    if shards % process_count or batch_size % (shards // process_count):
        raise ValueError(f"{shards} data shards do not split over {process_count} processes x {batch_size} rows")
    per_process = shards // process_count
    rows = batch_size // per_process
    parts = [finish(stream(process_index * per_process + k, shards), rows) for k in range(per_process)]
    if not batched:
        parts = [part.batch(rows, drop_remainder=True) for part in parts]
    return parts[0] if per_process == 1 else grain.experimental.ZipIterDataset(parents=parts).map(_concat_rows)


def build_dataset(
    tasks: Sequence[TaskSpec],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    packing: bool = True,
    packing_strategy: str = "first_fit",
    packing_bins: int = 0,
    collect_lengths: bool = False,
    shards: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    **stream_options,
) -> tuple[grain.IterDataset, PipelineStats]:
    """An endless, per-process stream of SFT batches of `batch_size` rows (this process's share).

    Graph (`record_stream` + `sharded_batches`): per task, shuffle the record indices and build
    examples; mix the tasks at `rates` (deterministic proportional interleaving); take this
    process's disjoint slice of the mixed stream; optionally fan the example building out to
    worker processes (same order for any count); count; pack (first/best fit) or pad; batch.
    The iterator state of the whole graph (mixture included) checkpoints with Grain.
    `stream_options` (rates, shuffle, worker_count, read_threads, prefetch) go to `record_stream`.
    """
    stats = PipelineStats({t.name: TaskStats(lengths=[] if collect_lengths else None) for t in tasks})
    count = CountExamples(stats.tasks, [t.name for t in tasks])

    def stream(shard: int, num_shards: int) -> grain.IterDataset:
        it = example_stream(tasks, tokenizer, seq_len=seq_len, seed=seed, process_index=shard,
                            process_count=num_shards, **stream_options)
        return it.map(count).filter(is_example).map(strip_meta)

    seq2seq = any(t.seq2seq for t in tasks)

    def finish(it: grain.IterDataset, rows: int) -> grain.IterDataset:
        if not packing:
            return it.map(functools.partial(pad_seq2seq_example if seq2seq else pad_example, seq_len=seq_len))
        return pack_examples(it, seq_len=seq_len, bins=packing_bins or rows, strategy=packing_strategy, seq2seq=seq2seq)

    it = sharded_batches(stream, finish, batch_size=batch_size, shards=shards, process_index=process_index,
                         process_count=process_count)
    return it.map(stats), stats


def _concat_rows(batches: tuple[dict[str, np.ndarray], ...]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def train_dataset(
    source: Sequence[dict],
    task_templates: Mapping[str, Sequence[templates_lib.Template]],
    tokenizer: Tokenizer,
    *,
    truncation: str = "truncate",
    word_dropout: float = 0.0,
    seq2seq: bool = False,
    **kwargs,
) -> tuple[grain.IterDataset, PipelineStats]:
    """One source whose records pick their template set by their "task" field (the quickstart shape);
    `seq2seq`: encoder-decoder examples."""
    flan = {name: FlanSpec(tuple(map(tuple, t)), word_dropout=word_dropout) for name, t in task_templates.items()}
    task = TaskSpec(DEFAULT_TASK, source, flan=flan, truncation=truncation, seq2seq=seq2seq)
    return build_dataset([task], tokenizer, **kwargs)


def tokenize_prompts(tokenizer: Tokenizer, prompts: Sequence[str], *, seq2seq: bool = False) -> list[list[int]]:
    """Generation inputs: the same BOS + prompt prefix the model was trained on (an encoder-decoder:
    the encoder input it was trained on, prompt + </s>)."""
    return [seq2seq_ids(tokenizer, p) if seq2seq else encode_prompt(tokenizer, p) for p in prompts]


def seq2seq_row(encoder_ids: Sequence[int], target_ids: Sequence[int], *, decoder_start_id: int,
                seq_len: int) -> dict[str, np.ndarray] | None:
    """One padded encoder-decoder row scoring `target_ids` given `encoder_ids` (evaluation), or None
    when nothing of the target fits."""
    example, _ = seq2seq_example(encoder_ids, target_ids, decoder_start_id=decoder_start_id, seq_len=seq_len,
                                 truncation="truncate")
    return None if example is None else pad_seq2seq_example(example, seq_len)


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
