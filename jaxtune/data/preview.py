"""`jaxtune data preview`: what a config feeds the model, before any training.

Shows the mixture's effective rates, N examples as the model sees them with the trained span
marked ⟦like this⟧, and statistics over a few batches: examples and tokens per task, length
percentiles, truncations/drops/skips and packing efficiency.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import ml_collections
import numpy as np

from jaxtune.data import datasets
from jaxtune.data.examples import TASK_KEY, is_example
from jaxtune.data.pipeline import example_stream
from jaxtune.data.tokenizers import Tokenizer

OPEN, CLOSE = "⟦", "⟧"


def marked_text(tokenizer: Tokenizer, inputs: np.ndarray, targets: np.ndarray, loss_mask: np.ndarray) -> str:
    """The example's text with every trained run of tokens wrapped in ⟦ ⟧."""
    tokens = np.concatenate([inputs[:1], targets])
    trained = np.concatenate([[0], loss_mask])
    pieces = []
    for on, run in itertools.groupby(zip(tokens.tolist(), trained.tolist()), key=lambda x: x[1]):
        text = tokenizer.decode([t for t, _ in run])
        pieces.append(f"{OPEN}{text}{CLOSE}" if on else text)
    return "".join(pieces)


def _percentiles(lengths: Sequence[int]) -> str:
    if not lengths:
        return "no examples"
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99])
    return f"length p50 {p50:.0f}, p90 {p90:.0f}, p99 {p99:.0f}, max {max(lengths)}"


def preview(cfg: ml_collections.ConfigDict, workdir: str | Path, *, seed: int, global_batch_size: int, num: int = 5,
            batches: int = 20, screen: datasets.Screen | None = None) -> list[str]:
    """Lines to print: mixture, `num` marked examples, stats over `batches` batches of `global_batch_size`.
    `cfg`: the data settings (loading.data_settings); `screen`: as for datasets.load_sft_data."""
    data = datasets.load_sft_data(cfg, workdir, seed=seed, screen=screen)
    lines = [f"mixture ({data.mixture.mode}):", data.mixture.describe(), ""]
    stream = example_stream(data.tasks, data.tokenizer, rates=data.mixture.rates, seq_len=cfg.seq_len,
                            seed=seed, shuffle=cfg.shuffle)
    shown = itertools.islice(filter(is_example, iter(stream)), num)
    for i, example in enumerate(shown, start=1):
        name = data.tasks[example[TASK_KEY]].name
        lines.append(f"--- example {i} (task {name}): {len(example['inputs'])} tokens, "
                     f"{int(example['loss_mask'].sum())} trained")
        lines.append(marked_text(data.tokenizer, example["inputs"], example["targets"], example["loss_mask"]))
    dataset, stats = datasets.train_dataset(data, cfg, batch_size=global_batch_size, seed=seed, collect_lengths=True)
    for _ in itertools.islice(iter(dataset), batches):
        pass
    lines += ["", f"stats over {batches} batches of {global_batch_size} x {cfg.seq_len}:"]
    for name, s in stats.tasks.items():
        lines.append(f"  {name}: {s.summary()}; {_percentiles(s.lengths)}")
    lines.append(f"  packing efficiency (non-pad fraction): {stats.packing_efficiency:.1%}")
    return lines
