"""The reward-model objective's math: Bradley-Terry with margin and centering against hand-computed
values (TRL's RewardTrainer formula), the whole-sequence rows, and the pooled rewards."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.errors import UserError
from jaxtune.models.layers import last_token_index
from jaxtune.objectives.reward_model import bradley_terry_loss, pair_rewards, record_margin, whole_sequences

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
    # Row 0: tokens 5 6 7 EOS(2) -> inputs 5 6 7, targets 6 7 2; row 1 fills all 4 inputs; row 2 is empty.
    rows = {"inputs": np.array([[5, 6, 7, 0], [8, 9, 10, 11], [0, 0, 0, 0]]),
            "targets": np.array([[6, 7, 2, 0], [9, 10, 11, 2], [0, 0, 0, 0]]),
            "segment_ids": np.array([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]]),
            "positions": np.array([[0, 1, 2, 0], [0, 1, 2, 3], [0, 0, 0, 0]])}
    out = whole_sequences(rows)
    np.testing.assert_array_equal(out["inputs"], [[5, 6, 7, 2], [8, 9, 10, 11], [0, 0, 0, 0]])
    np.testing.assert_array_equal(out["segment_ids"], [[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]])
    np.testing.assert_array_equal(out["positions"], [[0, 1, 2, 3], [0, 1, 2, 3], [0, 0, 0, 0]])
    np.testing.assert_array_equal(rows["inputs"][0], [5, 6, 7, 0])  # the pipeline's rows are not modified


def test_pair_rewards_read_each_sequence_at_its_score_index():
    scores = jnp.arange(16, dtype=jnp.float32).reshape(4, 4, 1)  # [2B, T, 1] per-token scores, B = 2
    model = lambda params, tokens, positions, segment_ids, frozen=None, rngs=None: scores
    rows = jnp.zeros((2, 2, 4), jnp.int32)
    batch = {"inputs": rows, "positions": rows, "segment_ids": rows, "score_index": jnp.asarray([[2, 3], [0, 1]])}
    np.testing.assert_array_equal(pair_rewards(model, None, batch), [[2.0, 7.0], [8.0, 13.0]])


def test_last_token_index_on_host_arrays_skips_a_trailing_pad_valued_token():
    tokens, seg = np.array([[5, 6, 2, 0], [5, 6, 7, 8]]), np.array([[1, 1, 1, 0], [1, 1, 1, 1]])
    np.testing.assert_array_equal(last_token_index(tokens, seg), [2, 3])
    np.testing.assert_array_equal(last_token_index(tokens, seg, 2), [1, 3])  # pad = eos (2), as transformers
    assert isinstance(last_token_index(tokens, seg), np.ndarray)


def test_bad_margin_is_an_error_naming_the_record():
    with pytest.raises(UserError, match="pairs.jsonl: record 3: field 'margin' is 'big'"):
        record_margin({"margin": "big"}, "pairs.jsonl: record 3")
    assert record_margin({}, "x") == 0.0 and record_margin({"margin": 2}, "x") == 2.0


def test_loss_sums_over_micro_batches_equal_the_global_batch_mean():
    """Sums + the pair count as weight: two halves add up to the global batch's mean exactly."""
    from jaxtune import config as config_lib
    from jaxtune.objectives import base
    from jaxtune.objectives.reward_model import RewardModel

    config = config_lib.base_config()
    config.objective.type = "reward"
    config.objective.reward = dict(center_rewards_coefficient=0.05)
    objective = RewardModel(config)
    rng = np.random.default_rng(0)
    scores = jnp.asarray(rng.normal(size=(8, 5, 1)), jnp.float32)  # [2B, T, 1], B = 4 pairs
    model = lambda params, tokens, positions, segment_ids, frozen=None, rngs=None: scores[tokens[:, 0]]
    rows = jnp.broadcast_to(jnp.arange(8).reshape(4, 2, 1), (4, 2, 5))  # row ids pick their scores
    batch = {"inputs": rows, "positions": rows, "segment_ids": rows, "index": jnp.arange(4),
             "score_index": jnp.asarray(rng.integers(0, 5, (4, 2))), "margin": jnp.asarray([0.0, 0.5, 0.0, 1.0])}
    weight = objective.weight(batch)
    assert float(weight) == 4.0
    full, full_metrics = base.normalise(*objective.loss(model, None, batch), weight)
    halves = [base.normalise(*objective.loss(model, None, {k: v[i:i + 2] for k, v in batch.items()}), weight)
              for i in (0, 2)]
    np.testing.assert_allclose(halves[0][0] + halves[1][0], full, rtol=1e-6)
    for key in ("accuracy", "margin", "rewards/chosen"):
        np.testing.assert_allclose(halves[0][1][key] + halves[1][1][key], full_metrics[key], rtol=1e-6)
    # the global mean is TRL's formula on the whole batch
    r = np.asarray(pair_rewards(model, None, batch))
    trl = np.mean([-_logsig(c - j - m) for (c, j), m in zip(r, [0.0, 0.5, 0.0, 1.0])]) + 0.05 * np.mean(
        (r[:, 0] + r[:, 1]) ** 2)
    np.testing.assert_allclose(full, trl, rtol=1e-5)
