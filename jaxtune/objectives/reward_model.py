"""Reward models: a scalar head scored on preference pairs with the Bradley-Terry loss.

The model is the policy's family with a `score` head instead of the LM head (`num_labels=1`,
models/layers.ScoreHead; exported as Hugging Face `*ForSequenceClassification`). A sequence's
reward ``r`` is the head's output at its last non-padding token, picked by transformers' rule
(the rightmost token that is not the pad id; layers.last_token_index), over the whole text
prompt + completion + EOS. Per pair, with ``r_c``/``r_r`` the chosen/rejected rewards, ``m`` the
record's optional ``margin`` (0 when absent) and ``c`` = center_rewards_coefficient::

    loss = -log sigmoid(r_c - r_r - m) + c * (r_c + r_r)^2

which is TRL's RewardTrainer (its centering term is ``c * mean((r_c + r_r)^2)`` over the batch,
Eisenstein et al. 2023). Metrics: ``accuracy`` (r_c > r_r), ``margin`` (r_c - r_r), the mean
chosen/rejected rewards. Every value is per pair, summed; the trainer divides by the number of
pairs of the global batch, so gradient accumulation is exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxtune.models.layers import last_token_index

MARGIN_KEY = "margin"  # the optional per-pair field of a record, and its batch key [B] float32


def bradley_terry_loss(chosen: jax.Array, rejected: jax.Array, margin: jax.Array | None = None, *,
                       center_rewards_coefficient: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(per-pair loss [B], per-pair metrics [B]) from chosen/rejected rewards [B], in float32."""
    chosen, rejected = chosen.astype(jnp.float32), rejected.astype(jnp.float32)
    diff = chosen - rejected
    logits = diff if margin is None else diff - margin.astype(jnp.float32)
    losses = -jax.nn.log_sigmoid(logits)
    if center_rewards_coefficient:
        losses = losses + center_rewards_coefficient * jnp.square(chosen + rejected)
    metrics = {"accuracy": (chosen > rejected).astype(jnp.float32), "margin": diff,
               "rewards/chosen": chosen, "rewards/rejected": rejected}
    return losses, metrics


def whole_sequences(inputs: jax.Array, targets: jax.Array, segment_ids: jax.Array,
                    positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Right-padded next-token rows [N, T] -> the whole token sequence (inputs + the last target,
    i.e. the EOS that ends a completion) as (tokens, segment_ids, positions).

    A reward model reads every token of prompt + completion + EOS, while pipeline rows hold n
    inputs and their n shifted targets. A row that fills all T inputs keeps them as they are (the
    sequence was cut at data.seq_len anyway).
    """
    n = jnp.sum(segment_ids > 0, axis=-1)
    room = n < inputs.shape[-1]
    rows = jnp.arange(inputs.shape[0])
    at = jnp.where(room, n, 0)
    last = targets[rows, jnp.maximum(n - 1, 0)]
    put = lambda x, v: x.at[rows, at].set(jnp.where(room, v, x[rows, at]))
    return put(inputs, last), put(segment_ids, 1), put(positions, n)


def sequence_rewards(scores: jax.Array, tokens: jax.Array, segment_ids: jax.Array,
                     pad_token_id: int | None) -> jax.Array:
    """Per-token scores [N, T, 1] -> the reward of each row [N] at its last non-padding token."""
    index = last_token_index(tokens, segment_ids, pad_token_id)
    return jnp.take_along_axis(scores[..., 0], index[:, None], axis=1)[:, 0].astype(jnp.float32)
