"""Rollouts for RL: G sampled completions per prompt from the current policy, turned into training rows.

Sampling is `generate.generate` (the KV-cache sampler) called with the *training* variables: the
params the optimizer holds, or for a LoRA/DoRA run (`sampling_policy`) its adapters folded into a
float base once per rollout, so each decode step runs the plain model instead of adding the
adapter matmuls to every projection at every token (a QLoRA base is sampled as held: merging
would dequantise it). Either way the sampler runs the policy the learner is updating, on the
same devices and mesh.

Completions keep their stop token (the model is trained to stop); a completion that reached
`max_new_tokens` without one is `truncated`. Each becomes one example, prompt tokens untrained
and completion tokens trained, with its advantage on every trained token; examples are padded
one per row or packed first-fit several per row with segment ids (`data.packing`), into a fixed
number of rows so the train step compiles once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import functools

import jax
import numpy as np

from jaxtune import generate as generate_lib
from jaxtune.data.examples import shift_and_truncate
from jaxtune.batch import BATCH_KEYS
from jaxtune.peft import base as peft_base, lora, wrapper

ROLLOUT_KEYS = (*BATCH_KEYS, "advantages")


@dataclasses.dataclass
class Rollout:
    prompt_index: int  # which prompt of the step (completions of one prompt form a group)
    prompt_ids: list[int]
    completion_ids: list[int]  # sampled tokens, the stop token included when there was one
    text: str  # the completion's text (stop token and stop strings cut), what rewards read
    truncated: bool  # reached max_new_tokens without a stop token


def sampling_policy(model, variables: dict, spec: peft_base.Spec | None) -> tuple:
    """(model, variables) to sample rollouts from. LoRA/DoRA on a float base: the base model with
    the adapters merged into its kernels (one jitted merge per rollout; the merged copy lives only
    while sampling). Anything else (full weights, prefix tuning, a quantised base): as given."""
    if spec is None or spec.method not in ("lora", "dora") or spec.quantize != "none" or peft_base.COLLECTION not in variables:
        return model, variables
    merged = _merge(variables["params"], variables[peft_base.COLLECTION], spec)
    return wrapper.unwrap(model), {"params": merged}


@functools.partial(jax.jit, static_argnames="spec")
def _merge(base, adapters, spec: peft_base.Spec):
    return lora.merge(base, adapters, spec)


def sample_groups(
    model, variables, prompt_ids: Sequence[Sequence[int]], *, decode: Callable[[list[int]], str], group_size: int,
    max_new_tokens: int, temperature: float = 1.0, top_p: float | None = None, top_k: int | None = None,
    stop_tokens: Sequence[int] = (), stop_strings: Sequence[str] = (), seed: int = 0, pad_id: int = 0,
    batch_size: int = 256,
) -> list[Rollout]:
    """`group_size` completions of every prompt, prompt-major (prompt i's group is rows i*G .. i*G+G-1)."""
    repeated = [list(p) for p in prompt_ids for _ in range(group_size)]
    outputs = generate_lib.generate(
        model, variables, repeated, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        top_k=top_k, stop_tokens=stop_tokens, seed=seed, pad_id=pad_id, batch_size=batch_size, keep_stop=True,
    )
    stops = set(stop_tokens)
    rollouts = []
    for row, (prompt, out) in enumerate(zip(repeated, outputs)):
        stopped = bool(out) and out[-1] in stops
        text = decode(out[:-1] if stopped else out)
        rollouts.append(Rollout(row // group_size, prompt, out, generate_lib.truncate_at_stop_strings(text, stop_strings),
                                truncated=not stopped and len(out) >= max_new_tokens))
    return rollouts


def rollout_example(rollout: Rollout, advantage: float, *, seq_len: int) -> dict[str, np.ndarray] | None:
    """inputs/targets/loss_mask/advantages of one completion (None: nothing left to train on)."""
    tokens = rollout.prompt_ids + rollout.completion_ids
    trained = [0] * len(rollout.prompt_ids) + [1] * len(rollout.completion_ids)
    example, _ = shift_and_truncate(tokens, trained, seq_len=seq_len, truncation="truncate")
    if example is None:
        return None
    example["advantages"] = example["loss_mask"].astype(np.float32) * np.float32(advantage)
    return example


def rows_needed(num_examples: int, *, example_len: int, seq_len: int, packing: bool) -> int:
    """Rows that always hold `num_examples` examples of at most `example_len` tokens (filled in order)."""
    per_row = max(1, seq_len // max(1, example_len)) if packing else 1
    return -(-num_examples // per_row)


def place_examples(lengths: Sequence[int], *, rows: int, seq_len: int, packing: bool) -> list[tuple[int, int]]:
    """(row, first position) of each example of `lengths` tokens in `build_rows`' layout: one example
    per row, or packed first-fit in order. Raises ValueError when they do not fit."""
    used = [0] * rows  # tokens per row
    places = []
    for index, n in enumerate(lengths):
        if n > seq_len:
            raise ValueError(f"an example of {n} tokens does not fit rows of {seq_len}")
        if packing:
            row = next((r for r in range(rows) if used[r] + n <= seq_len), None)
        else:
            row = index if index < rows else None
        if row is None:
            raise ValueError(f"{len(lengths)} examples do not fit in {rows} rows of {seq_len} tokens")
        places.append((row, used[row]))
        used[row] += n
    return places


def build_rows(examples: Sequence[dict[str, np.ndarray]], *, rows: int, seq_len: int, packing: bool) -> dict[str, np.ndarray]:
    """[rows, seq_len] arrays (ROLLOUT_KEYS): one example per row, or packed first-fit (each example
    into the first row with room, in order) with segment ids 1, 2, ... per row (`place_examples`).

    Unused rows are all padding (segment 0, nothing trained). Raises ValueError when the examples
    do not fit (callers size `rows` with `rows_needed`).
    """
    out = {k: np.zeros((rows, seq_len), np.float32 if k == "advantages" else np.int32) for k in ROLLOUT_KEYS}
    places = place_examples([len(e["inputs"]) for e in examples], rows=rows, seq_len=seq_len, packing=packing)
    for example, (row, pos) in zip(examples, places):
        n = len(example["inputs"])
        sl = slice(pos, pos + n)
        for key in ("inputs", "targets", "loss_mask", "advantages"):
            out[key][row, sl] = example[key]
        out["segment_ids"][row, sl] = out["segment_ids"][row].max() + 1
        out["positions"][row, sl] = np.arange(n)
    return out


def completion_positions(examples: Sequence[dict[str, np.ndarray]], *, rows: int, seq_len: int,
                         packing: bool) -> list[tuple[int, np.ndarray]]:
    """Per example, where `build_rows` puts its trained (completion) tokens: (row, positions in the row),
    so per-token quantities (log-probs, KL, token advantages) map between rows and completions."""
    places = place_examples([len(e["inputs"]) for e in examples], rows=rows, seq_len=seq_len, packing=packing)
    return [(row, start + np.flatnonzero(e["loss_mask"])) for e, (row, start) in zip(examples, places)]
