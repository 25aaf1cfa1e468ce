"""PPO's math (InstructGPT-style RLHF: Ouyang et al. 2022; TRL's PPOTrainer): per-token rewards with
the KL folded in, GAE, whitening, and the clipped policy and value losses, as pure jnp functions.

Every array is laid out per *completion position*: [B, L], L = the longest completion, position t
the t-th sampled token. ``n_i`` is completion i's token count (its stop token included), so
``mask = t < n_i`` (the completion's tokens: ``~padding_mask`` in TRL) and
``value_mask = t <= n_i`` (one position more: ``~padding_mask_p1``). ``lp``/``lp_ref`` are the
sampling policy's and the reference's log-probs of the sampled tokens, ``V_t`` the value model's
estimate for the state *before* token t (the value head on the hidden state that predicts token t),
``s_i`` the completion's score (a reward model or verifiers), ``c`` = kl_coef.

Score convention (TRL's, kept for parity): the score is credited one position *after* the last
token, at ``e_i = n_i`` when ``n_i < L``, else at ``n_i - 1`` (a completion filling all L
positions). Position ``n_i`` has no sampled token, so its KL is 0 and its value ``V_{n_i}`` is the
value of the finished sequence (the hidden state at the stop token); it is trained towards the
score. With ``lam = 1`` this equals crediting the score on the last token; with ``lam < 1`` GAE
differs by that extra step.

===================  =====================================================================
quantity             formula
===================  =====================================================================
missing-EOS penalty  ``s_i <- s_i - p`` for a completion without the stop token (``p`` =
                     missing_eos_penalty; None = off)
KL per token         k1: ``lp - lp_ref``; k3: ``(exp(lr) - 1) - lr``, ``lr = lp_ref - lp``
                     (0 outside ``mask``)
reward per token     ``r_t = -c kl_t + [t = e_i] s_i``; with ``whiten_rewards``:
                     ``r <- whiten(r, value_mask, shift_mean=False)``, 0 outside value_mask
GAE                  ``delta_t = r_t + gamma V_{t+1} - V_t`` (``V_L = 0``; V is 0 outside
                     value_mask), ``A_t = delta_t + gamma lam A_{t+1}``; returns
                     ``R_t = A_t + V_t``; advantages then ``whiten(A, mask)``, 0 outside mask
whiten               ``(x - mean) * rsqrt(var + 1e-8)`` over the mask, ``var`` with Bessel's
                     correction (n / (n - 1)); ``shift_mean=False`` adds the mean back
policy loss          ``mean_mask max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))``,
                     ``ratio = exp(lp_new - lp_old)`` (eps = cliprange)
value loss           ``0.5 mean_value_mask max((v - R)^2, (clip(v, V - eps_v, V + eps_v) - R)^2)``
                     (eps_v = cliprange_value; ``V`` the rollout's values)
loss                 ``policy loss + vf_coef * value loss``
adaptive KL          Ziegler et al. 2019: ``c <- c (1 + clip(KL / target - 1, -0.2, 0.2) n / horizon)``
                     after each rollout of n samples with mean summed KL ``KL``
===================  =====================================================================

The losses come as *sums* with per-token weights (default: 1 / the batch's mask and value-mask
token counts, which gives TRL's means); a trainer that splits a global batch into micro-batches
passes the global batch's weights so the summed micro-batch losses equal the global means.
Metrics use TRL's names (`METRIC_NAMES`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

KL_ESTIMATORS = ("k1", "k3")
Moments = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
WHITEN_EPS = 1e-8  # TRL's masked_whiten: rsqrt(var + 1e-8)
METRIC_NAMES = (
    "objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward", "objective/scores",
    "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg", "val/clipfrac_avg",
    "policy/entropy_avg", "val/ratio", "val/ratio_var", "val/num_eos_tokens",
)


def completion_masks(lengths: jax.Array, max_len: int) -> tuple[jax.Array, jax.Array]:
    """(mask, value_mask) [B, L] float32 from completion lengths [B] (stop token included)."""
    t = jnp.arange(max_len)[None, :]
    n = jnp.asarray(lengths)[:, None]
    return (t < n).astype(jnp.float32), (t <= n).astype(jnp.float32)


def score_positions(lengths: jax.Array, max_len: int) -> jax.Array:
    """Where each score is credited [B]: one position after the last token, or the last position
    when the completion fills all `max_len` (TRL's ``sequence_lengths_p1`` rule)."""
    n = jnp.asarray(lengths)
    return jnp.where(n < max_len, n, jnp.maximum(n - 1, 0))


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over the mask (0 for an empty mask, where TRL divides by zero)."""
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def masked_var(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Variance over the mask with Bessel's correction, as TRL's masked_var(unbiased=True); 0 for
    fewer than two tokens (TRL: inf or an error), so a one-token rollout whitens to 0, not NaN."""
    centred = x - masked_mean(x, mask)
    count = jnp.sum(mask)
    return jnp.sum(centred * centred * mask) / jnp.maximum(count - 1.0, 1.0)


def masked_moments(x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean, variance) over the mask: the moments `masked_whiten` uses by default (this batch's)."""
    return masked_mean(x, mask), masked_var(x, mask)


def masked_whiten(x: jax.Array, mask: jax.Array, *, shift_mean: bool = True, moments: Moments | None = None) -> jax.Array:
    """(x - mean) / sqrt(var + 1e-8) over the mask (the mean added back when not `shift_mean`).
    `moments(x, mask) -> (mean, var)`: where they come from (default: this batch, masked_moments;
    several processes pass the moments of every process's batch)."""
    mean, var = (moments or masked_moments)(x, mask)
    whitened = (x - mean) * jax.lax.rsqrt(var + WHITEN_EPS)
    return whitened if shift_mean else whitened + mean


def kl_per_token(lp: jax.Array, lp_ref: jax.Array, estimator: str) -> jax.Array:
    """The sampling policy's KL to the reference per sampled token (k1 or k3)."""
    log_ratio = lp_ref - lp
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        return jnp.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {', '.join(KL_ESTIMATORS)}")


def penalise_missing_eos(scores: jax.Array, has_eos: jax.Array, penalty: float | None) -> jax.Array:
    """Scores [B] with `penalty` subtracted where the completion has no stop token (None: unchanged)."""
    if penalty is None:
        return scores
    return jnp.where(has_eos, scores, scores - penalty)


def token_rewards(scores: jax.Array, lp: jax.Array, lp_ref: jax.Array, lengths: jax.Array, *, kl_coef: float,
                  kl_estimator: str = "k1", whiten_rewards: bool = False,
                  moments: Moments | None = None) -> tuple[jax.Array, jax.Array]:
    """(rewards [B, L], kl [B, L]): ``-kl_coef * kl`` per token plus the score at its position (table)."""
    b, max_len = lp.shape
    mask, value_mask = completion_masks(lengths, max_len)
    kl = kl_per_token(lp, lp_ref, kl_estimator) * mask
    at_score = jax.nn.one_hot(score_positions(lengths, max_len), max_len, dtype=jnp.float32)
    rewards = -kl_coef * kl + at_score * jnp.asarray(scores, jnp.float32)[:, None]
    if whiten_rewards:
        rewards = masked_whiten(rewards, value_mask, shift_mean=False, moments=moments) * value_mask
    return rewards, kl


def gae(rewards: jax.Array, values: jax.Array, *, gamma: float, lam: float) -> tuple[jax.Array, jax.Array]:
    """(advantages, returns) [B, L] by generalised advantage estimation (Schulman et al. 2016),
    the value after the last position taken as 0. `values` must already be 0 outside value_mask."""
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    deltas = rewards + gamma * next_values - values

    def back(carry, delta):
        carry = delta + gamma * lam * carry
        return carry, carry

    _, advantages = jax.lax.scan(back, jnp.zeros_like(deltas[:, 0]), deltas.T, reverse=True)
    advantages = advantages.T
    return advantages, advantages + values


def rollout_targets(scores: jax.Array, lp: jax.Array, lp_ref: jax.Array, values: jax.Array, lengths: jax.Array, *,
                    kl_coef: float, kl_estimator: str = "k1", gamma: float = 1.0, lam: float = 0.95,
                    whiten_rewards: bool = False, moments: Moments | None = None) -> dict[str, jax.Array]:
    """Everything a rollout batch trains on: whitened advantages, returns, the masked values, the
    per-token rewards and KL, and the masks ([B, L] each). `scores` already carry the EOS penalty.
    `moments`: masked_whiten's (default: this batch's; several processes: every process's)."""
    mask, value_mask = completion_masks(lengths, lp.shape[1])
    values = values.astype(jnp.float32) * value_mask
    rewards, kl = token_rewards(scores, lp.astype(jnp.float32), lp_ref.astype(jnp.float32), lengths,
                                kl_coef=kl_coef, kl_estimator=kl_estimator, whiten_rewards=whiten_rewards,
                                moments=moments)
    advantages, returns = gae(rewards, values, gamma=gamma, lam=lam)
    return {"advantages": masked_whiten(advantages, mask, moments=moments) * mask, "returns": returns, "values": values,
            "rewards": rewards, "kl": kl, "mask": mask, "value_mask": value_mask}


def rollout_metrics(scores: jax.Array, lp: jax.Array, kl: jax.Array, mask: jax.Array, *, kl_coef: float,
                    num_eos_tokens) -> dict[str, jax.Array]:
    """TRL's rollout metrics: per-completion sums of the KL, the sampled tokens' negative log-probs
    (entropy estimate) and the KL penalty (non-score reward), averaged over completions. TRL sums
    the log-probs of padding (filled with 1.0) into its entropy; here only completion tokens count."""
    kl_sum = jnp.sum(kl * mask, axis=1)
    non_score = -kl_coef * kl_sum
    scores = jnp.asarray(scores, jnp.float32)
    return {"objective/kl": kl_sum.mean(), "objective/entropy": jnp.sum(-lp * mask, axis=1).mean(),
            "objective/non_score_reward": non_score.mean(), "objective/rlhf_reward": non_score.mean() + scores.mean(),
            "objective/scores": scores.mean(), "val/num_eos_tokens": jnp.asarray(num_eos_tokens, jnp.float32)}


def ppo_losses(lp: jax.Array, values_pred: jax.Array, batch: dict[str, jax.Array], *, cliprange: float = 0.2,
               cliprange_value: float = 0.2, vf_coef: float = 0.1, token_weight: jax.Array | None = None,
               value_weight: jax.Array | None = None, entropy: jax.Array | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metric sums) of one PPO mini-batch: the clipped policy loss plus vf_coef times the
    clipped value loss (table). `batch` holds the rollout's old_logps, advantages, returns, values,
    mask and value_mask [B, L]; `lp`/`values_pred` are the current policy's and value model's.

    `token_weight`/`value_weight` weigh each mask / value-mask token (default 1 / their counts in
    this batch: TRL's means); every metric is such a weighted sum, so micro-batch shares add up.
    `entropy` [B, L]: the policy's full-distribution entropy per position, for policy/entropy_avg."""
    mask, value_mask = batch["mask"], batch["value_mask"]
    w = jnp.sum(mask) ** -1 if token_weight is None else token_weight
    wv = jnp.sum(value_mask) ** -1 if value_weight is None else value_weight
    adv = batch["advantages"]
    log_ratio = (lp.astype(jnp.float32) - batch["old_logps"]) * mask
    ratio = jnp.exp(log_ratio)
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * jnp.clip(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = jnp.sum(jnp.maximum(pg_unclipped, pg_clipped) * mask) * w
    v = values_pred.astype(jnp.float32) * value_mask
    old_v, returns = batch["values"], batch["returns"]
    v_clipped = jnp.clip(v, old_v - cliprange_value, old_v + cliprange_value)
    vf_unclipped, vf_clipped = jnp.square(v - returns), jnp.square(v_clipped - returns)
    vf_loss = 0.5 * jnp.sum(jnp.maximum(vf_unclipped, vf_clipped) * value_mask) * wv
    sg = jax.lax.stop_gradient
    r = sg(ratio)
    metrics = {
        "loss/policy_avg": sg(pg_loss), "loss/value_avg": sg(vf_loss),
        "policy/clipfrac_avg": jnp.sum((sg(pg_clipped) > sg(pg_unclipped)) * mask) * w,
        "val/clipfrac_avg": jnp.sum((sg(vf_clipped) > sg(vf_unclipped)) * value_mask) * wv,
        "policy/approxkl_avg": 0.5 * jnp.sum(jnp.square(sg(log_ratio)) * mask) * w,
        "val/ratio": jnp.sum(r * mask) * w,
        "val/ratio_sq": jnp.sum(r * r * mask) * w,  # with val/ratio: val/ratio_var over the tokens
    }
    if entropy is not None:
        metrics["policy/entropy_avg"] = jnp.sum(sg(entropy) * mask) * w
    return pg_loss + vf_coef * vf_loss, metrics


def adaptive_kl_coef(kl_coef: float, current_kl: float, *, target: float, horizon: float, num_samples: int) -> float:
    """Ziegler et al.'s proportional controller: the next KL coefficient after a rollout of
    `num_samples` completions whose mean summed KL was `current_kl` (moves towards `target`)."""
    error = float(np.clip(current_kl / target - 1.0, -0.2, 0.2))
    return kl_coef * (1.0 + error * num_samples / horizon)
