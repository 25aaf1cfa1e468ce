"""Per-sequence sums of per-token numbers, for padded pairs and for packed (padding-free) pairs.

Preference losses need each completion's summed log-prob and trained-token count. Padded pairs
are [B, 2, T] rows, one sequence per row: a masked sum over T. Packed pairs are [R, L] rows that
hold several pairs back to back, told apart by segment ids: pair k of a row is segments 2k + 1
(chosen) and 2k + 2 (rejected), so a pair never spans two rows (or devices). A row holds at most
`max_pairs` pairs, which fixes the shapes: sums come back as [R, max_pairs, 2], zero for empty
slots. The sums are a per-row `segment_sum` (a scatter-add; its gradient is a gather), so the
loss and its gradients equal the padded computation's for the same pairs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxtune.batch import PAIR_MASK_KEY, is_packed_pairs


def segment_sums(values: jax.Array, segment_ids: jax.Array, num_segments: int) -> jax.Array:
    """[R, num_segments] sums of values[R, L] per segment id 1..num_segments (id 0 = padding, dropped)."""

    def row(v, s):
        return jax.ops.segment_sum(v, s, num_segments=num_segments + 1)[1:]

    return jax.vmap(row)(values, segment_ids.astype(jnp.int32))


def masked_mean(x: jax.Array, valid: jax.Array | None) -> jax.Array:
    """Batch mean, over the real pairs only when `valid` (bool, like x) is given; 0 when there are none."""
    if valid is None:
        return jnp.mean(x)
    return jnp.sum(jnp.where(valid, x, 0.0)) / jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)


def padded_pair_sums(logp: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(summed log p, trained-token count), each [B, 2], of [B, 2, T] padded pair rows."""
    mask = loss_mask.astype(jnp.float32)
    return jnp.sum(logp * mask, axis=-1), jnp.sum(mask, axis=-1)


def packed_pair_sums(logp: jax.Array, loss_mask: jax.Array, segment_ids: jax.Array, *,
                     max_pairs: int) -> tuple[jax.Array, jax.Array]:
    """(summed log p, trained-token count), each [R, max_pairs, 2], of [R, L] packed pair rows."""
    mask = loss_mask.astype(jnp.float32)
    r = logp.shape[0]
    logps = segment_sums(logp.astype(jnp.float32) * mask, segment_ids, 2 * max_pairs)
    lengths = segment_sums(mask, segment_ids, 2 * max_pairs)
    return logps.reshape(r, max_pairs, 2), lengths.reshape(r, max_pairs, 2)


def pair_logps(token_stats, batch, row_keys) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """(summed log p [P, 2], trained-token counts [P, 2], real-pair mask [P] or None) of a pair batch.

    `token_stats(rows) -> TokenStats` runs the model on [N, T] rows (one forward pass for every
    sequence of the batch). Padded [B, 2, T] batches fold the pair axis into the rows (P = B, no
    mask); packed [R, L] batches are summed per segment (P = R * max_pairs, mask = `pair_mask`).
    """
    if not is_packed_pairs(batch):
        rows = {k: batch[k].reshape(-1, batch[k].shape[-1]) for k in row_keys}
        stats = token_stats(rows)
        logps, lengths = padded_pair_sums(stats.logp, rows["loss_mask"])
        return logps.reshape(-1, 2), lengths.reshape(-1, 2), None
    stats = token_stats({k: batch[k] for k in row_keys})
    max_pairs = batch[PAIR_MASK_KEY].shape[-1]
    logps, lengths = packed_pair_sums(stats.logp, batch["loss_mask"], batch["segment_ids"], max_pairs=max_pairs)
    return logps.reshape(-1, 2), lengths.reshape(-1, 2), batch[PAIR_MASK_KEY].reshape(-1).astype(bool)


def per_pair(batch, key: str) -> jax.Array:
    """A per-pair value ([B] padded, [R, max_pairs] packed) as a flat [P] array aligned with `pair_logps`."""
    return batch[key].reshape(-1)


def pair_count(batch) -> jax.Array:
    """The real pairs of a batch (float32): its rows' leading size when padded, the filled slots when packed."""
    if is_packed_pairs(batch):
        return jnp.sum(batch[PAIR_MASK_KEY].astype(jnp.float32))
    return jnp.asarray(batch["inputs"].shape[0], jnp.float32)
