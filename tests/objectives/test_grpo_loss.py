"""GRPO-family loss math against hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.objectives.advantages import group_advantages
from jaxtune.objectives.grpo_loss import aggregation_weight, kl_penalty, overlong_penalty, policy_loss


def test_group_advantages_by_hand():
    adv, zero = group_advantages([1, 0, 0, 1, 2, 2, 2, 2], 4)
    std = math.sqrt(4 * 0.25 / 3)  # sample std of (1, 0, 0, 1)
    a = 0.5 / (std + 1e-4)
    np.testing.assert_allclose(adv, [a, -a, -a, a, 0, 0, 0, 0], rtol=1e-6)
    assert zero == 1
    adv, zero = group_advantages([3, 1, 5, 5], 2, scale_rewards=False)  # Dr. GRPO: centred only
    np.testing.assert_allclose(adv, [1, -1, 0, 0])
    assert zero == 1
    adv, _ = group_advantages([3, 1, 5, 5], 2, scale_rewards=False, negative_scale=0.0)  # positive only
    np.testing.assert_allclose(adv, [1, 0, 0, 0])
    adv, _ = group_advantages([1, 0, 0, 1], 4, negative_scale=0.25)
    np.testing.assert_allclose(adv, [a, -a / 4, -a / 4, a], rtol=1e-6)
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages([1, 2, 3, 4], 3)


def test_overlong_penalty_by_hand():
    np.testing.assert_allclose(overlong_penalty([5, 6, 8, 10, 11], max_len=10, cache_len=4), [0, 0, -0.5, -1, -1])
    np.testing.assert_allclose(overlong_penalty([10, 11], max_len=10, cache_len=0), [0, -1])


def test_kl_estimators_by_hand():
    lp, ref = jnp.array([0.0]), jnp.array([math.log(2.0)])
    assert float(kl_penalty(lp, ref, "k1")[0]) == pytest.approx(-math.log(2.0))
    assert float(kl_penalty(lp, ref, "k3")[0]) == pytest.approx(2.0 - math.log(2.0) - 1.0)
    assert float(kl_penalty(ref, ref, "k3")[0]) == 0.0


# One packed row: completion 1 = tokens 0-1 (A = +1), completion 2 = token 2 (A = -1), token 3 padding.
# lp - lp_old = log 1.5, log 0.9, log 0.5: ratios 1.5, 0.9, 0.5; clip range (0.8, 1.28).
SEG = jnp.array([[1, 1, 2, 0]])
MASK = jnp.array([[1, 1, 1, 0]])
ADV = jnp.array([[1.0, 1.0, -1.0, 0.0]])
LP = jnp.array([[-1.0, -2.0, -0.5, -3.0]])
LP_OLD = LP - jnp.log(jnp.array([[1.5, 0.9, 0.5, 1.0]]))
CLIP = dict(clip_low=0.2, clip_high=0.28)


@pytest.mark.parametrize("aggregation, loss_sum, weight", [
    ("sequence_mean", (-1.28 - 0.9) / 2 + 0.8, 2.0),  # GRPO: per-completion mean, then over completions
    ("token_mean", -1.28 - 0.9 + 0.8, 3.0),  # DAPO
    ("constant", -1.28 - 0.9 + 0.8, 2 * 5.0),  # Dr. GRPO with L_max = 5
])
def test_clipped_loss_by_hand(aggregation, loss_sum, weight):
    s, w, m = policy_loss(LP, ADV, MASK, SEG, lp_old=LP_OLD, aggregation=aggregation, max_completion_len=5, **CLIP)
    assert float(s) == pytest.approx(loss_sum, rel=1e-5)
    assert float(w) == pytest.approx(weight)
    # token 0: ratio 1.5 > 1.28 with A > 0 (clipped high); token 2: ratio 0.5 < 0.8 with A < 0 (clipped low)
    assert (float(m["clip_high"]), float(m["clip_low"]), float(m["tokens"]), float(m["sequences"])) == (1, 1, 3, 2)


def test_gspo_sequence_ratio_by_hand():
    s, w, m = policy_loss(LP, ADV, MASK, SEG, lp_old=LP_OLD, importance="sequence", **CLIP)
    ratio1 = math.sqrt(1.5 * 0.9)  # exp(mean log ratio) of completion 1, inside the clip range
    # completion 2: ratio 0.5 clipped to 0.8, A = -1: min(-0.5, -0.8) = -0.8 -> loss +0.8
    assert float(s) == pytest.approx(-ratio1 + 0.8, rel=1e-5)
    assert float(w) == 2.0
    grad = jax.grad(lambda lp: policy_loss(lp, ADV, MASK, SEG, lp_old=LP_OLD, importance="sequence", **CLIP)[0])(LP)
    # d/dlp_t of -(sg(s) exp(lp_t - sg(lp_t))) A / |y|: -s A / |y| per token; completion 2 is clipped (no gradient)
    np.testing.assert_allclose(grad, [[-ratio1 / 2, -ratio1 / 2, 0, 0]], rtol=1e-5)


def test_kl_term_adds_beta_times_k3():
    ref = LP + math.log(2.0)  # lp_ref - lp = log 2 on every token
    base, _, _ = policy_loss(LP, ADV, MASK, SEG, lp_old=LP_OLD, aggregation="token_mean", **CLIP)
    s, _, m = policy_loss(LP, ADV, MASK, SEG, lp_old=LP_OLD, lp_ref=ref, beta=0.04, aggregation="token_mean", **CLIP)
    k3 = 2.0 - math.log(2.0) - 1.0
    assert float(s - base) == pytest.approx(0.04 * 3 * k3, rel=1e-5)
    assert float(m["kl"]) == pytest.approx(3 * k3, rel=1e-5)
    s0, _, m0 = policy_loss(LP, ADV, MASK, SEG, lp_old=LP_OLD, lp_ref=ref, beta=0.0, aggregation="token_mean", **CLIP)
    assert float(s0) == float(base) and "kl" not in m0  # beta 0: the reference is not used


def test_single_pass_gradient_is_the_policy_gradient():
    """Without old log-probs (one pass per rollout batch) the ratio is 1 and d loss / d lp = -A / |y|."""
    grad = jax.grad(lambda lp: policy_loss(lp, ADV, MASK, SEG)[0])(LP)
    np.testing.assert_allclose(grad, [[-0.5, -0.5, 1.0, 0.0]], rtol=1e-6)


@pytest.mark.parametrize("aggregation, importance", [("sequence_mean", "token"), ("token_mean", "token"),
                                                     ("constant", "sequence")])
def test_packed_equals_padded_and_accumulation_is_exact(aggregation, importance):
    rng = np.random.default_rng(0)
    lengths, adv_values = [3, 2, 4], [0.7, -1.2, 0.4]
    lp_seq = [rng.normal(size=n) - 1 for n in lengths]
    old_seq = [x + rng.normal(scale=0.3, size=x.shape) for x in lp_seq]
    kw = dict(aggregation=aggregation, importance=importance, max_completion_len=4, **CLIP)

    def rows(layout):  # layout: list of rows, each a list of completion indices (prompt token 0 first)
        t = 14
        out = {k: np.zeros((len(layout), t), np.float32) for k in ("lp", "old", "adv", "mask", "seg")}
        for r, items in enumerate(layout):
            pos = 0
            for s, i in enumerate(items, start=1):
                n = lengths[i]
                sl = slice(pos + 1, pos + 1 + n)  # one untrained prompt token before each completion
                out["seg"][r, pos : pos + 1 + n] = s
                out["lp"][r, sl], out["old"][r, sl], out["adv"][r, sl], out["mask"][r, sl] = lp_seq[i], old_seq[i], adv_values[i], 1
                pos += 1 + n
        return {k: jnp.asarray(v) for k, v in out.items()}

    @jax.jit
    def loss(b):
        return policy_loss(b["lp"], b["adv"], b["mask"], b["seg"].astype(jnp.int32), lp_old=b["old"], **kw)

    packed = loss(rows([[0, 1, 2]]))
    padded = loss(rows([[0], [1], [2]]))
    micro = [loss(rows([[0, 1]])), loss(rows([[2]]))]  # two micro-batches
    for a, b in [(packed, padded)]:
        assert float(a[0]) == pytest.approx(float(b[0]), rel=1e-6) and float(a[1]) == float(b[1])
    total = sum(float(m[0]) for m in micro) / sum(float(m[1]) for m in micro)
    assert total == pytest.approx(float(packed[0]) / float(packed[1]), rel=1e-6)


@pytest.mark.parametrize("aggregation, expected", [("sequence_mean", 2.0), ("token_mean", 3.0), ("constant", 10.0)])
def test_aggregation_weight_from_the_batch_alone(aggregation, expected):
    assert float(aggregation_weight(MASK, SEG, aggregation, 5)) == expected
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregation_weight(MASK, SEG, "median")
