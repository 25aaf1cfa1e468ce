"""Preference objectives on per-sequence log-probs: the DPO family, SimPO, ORPO and KTO.

Everything here is a pure float32 function of per-sequence *summed* log-probs (and lengths, for
the length-normalised losses), so the trainer computes one forward pass and every loss reuses it.
Notation: ``c``/``r`` are the policy's summed log-probs of the chosen/rejected completion,
``c0``/``r0`` the reference model's, ``|y|`` a completion's trained-token count, ``avg(x) = x/|y|``,
``b`` = beta, ``ls`` = label_smoothing, ``s`` = sigmoid, ``logits = (c - r) - (c0 - r0)``.

=========  ==================================================================  ==================
type       per-pair loss                                                       default hparams
=========  ==================================================================  ==================
sigmoid    DPO (Rafailov et al. 2023), conservative cDPO with ls > 0:          b=0.1, ls=0
           ``-(1-ls) log s(b*logits) - ls log s(-b*logits)``
robust     rDPO (Chowdhury et al. 2024), unbiased under label noise ls:        b=0.1, ls=0
           ``(-(1-ls) log s(b*logits) + ls log s(-b*logits)) / (1 - 2 ls)``
hinge      SLiC (Zhao et al. 2023): ``relu(1 - b*logits)``                     b=0.1
ipo        IPO (Azar et al. 2023), logps length-averaged first (as TRL):       b=0.1
           ``(logits_avg - 1/(2b))^2``
dpo_norm   length-normalised DPO (Tulu 3): the sigmoid loss on                 b=5.0, ls=0
           ``logits_avg = (avg c - avg r) - (avg c0 - avg r0)``
simpo      SimPO (Meng et al. 2024), reference-free:                           b=2.0, gamma=1.0
           ``-(1-ls) log s(b(avg c - avg r) - gamma) - ls log s(-(...))``      (gamma/b = 0.5)
orpo       ORPO (Hong et al. 2024), reference-free, lambda = beta (as TRL):    b=0.1
           ``-avg c - b log s(log_odds)``, ``log_odds = (avg c - avg r) -
           (log(1 - exp(avg c)) - log(1 - exp(avg r)))``
kto        paired KTO (Ethayarajh et al. 2024; TRL's former ``kto_pair``):     b=0.1, w_d=w_u=1
           ``(w_d (1 - s(b((c-c0) - z_r))) + w_u (1 - s(b(z_c - (r-r0))))) / 2``
           with reference points ``z_c = max(0, mean(c-c0))``,
           ``z_r = max(0, mean(r-r0))`` over the batch, detached
=========  ==================================================================  ==================

Unpaired KTO (``kto_loss``, prompt/completion/label data, TRL's KTOTrainer) uses one reference
point for every example: ``z = max(0, mean(kl_logps - kl_ref_logps))`` over completions paired
with a *mismatched* prompt (the estimate of KL(policy || reference)), detached; desirable
examples cost ``w_d (1 - s(b((x - x0) - z)))`` and undesirable ones ``w_u (1 - s(b(z - (x - x0))))``.

``sft_weight > 0`` adds the RPO term (Pang et al. 2024) ``sft_weight * (-avg c)``: the chosen
completion's length-normalised NLL (ORPO already has it with weight 1).

Rewards (metrics): ``b (c - c0)`` / ``b (r - r0)`` for reference-based losses (with the
length-averaged logps for ipo and dpo_norm), ``b avg c`` / ``b avg r`` for simpo and orpo (as
TRL's CPO/ORPO trainers). ``logps/*`` are always the summed log-probs.

``valid`` (optional bool [B]) marks the real pairs of a batch with empty slots (packed pairs have a
fixed number of pair slots per row): batch means (metrics, KTO reference points) run over the
real pairs only, and an empty slot's loss is 0 with no gradient. Without it every pair counts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxtune.objectives.logprobs import token_stats

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "dpo_norm", "simpo", "orpo", "kto")
REFERENCE_FREE = ("simpo", "orpo")
# Length-normalised losses: they need chosen_lengths / rejected_lengths.
LENGTH_NORMALISED = ("ipo", "dpo_norm", "simpo", "orpo")

# Paper / TRL defaults, used when a hyperparameter is left as None.
DEFAULT_BETA = {"sigmoid": 0.1, "robust": 0.1, "hinge": 0.1, "ipo": 0.1, "dpo_norm": 5.0, "simpo": 2.0,
                "orpo": 0.1, "kto": 0.1}
DEFAULT_SIMPO_GAMMA = 1.0
_HPARAMS = ("label_smoothing", "gamma", "desirable_weight", "undesirable_weight", "sft_weight")


def sequence_logps(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(summed log p of the trained tokens, their count) per sequence, float32 [...], from full logits."""
    return masked_sequence_sums(token_stats(logits, targets).logp, loss_mask)


def masked_sequence_sums(logp: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of per-token log p [..., T] over the trained tokens, their count) per sequence, float32 [...]."""
    mask = loss_mask.astype(jnp.float32)
    return jnp.sum(logp * mask, axis=-1), jnp.sum(mask, axis=-1)


def _smoothed_sigmoid_loss(x: jax.Array, label_smoothing: float) -> jax.Array:
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(x) - label_smoothing * jax.nn.log_sigmoid(-x)


def _log1m_exp(x: jax.Array) -> jax.Array:
    """log(1 - exp(x)) for x < 0, stable near 0 and for very negative x."""
    return jnp.where(x > -0.6931472, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def _average(logps: jax.Array, lengths: jax.Array | None, loss_type: str, which: str) -> jax.Array:
    if lengths is None:
        raise ValueError(f"loss_type {loss_type!r} is length-normalised: pass {which}_lengths")
    return logps / jnp.maximum(lengths.astype(jnp.float32), 1.0)


def _mean(x: jax.Array, valid: jax.Array | None) -> jax.Array:
    """Batch mean, over the real pairs only when `valid` is given."""
    if valid is None:
        return jnp.mean(x)
    return jnp.sum(jnp.where(valid, x, 0.0)) / jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)


def _fill_empty(x: jax.Array | None, valid: jax.Array | None, fill: float) -> jax.Array | None:
    """Empty pair slots get a harmless constant (no log(0) in ORPO's odds, no gradient to the slot)."""
    if x is None or valid is None:
        return x
    return jnp.where(valid, x, jnp.asarray(fill, x.dtype))


def _metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps, valid=None) -> dict[str, jax.Array]:
    chosen_rewards = jax.lax.stop_gradient(chosen_rewards)
    rejected_rewards = jax.lax.stop_gradient(rejected_rewards)
    return {
        "rewards/chosen": _mean(chosen_rewards, valid),
        "rewards/rejected": _mean(rejected_rewards, valid),
        "rewards/accuracies": _mean((chosen_rewards > rejected_rewards).astype(jnp.float32), valid),
        "rewards/margins": _mean(chosen_rewards - rejected_rewards, valid),
        "logps/chosen": _mean(jax.lax.stop_gradient(chosen_logps), valid),
        "logps/rejected": _mean(jax.lax.stop_gradient(rejected_logps), valid),
    }


def preference_loss(
    loss_type: str,
    chosen_logps: jax.Array,
    rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array | None = None,
    ref_rejected_logps: jax.Array | None = None,
    *,
    chosen_lengths: jax.Array | None = None,
    rejected_lengths: jax.Array | None = None,
    beta: float | None = None,
    valid: jax.Array | None = None,
    **hparams,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(per-pair loss [B], metrics) for `loss_type`; see the module docstring for each formula.

    hparams: label_smoothing (sigmoid/robust/dpo_norm/simpo), gamma (simpo), desirable_weight /
    undesirable_weight (kto), sft_weight (RPO NLL term on chosen; any type). None = default.
    `valid`: bool [B], the real pairs (module docstring); empty slots lose 0.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown preference loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
    unknown = sorted(set(hparams) - set(_HPARAMS))
    if unknown:
        raise ValueError(f"unknown preference hyperparameters {unknown}; expected some of {', '.join(_HPARAMS)}")
    h = {k: v for k, v in hparams.items() if v is not None}
    beta = DEFAULT_BETA[loss_type] if beta is None else beta
    ls = float(h.get("label_smoothing", 0.0))
    if loss_type not in REFERENCE_FREE and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError(f"loss_type {loss_type!r} needs reference log-probs (ref_chosen_logps, ref_rejected_logps)")
    if valid is not None:
        valid = valid.astype(bool)
        chosen_logps, rejected_logps = _fill_empty(chosen_logps, valid, -1.0), _fill_empty(rejected_logps, valid, -2.0)
        ref_chosen_logps, ref_rejected_logps = _fill_empty(ref_chosen_logps, valid, -1.0), _fill_empty(ref_rejected_logps, valid, -2.0)
        chosen_lengths, rejected_lengths = _fill_empty(chosen_lengths, valid, 1.0), _fill_empty(rejected_lengths, valid, 1.0)
    c, r = chosen_logps.astype(jnp.float32), rejected_logps.astype(jnp.float32)
    if loss_type in LENGTH_NORMALISED or h.get("sft_weight"):
        avg_c = _average(c, chosen_lengths, loss_type, "chosen")
    if loss_type in LENGTH_NORMALISED:
        avg_r = _average(r, rejected_lengths, loss_type, "rejected")
    extra: dict[str, jax.Array] = {}

    if loss_type in REFERENCE_FREE:
        chosen_rewards, rejected_rewards = beta * avg_c, beta * avg_r
        if loss_type == "simpo":
            gamma = float(h.get("gamma", DEFAULT_SIMPO_GAMMA))
            losses = _smoothed_sigmoid_loss(beta * (avg_c - avg_r) - gamma, ls)
        else:  # orpo
            log_odds = (avg_c - avg_r) - (_log1m_exp(avg_c) - _log1m_exp(avg_r))
            nll = -avg_c
            losses = nll - beta * jax.nn.log_sigmoid(log_odds)
            extra = {"nll_loss": _mean(jax.lax.stop_gradient(nll), valid),
                     "log_odds_ratio": _mean(jax.lax.stop_gradient(jax.nn.log_sigmoid(log_odds)), valid),
                     "log_odds_chosen": _mean(jax.lax.stop_gradient(log_odds), valid)}
    else:
        c0, r0 = ref_chosen_logps.astype(jnp.float32), ref_rejected_logps.astype(jnp.float32)
        c0, r0 = jax.lax.stop_gradient(c0), jax.lax.stop_gradient(r0)
        if loss_type in LENGTH_NORMALISED:  # ipo, dpo_norm: every logp averaged over its completion
            c, r = avg_c, avg_r
            c0 = _average(c0, chosen_lengths, loss_type, "chosen")
            r0 = _average(r0, rejected_lengths, loss_type, "rejected")
        chosen_logratio, rejected_logratio = c - c0, r - r0
        chosen_rewards, rejected_rewards = beta * chosen_logratio, beta * rejected_logratio
        logits = chosen_logratio - rejected_logratio
        if loss_type in ("sigmoid", "dpo_norm"):
            losses = _smoothed_sigmoid_loss(beta * logits, ls)
        elif loss_type == "robust":
            if not 0.0 <= ls < 0.5:
                raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {ls}")
            losses = (-(1.0 - ls) * jax.nn.log_sigmoid(beta * logits) + ls * jax.nn.log_sigmoid(-beta * logits)) / (1.0 - 2.0 * ls)
        elif loss_type == "hinge":
            losses = jax.nn.relu(1.0 - beta * logits)
        elif loss_type == "ipo":
            losses = jnp.square(logits - 1.0 / (2.0 * beta))
        else:  # kto (paired): each side's reference point is the batch's mean log-ratio of the other
            w_d, w_u = float(h.get("desirable_weight", 1.0)), float(h.get("undesirable_weight", 1.0))
            kl_chosen = jax.lax.stop_gradient(jnp.maximum(_mean(chosen_logratio, valid), 0.0))
            kl_rejected = jax.lax.stop_gradient(jnp.maximum(_mean(rejected_logratio, valid), 0.0))
            losses = 0.5 * (w_d * (1.0 - jax.nn.sigmoid(beta * (chosen_logratio - kl_rejected)))
                            + w_u * (1.0 - jax.nn.sigmoid(beta * (kl_chosen - rejected_logratio))))
            extra = {"kl": kl_chosen}

    sft_weight = float(h.get("sft_weight", 0.0))
    if sft_weight:
        losses = losses + sft_weight * (-avg_c)
    metrics = _metrics(chosen_rewards, rejected_rewards, chosen_logps.astype(jnp.float32),
                       rejected_logps.astype(jnp.float32), valid)
    metrics.update(extra)
    if valid is not None:
        losses = jnp.where(valid, losses, 0.0)
    return losses, metrics


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
    `valid`: bool [B], the real examples (module docstring); empty slots lose 0 and count nowhere.
    """
    beta = DEFAULT_BETA["kto"] if beta is None else beta
    logps, ref_logps = logps.astype(jnp.float32), jax.lax.stop_gradient(ref_logps.astype(jnp.float32))
    kl = _mean(kl_logps.astype(jnp.float32) - ref_kl_logps.astype(jnp.float32), None if valid is None else valid.astype(bool))
    kl = jax.lax.stop_gradient(jnp.maximum(kl, 0.0))
    logratio = logps - ref_logps
    good = desirable.astype(bool)
    losses = jnp.where(
        good,
        desirable_weight * (1.0 - jax.nn.sigmoid(beta * (logratio - kl))),
        undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (kl - logratio))),
    )
    if valid is not None:  # an empty slot is neither desirable nor undesirable
        valid = valid.astype(bool)
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
