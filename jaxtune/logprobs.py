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

import functools
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


def head_token_stats_handwritten(
    head: Callable[[jax.Array], jax.Array], hidden: jax.Array, targets: jax.Array, *, chunk: int = DEFAULT_CHUNK,
) -> TokenStats:
    """TokenStats from hidden[B, T, D] and `head` (hidden[B, c, D] -> logits[B, c, V]), c = chunk.

    The sequence axis is cut (the batch axis keeps its sharding); a T that `chunk` does not
    divide is padded with zeros to whole chunks and the padding dropped afterwards.
    chunk <= 0 or chunk >= T: one head call on all positions (its logits are kept for the
    backward pass instead of recomputed). Gradients flow to `hidden` and to whatever `head`
    closes over (its weights), through `_head_stats`' hand-written backward pass.
    """
    b, t = targets.shape
    n, size = (1, t) if chunk <= 0 or chunk >= t else (-(-t // chunk), chunk)
    pad = n * size - t
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    # [B, n*c, ...] -> [n, B, c, ...]: one chunk at a time, each chunk keeps every (sharded) row.
    hidden_chunks = jnp.swapaxes(hidden.reshape(b, n, size, hidden.shape[-1]), 0, 1)
    target_chunks = jnp.swapaxes(targets.reshape(b, n, size), 0, 1).astype(jnp.int32)
    fn, consts = jax.closure_convert(head, hidden_chunks[0])
    stats = _head_stats(fn, hidden_chunks, target_chunks, *consts)
    return TokenStats(*(jnp.swapaxes(s, 0, 1).reshape(b, n * size)[:, :t] for s in stats))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _head_stats(fn, hidden_chunks, target_chunks, *consts) -> TokenStats:
    """TokenStats [n, B, c] of `fn(hidden_chunks[i], *consts)` logits, chunk by chunk.

    Hand-written backward (the maths of autodiff through `token_stats`): d logits =
    softmax * (g_log_z - g_logp) + onehot(target) * g_logp in one elementwise pass, then the
    head's own VJP. Autodiff built the same gradient from logsumexp's and take_along_axis'
    backward passes (a scatter into a zero-filled [B, c, V] buffer among them) and, chunked,
    a scan that stacked per-chunk residuals; here nothing but the inputs and log Z is saved
    (plus the logits when there is a single chunk: no recompute then)."""
    return _head_stats_fwd(fn, hidden_chunks, target_chunks, *consts)[0]


def _chunk_logits_and_stats(fn, h, y, consts):
    logits = fn(h, *consts)
    return logits, token_stats(logits, y)


def _head_stats_fwd(fn, hidden_chunks, target_chunks, *consts):
    if hidden_chunks.shape[0] == 1:
        logits, stats = _chunk_logits_and_stats(fn, hidden_chunks[0], target_chunks[0], consts)
        stats = TokenStats(*(s[None] for s in stats))
        return stats, (hidden_chunks, target_chunks, consts, stats.log_z, logits)
    _, stats = jax.lax.scan(
        lambda carry, x: (carry, _chunk_logits_and_stats(fn, *x, consts)[1]), None, (hidden_chunks, target_chunks))
    return stats, (hidden_chunks, target_chunks, consts, stats.log_z, None)


def _head_stats_bwd(fn, residuals, g):
    hidden_chunks, target_chunks, consts, log_z, saved_logits = residuals
    g_logp, g_log_z = g.logp, g.log_z  # `correct` has no gradient

    def chunk_grads(h, y, lz, gp, gz, logits=None):
        out, vjp = jax.vjp(fn, h, *consts)  # the forward matmul is dead code when the logits were saved
        z = (out if logits is None else logits).astype(jnp.float32)
        onehot = jax.lax.broadcasted_iota(jnp.int32, z.shape, z.ndim - 1) == y[..., None]
        dz = jnp.exp(z - lz[..., None]) * (gz - gp)[..., None] + jnp.where(onehot, gp[..., None], 0.0)
        return vjp(dz.astype(out.dtype))

    if saved_logits is not None:
        dh, *dconsts = chunk_grads(hidden_chunks[0], target_chunks[0], log_z[0], g_logp[0], g_log_z[0], saved_logits)
        return (dh[None], None, *dconsts)

    def step(acc, xs):
        dh, *dconsts = chunk_grads(*xs)
        return [a + d for a, d in zip(acc, dconsts)], dh

    zeros = [jnp.zeros_like(c) for c in consts]
    dconsts, dh = jax.lax.scan(step, zeros, (hidden_chunks, target_chunks, log_z, g_logp, g_log_z))
    return (dh, None, *dconsts)


_head_stats.defvjp(_head_stats_fwd, _head_stats_bwd)


def head_token_stats(
    head: Callable[[jax.Array], jax.Array], hidden: jax.Array, targets: jax.Array, *, chunk: int = DEFAULT_CHUNK,
) -> TokenStats:
    """TokenStats from hidden[B, T, D] and `head` (hidden[B, c, D] -> logits[B, c, V]), c = chunk,
    with autodiff's backward pass (scan + jax.checkpoint over chunks: each chunk's logits are
    recomputed, never all kept). chunk <= 0 or chunk >= T: one head call on all positions.

    The default: `head_token_stats_handwritten` (the same statistics, a hand-written backward) was
    no faster on an idle Xeon (benchmarks/RESULTS.md, issue 25), so it stays an opt-in for
    benchmarks (`train_step.py --variants '{"hw": {"head_backward": "hand-written"}}'`)."""
    b, t = targets.shape
    if chunk <= 0 or chunk >= t:
        return token_stats(head(hidden), targets)
    n = -(-t // chunk)
    pad = n * chunk - t
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
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
