"""The `dpo` objective: paired preference losses on per-sequence log-probs (the DPO family,
SimPO, ORPO, paired KTO), selected by `objective.dpo.loss_type`.

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
kto_pair   paired KTO (Ethayarajh et al. 2024; TRL's former ``kto_pair``;     b=0.1, w_d=w_u=1
           ``kto`` is accepted as its old name):
           ``(w_d (1 - s(b((c-c0) - z_r))) + w_u (1 - s(b(z_c - (r-r0))))) / 2``
           with reference points ``z_c = max(0, mean(c-c0))``,
           ``z_r = max(0, mean(r-r0))`` over the batch, detached
=========  ==================================================================  ==================

Unpaired KTO (prompt/completion/label records) is its own objective: kto.py.

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
import ml_collections

from jaxtune.errors import UserError
from jaxtune.objectives import base, pairs
from jaxtune.logprobs import masked_sequence_sums, token_stats
from jaxtune.objectives.segments import masked_mean

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "dpo_norm", "simpo", "orpo", "kto_pair")
LOSS_ALIASES = {"kto": "kto_pair"}  # old spellings (configs saved by earlier versions)
REFERENCE_FREE = ("simpo", "orpo")
# Length-normalised losses: they need chosen_lengths / rejected_lengths.
LENGTH_NORMALISED = ("ipo", "dpo_norm", "simpo", "orpo")

# Paper / TRL defaults, used when a hyperparameter is left as None.
DEFAULT_BETA = {"sigmoid": 0.1, "robust": 0.1, "hinge": 0.1, "ipo": 0.1, "dpo_norm": 5.0, "simpo": 2.0,
                "orpo": 0.1, "kto_pair": 0.1}
DEFAULT_SIMPO_GAMMA = 1.0
_HPARAMS = ("label_smoothing", "gamma", "desirable_weight", "undesirable_weight", "sft_weight")


def sequence_logps(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(summed log p of the trained tokens, their count) per sequence, float32 [...], from full logits."""
    return masked_sequence_sums(token_stats(logits, targets).logp, loss_mask)


def _smoothed_sigmoid_loss(x: jax.Array, label_smoothing: float) -> jax.Array:
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(x) - label_smoothing * jax.nn.log_sigmoid(-x)


def _log1m_exp(x: jax.Array) -> jax.Array:
    """log(1 - exp(x)) for x < 0, stable near 0 and for very negative x."""
    return jnp.where(x > -0.6931472, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def _average(logps: jax.Array, lengths: jax.Array | None, loss_type: str, which: str) -> jax.Array:
    if lengths is None:
        raise ValueError(f"loss_type {loss_type!r} is length-normalised: pass {which}_lengths")
    return logps / jnp.maximum(lengths.astype(jnp.float32), 1.0)


def _fill_empty(x: jax.Array | None, valid: jax.Array | None, fill: float) -> jax.Array | None:
    """Empty pair slots get a harmless constant (no log(0) in ORPO's odds, no gradient to the slot)."""
    if x is None or valid is None:
        return x
    return jnp.where(valid, x, jnp.asarray(fill, x.dtype))


def _metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps, valid=None) -> dict[str, jax.Array]:
    chosen_rewards = jax.lax.stop_gradient(chosen_rewards)
    rejected_rewards = jax.lax.stop_gradient(rejected_rewards)
    return {
        "rewards/chosen": masked_mean(chosen_rewards, valid),
        "rewards/rejected": masked_mean(rejected_rewards, valid),
        "rewards/accuracies": masked_mean((chosen_rewards > rejected_rewards).astype(jnp.float32), valid),
        "rewards/margins": masked_mean(chosen_rewards - rejected_rewards, valid),
        "logps/chosen": masked_mean(jax.lax.stop_gradient(chosen_logps), valid),
        "logps/rejected": masked_mean(jax.lax.stop_gradient(rejected_logps), valid),
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
    undesirable_weight (kto_pair), sft_weight (RPO NLL term on chosen; any type). None = default.
    `valid`: bool [B], the real pairs (module docstring); empty slots lose 0.
    """
    loss_type = LOSS_ALIASES.get(loss_type, loss_type)
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
            extra = {"nll_loss": masked_mean(jax.lax.stop_gradient(nll), valid),
                     "log_odds_ratio": masked_mean(jax.lax.stop_gradient(jax.nn.log_sigmoid(log_odds)), valid),
                     "log_odds_chosen": masked_mean(jax.lax.stop_gradient(log_odds), valid)}
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
        else:  # kto_pair: each side's reference point is the batch's mean log-ratio of the other
            w_d, w_u = float(h.get("desirable_weight", 1.0)), float(h.get("undesirable_weight", 1.0))
            kl_chosen = jax.lax.stop_gradient(jnp.maximum(masked_mean(chosen_logratio, valid), 0.0))
            kl_rejected = jax.lax.stop_gradient(jnp.maximum(masked_mean(rejected_logratio, valid), 0.0))
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


@base.register("dpo", aliases=("preference",))
class DPO(pairs.PairObjective):
    """Paired preference losses on (prompt, chosen, rejected) records; `objective.dpo.loss_type` picks one.
    An encoder-decoder (T5) scores each completion as decoder targets given the prompt as encoder input."""

    encoder_decoder = True  # padded pairs of both streams (data/preference.seq2seq_rows; trainer.step.Seq2SeqApply)

    @classmethod
    def config_section(cls):
        c = cls.add_beta(super().config_section())
        # sigmoid | robust | hinge | ipo | dpo_norm | simpo | orpo | kto_pair (the table above)
        c.loss_type = "sigmoid"
        c.label_smoothing = 0.0  # cDPO (sigmoid, dpo_norm, simpo) / rDPO (robust) label-noise rate
        c.gamma = ml_collections.FieldReference(None, field_type=float)  # SimPO target margin; None: 1.0
        c.desirable_weight = 1.0  # kto_pair
        c.undesirable_weight = 1.0  # kto_pair
        c.sft_weight = 0.0  # RPO: + sft_weight * length-normalised NLL of the chosen completion
        return c

    @classmethod
    def loss_type(cls, section) -> str:
        return LOSS_ALIASES.get(section.loss_type, section.loss_type)

    @classmethod
    def reference_free(cls, section):
        return cls.loss_type(section) in REFERENCE_FREE

    @classmethod
    def _needs_reference_name(cls, section):
        return f"loss_type {section.loss_type!r}"

    @classmethod
    def validate(cls, config):
        o = cls.section_of(config)
        if o.loss_type not in LOSS_TYPES + tuple(LOSS_ALIASES):
            raise UserError(f"config key '{cls.key('loss_type')}' is {o.loss_type!r}; expected one of "
                            f"{', '.join(LOSS_TYPES)}")
        super().validate(config)
        if not 0.0 <= o.label_smoothing < 0.5:
            raise UserError(f"config key '{cls.key('label_smoothing')}' must be in [0, 0.5), got {o.label_smoothing}")
        if o.sft_weight < 0 or o.desirable_weight <= 0 or o.undesirable_weight <= 0:
            raise UserError(f"config keys {cls.key('sft_weight')} must be >= 0 and {cls.key('desirable_weight')}/"
                            "undesirable_weight > 0")

    def loss_name(self):
        return self.loss_type(self.section)

    def pair_losses(self, logps, lengths, ref, batch, valid=None):
        o = self.section
        return preference_loss(
            self.loss_type(o), logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1],
            chosen_lengths=lengths[:, 0], rejected_lengths=lengths[:, 1], beta=o.beta,
            label_smoothing=o.label_smoothing, gamma=o.gamma, desirable_weight=o.desirable_weight,
            undesirable_weight=o.undesirable_weight, sft_weight=o.sft_weight, valid=valid,
        )


__all__ = ["DEFAULT_BETA", "DPO", "LOSS_TYPES", "REFERENCE_FREE", "masked_sequence_sums", "preference_loss",
           "sequence_logps"]

