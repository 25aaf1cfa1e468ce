"""Supervised fine-tuning: next-token cross-entropy over the trained (loss-masked) tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxtune.objectives.logprobs import TokenStats, token_stats


def sft_loss(
    logits: jax.Array,
    batch: dict[str, jax.Array],
    *,
    normalizer: jax.Array | float,
    z_loss: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`sft_loss_from_stats` on full logits [B, T, V]."""
    return sft_loss_from_stats(token_stats(logits, batch["targets"]), batch, normalizer=normalizer, z_loss=z_loss)


def sft_loss_from_stats(
    stats: TokenStats,
    batch: dict[str, jax.Array],
    *,
    normalizer: jax.Array | float,
    z_loss: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Cross-entropy summed over `loss_mask` and divided by `normalizer`, from per-token stats
    (full or chunked LM head, objectives/logprobs.py).

    `normalizer` is the number of trained tokens in the whole *global* batch (all micro-batches),
    so packing, padding and gradient accumulation leave the loss unchanged: summing this loss over
    micro-batches gives the token-mean over the global batch. Every metric is additive in the same
    way. The optional z-loss (PaLM) penalises log(Z)^2 to keep the softmax normaliser near 1.
    """
    mask = batch["loss_mask"].astype(jnp.float32)
    logp, log_z = stats.logp, stats.log_z
    normalizer = jnp.maximum(jnp.asarray(normalizer, jnp.float32), 1.0)
    nll = -jnp.sum(logp * mask) / normalizer
    z_term = jnp.sum(jnp.square(log_z) * mask) / normalizer
    correct = stats.correct
    metrics = {
        "loss": nll,
        "accuracy": jnp.sum(correct * mask) / normalizer,
        "trained_tokens": jnp.sum(mask),
    }
    loss = nll
    if z_loss:
        loss = loss + z_loss * z_term
        metrics["z_loss"] = z_term
    return loss, metrics
