"""Greedy decoding for evaluation during training.

Prompts are left-padded into one fixed-shape buffer (padding is segment 0, so the model never
attends to it) and decoded with one jitted while-loop, so a whole eval set costs one compile.
Each step re-runs the forward pass over the buffer: simple and exact, fine for short answers.
A KV-cache sampler (issue 7) replaces this for long generations.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

ApplyFn = Callable[[object, jax.Array, jax.Array, jax.Array], jax.Array]  # (params, tokens, positions, segment_ids) -> logits


def _bucket(n: int, multiple: int = 16) -> int:
    return -(-n // multiple) * multiple


@functools.partial(jax.jit, static_argnames=("apply_fn", "prompt_len", "max_new_tokens", "eos_id", "pad_id"))
def _greedy_loop(apply_fn, params, tokens, segment_ids, positions, *, prompt_len, max_new_tokens, eos_id, pad_id):
    batch = tokens.shape[0]

    def cond(carry):
        i, _, done = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, tokens, done = carry
        logits = apply_fn(params, tokens, positions, segment_ids)
        last = jax.lax.dynamic_index_in_dim(logits, prompt_len - 1 + i, axis=1, keepdims=False)
        next_token = jnp.argmax(last, axis=-1).astype(tokens.dtype)
        next_token = jnp.where(done, pad_id, next_token)
        tokens = jax.lax.dynamic_update_slice(tokens, next_token[:, None], (0, prompt_len + i))
        return i + 1, tokens, done | (next_token == eos_id)

    _, tokens, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), tokens, jnp.zeros((batch,), bool)))
    return tokens[:, prompt_len:]


def greedy_generate(
    apply_fn: ApplyFn,
    params,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int = 0,
    batch_size: int = 64,
) -> list[list[int]]:
    """Greedy continuations (without the prompt, cut at and excluding EOS) for each prompt.

    `apply_fn` must be the same function object across calls for the compile cache to hit.
    """
    if not prompts:
        return []
    prompt_len = _bucket(max(len(p) for p in prompts))
    total = prompt_len + max_new_tokens
    outputs: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        rows = len(chunk)
        chunk += [chunk[0]] * (batch_size - rows)  # fixed batch shape: one compile
        tokens = np.full((batch_size, total), pad_id, np.int32)
        segment_ids = np.zeros((batch_size, total), np.int32)
        positions = np.zeros((batch_size, total), np.int32)
        for row, prompt in enumerate(chunk):
            offset = prompt_len - len(prompt)
            tokens[row, offset:prompt_len] = prompt
            segment_ids[row, offset:] = 1
            positions[row, offset:] = np.arange(total - offset)
        new = np.asarray(
            _greedy_loop(
                apply_fn, params, jnp.asarray(tokens), jnp.asarray(segment_ids), jnp.asarray(positions),
                prompt_len=prompt_len, max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
            )
        )
        for row in range(rows):
            seq = new[row].tolist()
            outputs.append(seq[: seq.index(eos_id)] if eos_id in seq else seq)
    return outputs
