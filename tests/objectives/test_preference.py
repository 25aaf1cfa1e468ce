"""Each preference loss against hand-computed values, its gradient sign, and the step-0 identities."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.objectives import kto_loss, preference_loss, sequence_logps
from jaxtune.objectives.preference import LOSS_TYPES, REFERENCE_FREE

# Two pairs: summed log-probs of policy / reference and completion lengths.
C, R = [-10.0, -20.0], [-12.0, -15.0]
C0, R0 = [-11.0, -18.0], [-11.0, -16.0]
LC, LR = [5.0, 10.0], [4.0, 5.0]


def logsig(x):
    return -math.log1p(math.exp(-x))


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def _hand(loss_type, i, beta, ls=0.0, gamma=1.0, w_d=1.0, w_u=1.0):
    c, r, c0, r0, lc, lr = C[i], R[i], C0[i], R0[i], LC[i], LR[i]
    z = (c - r) - (c0 - r0)
    if loss_type == "sigmoid":
        return -(1 - ls) * logsig(beta * z) - ls * logsig(-beta * z)
    if loss_type == "robust":
        return (-(1 - ls) * logsig(beta * z) + ls * logsig(-beta * z)) / (1 - 2 * ls)
    if loss_type == "hinge":
        return max(0.0, 1 - beta * z)
    za = (c / lc - r / lr) - (c0 / lc - r0 / lr)
    if loss_type == "ipo":
        return (za - 1 / (2 * beta)) ** 2
    if loss_type == "dpo_norm":
        return -logsig(beta * za)
    if loss_type == "simpo":
        return -logsig(beta * (c / lc - r / lr) - gamma)
    if loss_type == "orpo":
        ac, ar = c / lc, r / lr
        log_odds = (ac - ar) - (math.log(1 - math.exp(ac)) - math.log(1 - math.exp(ar)))
        return -ac - beta * logsig(log_odds)
    if loss_type == "kto_pair":
        kl_c = max(0.0, sum(C[j] - C0[j] for j in range(2)) / 2)
        kl_r = max(0.0, sum(R[j] - R0[j] for j in range(2)) / 2)
        return 0.5 * (w_d * (1 - sig(beta * ((c - c0) - kl_r))) + w_u * (1 - sig(beta * (kl_c - (r - r0)))))
    raise AssertionError(loss_type)


def _call(loss_type, c=C, r=R, **kw):
    return preference_loss(
        loss_type, jnp.asarray(c), jnp.asarray(r), jnp.asarray(C0), jnp.asarray(R0),
        chosen_lengths=jnp.asarray(LC), rejected_lengths=jnp.asarray(LR), **kw,
    )


CASES = [
    ("sigmoid", dict(beta=0.1), {}),
    ("sigmoid", dict(beta=0.5, label_smoothing=0.2), dict(ls=0.2)),  # cDPO
    ("robust", dict(beta=0.3, label_smoothing=0.1), dict(ls=0.1)),
    ("hinge", dict(beta=0.1), {}),
    ("hinge", dict(beta=1.0), {}),  # pair 0 past the margin: zero loss
    ("ipo", dict(beta=0.1), {}),
    ("dpo_norm", dict(), {}),
    ("simpo", dict(), dict(gamma=1.0)),
    ("simpo", dict(beta=2.5, gamma=1.4), dict(gamma=1.4)),
    ("orpo", dict(), {}),
    ("kto_pair", dict(beta=0.2, desirable_weight=1.5, undesirable_weight=0.7), dict(w_d=1.5, w_u=0.7)),
]


def test_old_loss_type_name_kto_is_kto_pair():
    kw = dict(beta=0.2, desirable_weight=1.5, undesirable_weight=0.7)
    np.testing.assert_array_equal(np.asarray(_call("kto", **kw)[0]), np.asarray(_call("kto_pair", **kw)[0]))


@pytest.mark.parametrize("loss_type,kwargs,hand_kw", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_matches_hand_computed(loss_type, kwargs, hand_kw):
    from jaxtune.objectives.preference import DEFAULT_BETA

    beta = kwargs.get("beta", DEFAULT_BETA[loss_type])
    losses, metrics = _call(loss_type, **kwargs)
    expected = [_hand(loss_type, i, beta, **hand_kw) for i in range(2)]
    np.testing.assert_allclose(np.asarray(losses), expected, rtol=1e-5, atol=1e-6)
    assert losses.dtype == jnp.float32
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
            "logps/chosen", "logps/rejected"} <= set(metrics)


def test_dpo_literal_value_and_rewards():
    losses, m = _call("sigmoid", beta=0.1)
    # pair 0: logits = (-10 + 12) - (-11 + 11) = 2 -> -log sigmoid(0.2)
    assert float(losses[0]) == pytest.approx(0.5981389, abs=1e-6)
    # rewards: 0.1 * (c - c0) = [0.1, -0.2]; 0.1 * (r - r0) = [-0.1, 0.1]
    assert float(m["rewards/chosen"]) == pytest.approx(-0.05, abs=1e-6)
    assert float(m["rewards/rejected"]) == pytest.approx(0.0, abs=1e-6)
    assert float(m["rewards/accuracies"]) == pytest.approx(0.5)
    assert float(m["rewards/margins"]) == pytest.approx(-0.05, abs=1e-6)
    assert float(m["logps/chosen"]) == pytest.approx(-15.0)
    assert float(m["logps/rejected"]) == pytest.approx(-13.5)


def test_simpo_and_orpo_defaults_follow_the_papers():
    simpo, _ = _call("simpo")
    np.testing.assert_allclose(np.asarray(simpo), [_hand("simpo", i, 2.0, gamma=1.0) for i in range(2)], rtol=1e-6)
    orpo, m = _call("orpo")
    np.testing.assert_allclose(np.asarray(orpo), [_hand("orpo", i, 0.1) for i in range(2)], rtol=1e-6)
    assert float(m["rewards/chosen"]) == pytest.approx(0.1 * (-2.0 - 2.0) / 2, abs=1e-6)  # beta * avg logp


def test_sft_weight_adds_length_normalised_nll():
    base, _ = _call("sigmoid", beta=0.1)
    rpo, _ = _call("sigmoid", beta=0.1, sft_weight=0.5)
    np.testing.assert_allclose(np.asarray(rpo - base), [0.5 * 10 / 5, 0.5 * 20 / 10], rtol=1e-6)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradient_raises_chosen_and_lowers_rejected(loss_type):
    beta = 0.05 if loss_type == "hinge" else None  # keep hinge inside its margin

    def total(c, r):
        losses, _ = _call(loss_type, c=c, r=r, beta=beta)
        return jnp.sum(losses)

    gc, gr = jax.grad(total, argnums=(0, 1))(jnp.asarray(C), jnp.asarray(R))
    assert np.all(np.asarray(gc) < 0) and np.all(np.asarray(gr) > 0), (gc, gr)


@pytest.mark.parametrize("loss_type", [t for t in LOSS_TYPES if t not in REFERENCE_FREE])
def test_policy_equal_to_reference_gives_zero_rewards(loss_type):
    logps = jnp.asarray([-7.0, -3.0, -12.0])
    losses, m = preference_loss(loss_type, logps, logps - 1.0, logps, logps - 1.0,
                                chosen_lengths=jnp.full(3, 4.0), rejected_lengths=jnp.full(3, 4.0))
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert float(m[key]) == 0.0
    if loss_type in ("sigmoid", "dpo_norm", "robust"):
        np.testing.assert_allclose(np.asarray(losses), math.log(2.0), rtol=1e-6)


def test_sequence_logps_ignores_padding():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 6, 11)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, (2, 6)), jnp.int32)
    mask = jnp.asarray([[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]])
    sums, lengths = sequence_logps(logits, targets, mask)
    logp = jax.nn.log_softmax(np.asarray(logits), -1)
    expected = [sum(float(logp[b, t, targets[b, t]]) for t in range(6) if mask[b, t]) for b in range(2)]
    np.testing.assert_allclose(np.asarray(sums), expected, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(lengths), [3, 4])
    # Garbage in padded positions changes nothing.
    noisy = logits.at[0, 4:].set(100.0).at[1, :2].set(-50.0)
    np.testing.assert_allclose(np.asarray(sequence_logps(noisy, targets, mask)[0]), expected, rtol=1e-6)


def test_unpaired_kto_matches_hand_computed():
    logps, ref = jnp.asarray([-5.0, -9.0, -4.0]), jnp.asarray([-6.0, -8.0, -4.5])
    kl_logps, kl_ref = jnp.asarray([-20.0, -18.0, -22.0]), jnp.asarray([-21.0, -18.5, -21.0])
    desirable = jnp.asarray([1, 0, 1])
    losses, m = kto_loss(logps, ref, desirable, kl_logps, kl_ref, beta=0.5, desirable_weight=1.0,
                         undesirable_weight=2.0)
    kl = max(0.0, ((-20 + 21) + (-18 + 18.5) + (-22 + 21)) / 3)  # = 0.1667
    expected = [1 - sig(0.5 * (1.0 - kl)), 2.0 * (1 - sig(0.5 * (kl - (-1.0)))), 1 - sig(0.5 * (0.5 - kl))]
    np.testing.assert_allclose(np.asarray(losses), expected, rtol=1e-6)
    assert float(m["kl"]) == pytest.approx(kl, rel=1e-6)
    assert float(m["rewards/chosen"]) == pytest.approx(0.5 * (1.0 + 0.5) / 2, rel=1e-6)
    assert float(m["rewards/rejected"]) == pytest.approx(0.5 * -1.0, rel=1e-6)
    # The KL estimate is clamped at 0 and carries no gradient.
    g = jax.grad(lambda k: jnp.sum(kto_loss(logps, ref, desirable, k, kl_ref)[0]))(kl_logps)
    np.testing.assert_array_equal(np.asarray(g), 0.0)
    _, m_neg = kto_loss(logps, ref, desirable, kl_logps - 10.0, kl_ref)
    assert float(m_neg["kl"]) == 0.0


def test_bad_arguments_are_reported():
    with pytest.raises(ValueError, match="unknown preference loss_type 'dpo'"):
        _call("dpo")
    with pytest.raises(ValueError, match="needs reference log-probs"):
        preference_loss("sigmoid", jnp.zeros(2), jnp.zeros(2))
    with pytest.raises(ValueError, match="pass chosen_lengths"):
        preference_loss("simpo", jnp.zeros(2), jnp.zeros(2))
    with pytest.raises(ValueError, match="unknown preference hyperparameters"):
        _call("sigmoid", gama=1.0)
