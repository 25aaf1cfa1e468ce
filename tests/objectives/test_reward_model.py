"""The reward-model objective's math: Bradley-Terry with margin and centering against hand-computed
values (TRL's RewardTrainer formula), the whole-sequence rows, and the pooled rewards."""

import math

import jax.numpy as jnp
import numpy as np

from jaxtune.objectives.reward_model import bradley_terry_loss, sequence_rewards, whole_sequences

RC, RR, M = [1.5, -0.25, 0.3], [0.5, 0.75, 0.3], [0.0, 0.5, 1.0]


def _logsig(x):
    return -math.log1p(math.exp(-x))


def test_bradley_terry_matches_hand_computed_values_with_margin_and_centering():
    losses, metrics = bradley_terry_loss(jnp.asarray(RC), jnp.asarray(RR), jnp.asarray(M), center_rewards_coefficient=0.01)
    hand = [-_logsig(c - r - m) + 0.01 * (c + r) ** 2 for c, r, m in zip(RC, RR, M)]
    np.testing.assert_allclose(losses, hand, rtol=1e-6)
    # TRL: loss = mean(-logsigmoid(rc - rr - m)) + coef * mean((rc + rr)^2): the mean of ours
    trl = np.mean([-_logsig(c - r - m) for c, r, m in zip(RC, RR, M)]) + 0.01 * np.mean(
        [(c + r) ** 2 for c, r in zip(RC, RR)])
    np.testing.assert_allclose(np.mean(losses), trl, rtol=1e-6)
    np.testing.assert_array_equal(metrics["accuracy"], [1.0, 0.0, 0.0])  # a tie is not a win
    np.testing.assert_allclose(metrics["margin"], [1.0, -1.0, 0.0])


def test_bradley_terry_without_margin_or_centering():
    losses, _ = bradley_terry_loss(jnp.asarray(RC), jnp.asarray(RR))
    np.testing.assert_allclose(losses, [-_logsig(c - r) for c, r in zip(RC, RR)], rtol=1e-6)


def test_whole_sequences_append_the_last_target_where_there_is_room():
    # Row 0: tokens 5 6 7 EOS(2) -> inputs 5 6 7, targets 6 7 2; row 1 fills all 4 inputs.
    inputs = jnp.asarray([[5, 6, 7, 0], [8, 9, 10, 11]])
    targets = jnp.asarray([[6, 7, 2, 0], [9, 10, 11, 2]])
    seg = jnp.asarray([[1, 1, 1, 0], [1, 1, 1, 1]])
    pos = jnp.asarray([[0, 1, 2, 0], [0, 1, 2, 3]])
    tokens, seg2, pos2 = whole_sequences(inputs, targets, seg, pos)
    np.testing.assert_array_equal(tokens, [[5, 6, 7, 2], [8, 9, 10, 11]])
    np.testing.assert_array_equal(seg2, [[1, 1, 1, 1], [1, 1, 1, 1]])
    np.testing.assert_array_equal(pos2, [[0, 1, 2, 3], [0, 1, 2, 3]])


def test_sequence_rewards_pool_the_last_non_pad_token():
    scores = jnp.arange(8, dtype=jnp.float32).reshape(2, 4, 1)
    tokens = jnp.asarray([[5, 6, 2, 0], [5, 6, 7, 8]])
    seg = jnp.asarray([[1, 1, 1, 0], [1, 1, 1, 1]])
    np.testing.assert_array_equal(sequence_rewards(scores, tokens, seg, None), [2.0, 7.0])
    # pad = eos (2): transformers skips the trailing EOS, and so do we
    np.testing.assert_array_equal(sequence_rewards(scores, tokens, seg, 2), [1.0, 7.0])
