"""CPU step time of the two quickstarts, side by side: decoder-only (`configs/quickstart.py`) and
encoder-decoder (`configs/quickstart.py:model=t5`), docs/guides/t5.md "Quickstart variant".

    nice -n -10 python benchmarks/quickstart_side_by_side.py --repeats 7 --steps 5

Each config's train step is built as `jaxtune train` builds it (`trainer.build_setup`, the
quickstart's 512-piece vocabulary, batch 16 x seq_len 128, and for T5 both streams of 128),
compiled, then the two are timed in alternating rounds of --steps steps on full rows of random
tokens (a step's cost depends on the shapes only), so load that comes and goes on a shared
machine hits both alike. Prints one JSON line: the median step time of each, the ratio, the load
average and the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np

from jaxtune import trainer, validation

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"decoder_only": "configs/quickstart.py", "t5": "configs/quickstart.py:model=t5"}


def full_batch(shapes: dict, vocab_size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Every row one full example: ids below the vocabulary, segment 1, positions 0.., all trained."""
    batch = {}
    for key, shape in shapes.items():
        if key.endswith("segment_ids") or key == "loss_mask":
            batch[key] = np.ones(shape.shape, np.int32)
        elif key.endswith("positions"):
            batch[key] = np.broadcast_to(np.arange(shape.shape[-1], dtype=np.int32), shape.shape).copy()
        else:
            batch[key] = rng.integers(2, vocab_size, shape.shape).astype(np.int32)
    return batch


def prepare(spec: str, vocab_size: int):
    """(run, info): the compiled step of one config; run(steps) -> seconds per step."""
    config = validation.load_config(str(REPO / spec), [f"model.vocab_size={vocab_size}"], needs_data=False)
    setup = trainer.build_setup(config, jax.devices())
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rule_table):
        holder = {"state": setup.init_state(jax.random.key(0))}
        batch = {k: jax.device_put(v, setup.batch_sharding[k])
                 for k, v in full_batch(setup.batch_shapes, vocab_size, np.random.default_rng(0)).items()}
        holder["state"], m = setup.train_step(holder["state"], batch, None)  # compile
        jax.block_until_ready(m)

    def run(steps: int) -> float:
        with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rule_table):
            start = time.perf_counter()
            for _ in range(steps):
                holder["state"], metrics = setup.train_step(holder["state"], batch, None)
            jax.block_until_ready(metrics)
        return (time.perf_counter() - start) / steps

    shapes = {k: list(v.shape) for k, v in setup.batch_shapes.items() if k in ("inputs", "decoder_inputs")}
    return run, {"params": setup.num_params, "batch_shapes": shapes}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7, help="alternating rounds (the median round is reported)")
    p.add_argument("--steps", type=int, default=5, help="steps per round")
    p.add_argument("--vocab_size", type=int, default=512, help="the quickstart tokenizer's")
    args = p.parse_args()
    runners, out = {}, {}
    for name, spec in CONFIGS.items():
        runners[name], out[name] = prepare(spec, args.vocab_size)
    rounds: dict[str, list[float]] = {name: [] for name in runners}
    load_before = os.getloadavg()[0]
    for _ in range(args.repeats):
        for name, run in runners.items():
            rounds[name].append(run(args.steps))
    for name in runners:
        out[name].update(step_s=round(statistics.median(rounds[name]), 4), rounds_s=[round(t, 4) for t in rounds[name]])
    out["t5_over_decoder_only_step_time"] = round(out["t5"]["step_s"] / out["decoder_only"]["step_s"], 3)
    out.update(load_avg_before=load_before, load_avg_after=os.getloadavg()[0], cpu_count=os.cpu_count(),
               devices=jax.device_count(), processor=_cpu_name() or platform.processor())
    print(json.dumps(out))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


if __name__ == "__main__":
    main()
