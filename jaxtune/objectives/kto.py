"""The `kto` objective: unpaired KTO (Ethayarajh et al. 2024; TRL's KTOTrainer) on
(prompt, completion, label) records.

One reference point for every example: ``z = max(0, mean(kl_logps - kl_ref_logps))`` over
completions paired with a *mismatched* prompt (the estimate of KL(policy || reference)),
detached; desirable examples cost ``w_d (1 - s(b((x - x0) - z)))`` and undesirable ones
``w_u (1 - s(b(z - (x - x0))))`` (``x``/``x0``: the policy's/reference's summed log-probs of the
completion, ``b`` = beta, default 0.1). The data layer builds each example's mismatched row
(data/preference.py, `unpaired=True`): row 0 of the pair axis is the example, row 1 its KL row.
Paired KTO (on chosen/rejected pairs) is the `dpo` objective's loss_type `kto_pair`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxtune.data import preference
from jaxtune.errors import UserError
from jaxtune.objectives import base, pairs
from jaxtune.objectives.segments import masked_mean

DEFAULT_BETA = 0.1


def kto_loss(
    logps: jax.Array,
    ref_logps: jax.Array,
    desirable: jax.Array,
    kl_logps: jax.Array,
    ref_kl_logps: jax.Array,
    *,
    beta: float | None = None,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    valid: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Unpaired KTO: (per-example loss [B], metrics) from (prompt, completion, label) examples.

    `kl_logps`/`ref_kl_logps` score each prompt with a mismatched completion; their mean
    log-ratio (clamped at 0, no gradient) is the reference point z of the KTO value function.
    Reward metrics are means over the desirable (chosen) / undesirable (rejected) examples.
    `valid` (bool [B]) marks the real examples of a batch with empty slots (packed data): an empty
    slot loses 0, counts in no mean and leaves z alone. Without it every example counts.
    """
    beta = DEFAULT_BETA if beta is None else beta
    valid = None if valid is None else valid.astype(bool)
    logps, ref_logps = logps.astype(jnp.float32), jax.lax.stop_gradient(ref_logps.astype(jnp.float32))
    kl = masked_mean(kl_logps.astype(jnp.float32) - ref_kl_logps.astype(jnp.float32), valid)
    kl = jax.lax.stop_gradient(jnp.maximum(kl, 0.0))
    logratio = logps - ref_logps
    good = desirable.astype(bool)
    losses = jnp.where(
        good,
        desirable_weight * (1.0 - jax.nn.sigmoid(beta * (logratio - kl))),
        undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (kl - logratio))),
    )
    if valid is not None:  # an empty slot is neither desirable nor undesirable
        losses = jnp.where(valid, losses, 0.0)
        good, bad = good & valid, ~good & valid
    else:
        bad = ~good
    rewards = jax.lax.stop_gradient(beta * logratio)
    n_good = jnp.maximum(jnp.sum(good), 1)
    n_bad = jnp.maximum(jnp.sum(bad), 1)
    detached = jax.lax.stop_gradient(logps)
    metrics = {
        "kl": kl,
        "rewards/chosen": jnp.sum(jnp.where(good, rewards, 0.0)) / n_good,
        "rewards/rejected": jnp.sum(jnp.where(bad, rewards, 0.0)) / n_bad,
        "logps/chosen": jnp.sum(jnp.where(good, detached, 0.0)) / n_good,
        "logps/rejected": jnp.sum(jnp.where(bad, detached, 0.0)) / n_bad,
    }
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return losses, metrics


@base.register("kto")
class KTO(pairs.PairObjective):
    """Unpaired KTO; the batch's `label` says desirable (1) or undesirable (0). An encoder-decoder (T5)
    scores the completion (and the KL row's mismatched one) as decoder targets given the prompt."""

    encoder_decoder = True
    unpaired = True

    @classmethod
    def config_section(cls):
        c = cls.add_beta(super().config_section())
        c.desirable_weight = 1.0
        c.undesirable_weight = 1.0
        return c

    @classmethod
    def validate(cls, config):
        super().validate(config)
        o = cls.section_of(config)
        if o.desirable_weight <= 0 or o.undesirable_weight <= 0:
            raise UserError(f"config keys {cls.key('desirable_weight')}/undesirable_weight must be > 0")

    def pair_losses(self, logps, lengths, ref, batch, valid=None):
        o = self.section
        return kto_loss(logps[:, 0], ref[:, 0], pairs.per_pair(batch, preference.LABEL_KEY), logps[:, 1], ref[:, 1],
                        beta=o.beta, desirable_weight=o.desirable_weight, undesirable_weight=o.undesirable_weight,
                        valid=valid)
