"""The GRPO family's loss as pure float32 functions of per-token log-probs (sums + weights).

Notation, per completion ``i`` of a group of ``G`` completions of one prompt and per completion
token ``t``: ``r_i`` the total reward, ``A_i`` the advantage, ``lp`` the policy's log-prob of the
sampled token, ``lp_old`` the log-prob under the policy that sampled it (a constant),
``lp_ref`` the reference model's (all three of softmax(logits / T), T the rollouts' sampling
temperature, as TRL computes them), ``ratio = exp(lp - lp_old)``, ``|y_i|`` the completion's
trained-token count, ``eps_lo``/``eps_hi`` the clip range, ``b`` = beta, ``sg`` = stop-gradient.

===================  =====================================================================
quantity             formula
===================  =====================================================================
advantage            ``A_i = r_i - mean_G(r)``, divided by ``std_G(r) + 1e-4`` when
                     ``scale_rewards`` (GRPO; Dr. GRPO leaves it out). ``std`` is the sample std
                     (ddof=1, as TRL); a group whose rewards are all equal has zero spread: its
                     advantages are 0, it is counted (``zero_spread_groups``). RLOO's and
                     REINFORCE++'s estimators (per-token advantages ``A_t``): advantages.py
negative advantages  ``A_i <- w A_i`` where ``A_i < 0`` (``negative_advantage_scale`` w; 1 = GRPO).
                     w = 0 trains only on the completions better than their group's mean
                     (filtered behaviour cloning, as RAFT / ReST): no push away from sampled
                     tokens, which on a small low-entropy policy spreads probability mass and
                     raised the entropy in our CPU runs (README, RL section)
token ratio (GRPO)   ``ratio_t = exp(lp_t - lp_old_t)``
sequence ratio       GSPO (Zheng et al. 2025): ``s_i = exp(mean_t (lp_t - lp_old_t))``, applied
                     per token as ``sg(s_i) * exp(lp_t - sg(lp_t))`` (same value, per-token
                     gradient; GSPO-token)
sequence-sum ratio   RLOO (TRL's RLOOTrainer): ``s_i = exp(sum_t (lp_t - lp_old_t))``, with its
                     gradient through every token; the clipped objective below is then one term
                     per completion, spread over its tokens with weight ``1/|y_i|`` so that
                     ``sequence_mean`` gives TRL's ``mean_i -min(s_i A_i, clip(s_i) A_i)``
clipped objective    ``l_t = -min(ratio_t A_i, clip(ratio_t, 1 - eps_lo, 1 + eps_hi) A_i)``;
                     eps_hi > eps_lo is DAPO's clip-higher (e.g. 0.2 / 0.28); GSPO uses ~3e-4/4e-4
KL to the reference  ``k1 = lp - lp_ref``;  ``k3 = exp(lp_ref - lp) - (lp_ref - lp) - 1``
                     (Schulman's unbiased, non-negative estimator, as GRPO); ``l_t += b * k``;
                     b = 0: no reference pass at all
aggregation          ``sequence_mean`` (GRPO): ``mean_i (1/|y_i|) sum_t l_t``
                     ``token_mean`` (DAPO): ``sum_{i,t} l_t / sum_i |y_i|``
                     ``constant`` (Dr. GRPO): ``sum_{i,t} l_t / (N * L_max)``, L_max = max new tokens
overlong shaping     DAPO: reward += 0 if ``|y| <= L_max - L_c``; ``(L_max - L_c - |y|) / L_c``
                     if ``|y| <= L_max``; -1 beyond (L_c = the soft cache length)
===================  =====================================================================

Every aggregation is returned as ``(loss_sum, weight)`` (per-token terms scaled by 1/|y_i| for
``sequence_mean``; weight = completions, trained tokens, or completions * L_max), so the trainer
divides the summed loss of all micro-batches by their summed weight and accumulation is exact.
Completions are identified by ``segment_ids`` within a row, so packed rows need nothing else.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

AGGREGATIONS = ("sequence_mean", "token_mean", "constant")
KL_ESTIMATORS = ("k1", "k3")
IMPORTANCE_LEVELS = ("token", "sequence", "sequence_sum")


def overlong_penalty(lengths, *, max_len: int, cache_len: int) -> np.ndarray:
    """DAPO's soft overlong punishment per completion (0 down to -1; see the table)."""
    lengths = np.asarray(lengths, np.float64)
    if cache_len <= 0:
        return np.where(lengths > max_len, -1.0, 0.0)
    soft = (max_len - cache_len - lengths) / cache_len
    return np.where(lengths <= max_len - cache_len, 0.0, np.where(lengths <= max_len, soft, -1.0))


def _per_sequence(values: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """Per token [B, T], the sum of `values` over the token's completion (its segment in its row)."""
    b, t = segment_ids.shape
    ids = (jnp.arange(b)[:, None] * (t + 1) + segment_ids).reshape(-1)
    sums = jax.ops.segment_sum(values.reshape(-1), ids, num_segments=b * (t + 1))
    return sums[ids].reshape(b, t)


def _inverse_lengths(loss_mask: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """Per trained token, 1 / (its completion's trained-token count); 0 elsewhere."""
    mask = loss_mask.astype(jnp.float32)
    seg = jnp.where(mask > 0, segment_ids, 0)  # segment 0 collects padding/prompt tokens
    return jnp.where(mask > 0, 1.0 / jnp.maximum(_per_sequence(mask, seg), 1.0), 0.0)


def _weight(num_sequences, num_tokens, aggregation: str, max_completion_len: int | None) -> jax.Array:
    if aggregation == "sequence_mean":
        return num_sequences
    if aggregation == "token_mean":
        return num_tokens
    if aggregation == "constant":
        if not max_completion_len:
            raise ValueError("aggregation 'constant' (Dr. GRPO) needs max_completion_len")
        return num_sequences * max_completion_len
    raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {AGGREGATIONS}")


def aggregation_weight(loss_mask: jax.Array, segment_ids: jax.Array, aggregation: str,
                       max_completion_len: int | None = None) -> jax.Array:
    """What the aggregated loss is a mean over, from the batch alone: completions, trained tokens
    or completions * L_max (the trainer divides the summed loss by it)."""
    num_sequences = jnp.sum(_inverse_lengths(loss_mask, segment_ids))
    return _weight(num_sequences, jnp.sum(loss_mask.astype(jnp.float32)), aggregation, max_completion_len)


def kl_penalty(lp: jax.Array, lp_ref: jax.Array, estimator: str) -> jax.Array:
    """Per-token estimate of KL(policy || reference) from sampled tokens (k1 or k3)."""
    if estimator == "k1":
        return lp - lp_ref
    if estimator == "k3":
        d = lp_ref - lp
        return jnp.exp(d) - d - 1.0
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


def policy_loss(
    lp: jax.Array,
    advantages: jax.Array,
    loss_mask: jax.Array,
    segment_ids: jax.Array,
    *,
    lp_old: jax.Array | None = None,
    lp_ref: jax.Array | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    importance: str = "token",
    aggregation: str = "sequence_mean",
    max_completion_len: int | None = None,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """(loss_sum, weight, metric_sums) for one batch of completion tokens (arrays [B, T]).

    `advantages` is per token (each completion's A_i on its tokens). Without `lp_old` (a single
    optimisation pass per batch of rollouts) the ratio is 1 with the policy's gradient, as in
    GRPO. metric_sums are token sums (``tokens``), except ``sequences``; divide by them to log.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {AGGREGATIONS}")
    if importance not in IMPORTANCE_LEVELS:
        raise ValueError(f"unknown importance level {importance!r}; expected one of {IMPORTANCE_LEVELS}")
    lp = lp.astype(jnp.float32)
    mask = loss_mask.astype(jnp.float32)
    adv = advantages.astype(jnp.float32)
    lp_old = jax.lax.stop_gradient(lp) if lp_old is None else lp_old.astype(jnp.float32)
    seg = jnp.where(mask > 0, segment_ids, 0)
    inv_len = _inverse_lengths(loss_mask, segment_ids)
    log_ratio = (lp - lp_old) * mask
    if importance == "sequence":
        seq_log_ratio = jax.lax.stop_gradient(_per_sequence(log_ratio, seg) * inv_len)
        log_ratio = seq_log_ratio + lp - jax.lax.stop_gradient(lp)
    elif importance == "sequence_sum":
        log_ratio = _per_sequence(log_ratio, seg) * mask
    ratio = jnp.exp(log_ratio)
    clipped = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = -jnp.minimum(ratio * adv, clipped * adv)
    metrics = {}
    if beta and lp_ref is not None:
        kl = kl_penalty(lp, lp_ref.astype(jnp.float32), kl_estimator)
        per_token = per_token + beta * kl
        metrics["kl"] = jnp.sum(jax.lax.stop_gradient(kl) * mask)
    num_sequences = jnp.sum(inv_len)  # each completion's tokens sum to 1
    num_tokens = jnp.sum(mask)
    weight = _weight(num_sequences, num_tokens, aggregation, max_completion_len)
    loss_sum = jnp.sum(per_token * (inv_len if aggregation == "sequence_mean" else mask))
    r = jax.lax.stop_gradient(ratio)
    metrics.update(
        tokens=num_tokens,
        sequences=jax.lax.stop_gradient(num_sequences),
        clip_low=jnp.sum(((r < 1.0 - clip_low) & (adv < 0)) * mask),
        clip_high=jnp.sum(((r > 1.0 + clip_high) & (adv > 0)) * mask),
        ratio=jnp.sum(r * mask),
    )
    return loss_sum, weight, metrics
