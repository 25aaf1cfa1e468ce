"""Per-token log-probabilities in float32, shared by SFT, preference objectives and evaluation."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns (log p(target), log Z) per position, both float32 [..., T].

    The softmax normaliser is returned too because z-loss regularises it and costs nothing extra.
    """
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logits = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return target_logits - log_z, log_z
