"""Per-token log-probabilities in float32, shared by SFT, preference objectives and evaluation.

Two ways to get them, with the same results:
- `token_stats(logits, targets)`: from full [..., T, V] logits (tests, custom apply functions);
- `head_token_stats(head, hidden, targets, chunk=...)`: from the final hidden states and the LM
  head, `chunk` sequence positions at a time. Each chunk's logits are made, reduced to per-token
  numbers and dropped; the backward pass recomputes them (scan + jax.checkpoint), so no
  [B, T, V] array (float32 or otherwise) exists in a training step, only [B, chunk, V] ones.
`model_token_stats` runs a Flax module that exposes `hidden_states` / `logits_from_hidden`
(every jaxtune family, models/layers.CausalLM) through the chunked path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

# Sequence positions per LM-head chunk when a caller does not say (config: train.logits_chunk).
# Per device a chunk holds [batch per device, chunk, vocab] float32 logits; 0 = unchunked.
DEFAULT_CHUNK = 512


class TokenStats(NamedTuple):
    """Per-position float32 [..., T] numbers every objective and eval metric is built from."""

    logp: jax.Array  # log p(target)
    log_z: jax.Array  # log of the softmax normaliser (z-loss regularises it)
    correct: jax.Array  # 1.0 where argmax(logits) == target (no gradient)


def token_stats(logits: jax.Array, targets: jax.Array) -> TokenStats:
    """TokenStats from logits [..., T, V] (log-softmax in float32)."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    targets = targets.astype(jnp.int32)
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    correct = jax.lax.stop_gradient((jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32))
    return TokenStats(target_logits - log_z, log_z, correct)


def token_logprobs(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(log p(target), log Z) per position, both float32 [..., T]."""
    stats = token_stats(logits, targets)
    return stats.logp, stats.log_z


def masked_sequence_sums(logp: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of per-token log p [..., T] over the trained tokens, their count) per sequence, float32 [...]."""
    mask = loss_mask.astype(jnp.float32)
    return jnp.sum(logp * mask, axis=-1), jnp.sum(mask, axis=-1)


def head_token_stats(
    head: Callable[[jax.Array], jax.Array], hidden: jax.Array, targets: jax.Array, *, chunk: int = DEFAULT_CHUNK,
) -> TokenStats:
    """TokenStats from hidden[B, T, D] and `head` (hidden[B, c, D] -> logits[B, c, V]), c = chunk.

    The sequence axis is cut (the batch axis keeps its sharding); a T that `chunk` does not
    divide is padded with zeros to whole chunks and the padding dropped afterwards.
    chunk <= 0 or chunk >= T: one head call on all positions (the plain full-logits path).
    Gradients flow to `hidden` and to whatever `head` closes over (its weights).
    """
    b, t = targets.shape
    if chunk <= 0 or chunk >= t:
        return token_stats(head(hidden), targets)
    n = -(-t // chunk)
    pad = n * chunk - t
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    # [B, n*c, ...] -> [n, B, c, ...]: scan over chunks, each chunk keeps every (sharded) row.
    xs = (jnp.swapaxes(hidden.reshape(b, n, chunk, hidden.shape[-1]), 0, 1),
          jnp.swapaxes(targets.reshape(b, n, chunk), 0, 1))

    @jax.checkpoint  # saves only its inputs: the backward pass recomputes the chunk's logits
    def one_chunk(h, y):
        return token_stats(head(h), y)

    _, stats = jax.lax.scan(lambda carry, x: (carry, one_chunk(*x)), None, xs)
    return TokenStats(*(jnp.swapaxes(s, 0, 1).reshape(b, n * chunk)[:, :t] for s in stats))


def model_token_stats(
    module: Any, variables: Any, inputs: jax.Array, targets: jax.Array, *, positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None, rngs: Any = None, chunk: int = DEFAULT_CHUNK, temperature: float = 1.0,
) -> TokenStats:
    """TokenStats of a Flax decoder with `hidden_states` and `logits_from_hidden` methods, LM head chunked.

    `temperature`: the statistics of softmax(logits / temperature), the distribution a sampler at
    that temperature draws from (RL on rollouts sampled at T != 1)."""
    hidden = module.apply(variables, inputs, positions=positions, segment_ids=segment_ids, rngs=rngs,
                          method="hidden_states")
    return head_token_stats(with_temperature(lambda h: module.apply(variables, h, method="logits_from_hidden"),
                                             temperature), hidden, targets, chunk=chunk)


def with_temperature(head: Callable[[jax.Array], jax.Array], temperature: float) -> Callable[[jax.Array], jax.Array]:
    """`head` with its logits divided by `temperature` (the same function at 1.0)."""
    if temperature == 1.0:
        return head
    return lambda h: head(h) / temperature
