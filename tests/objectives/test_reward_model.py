"""The reward-model objective's math: Bradley-Terry with margin and centering against hand-computed
values (TRL's RewardTrainer formula), the whole-sequence rows, and the pooled rewards."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.errors import UserError
from jaxtune.models.layers import last_token_index
from jaxtune.objectives.reward_model import bradley_terry_loss, pair_rewards, record_margin, whole_sequences
from tests.objectives.test_packed_pairs import model as tiny_llama  # noqa: F401 (fixture: a tiny Llama and weights)

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


def test_next_batch_cuts_rows_to_the_length_bucket_and_keeps_every_reward(tiny_llama):  # noqa: F811
    """A step's rows are cut to its longest sequence's bucket; a causal model's rewards (here: the
    tiny LM's first logit as the score) are the full-length rows' rewards."""
    from jaxtune import config as config_lib
    from jaxtune.objectives import step_shapes
    from jaxtune.objectives.reward_model import RewardModel

    assert step_shapes.length_buckets(100) == [16, 24, 32, 48, 64, 96, 100]
    assert step_shapes.length_bucket(17, 100) == 24 and step_shapes.length_bucket(97, 100) == 100
    config = config_lib.base_config()
    config.objective.type = "reward"
    config.objective.reward = dict(center_rewards_coefficient=0.0)
    config.data.packing = False  # one sequence per row (configs/reward.py's default)
    module, params = tiny_llama
    rng = np.random.default_rng(1)
    lengths = np.array([[5, 9], [20, 3]])  # the longest sequence, 20 tokens, takes the 24 bucket
    segment_ids = (np.arange(40) < lengths[..., None]).astype(np.int32)
    batch = {"inputs": rng.integers(1, 30, (2, 2, 40)).astype(np.int32) * segment_ids, "segment_ids": segment_ids,
             "positions": np.arange(40, dtype=np.int32) * segment_ids, "score_index": (lengths - 1).astype(np.int32),
             "margin": np.zeros(2, np.float32), "example_index": np.arange(2, dtype=np.int32)}
    cut = RewardModel(config).next_batch(None, iter([batch]), None)
    assert cut["inputs"].shape == (2, 2, 24) and cut["score_index"].shape == (2, 2)

    def scores(p, tokens, positions, segment_ids, frozen=None, rngs=None):
        return module.apply({"params": p}, tokens, positions=positions, segment_ids=segment_ids)[..., :1]

    rewards = jax.jit(lambda b: pair_rewards(scores, params, b))
    np.testing.assert_allclose(rewards({k: jnp.asarray(v) for k, v in cut.items()}),
                               rewards({k: jnp.asarray(v) for k, v in batch.items()}), rtol=1e-5, atol=1e-6)


def test_packed_reward_steps_give_the_padded_steps_loss(tiny_llama):  # noqa: F811
    """data.packing for a reward model: a step holds the padded step's pairs in fewer rows, each
    reward read at its sequence's last token there; the loss and metrics equal the padded step's."""
    from jaxtune import config as config_lib
    from jaxtune.data import pair_packing, preference
    from jaxtune.objectives import base
    from jaxtune.objectives.reward_model import RewardModel, RewardRows
    from tests.data.test_pipeline import CharTokenizer
    from tests.objectives.test_packed_pairs import SEQ, TEMPLATES, _pairs

    module, params = tiny_llama

    def scores(p, tokens, positions, segment_ids, frozen=None, rngs=None):
        return module.apply({"params": p}, tokens, positions=positions, segment_ids=segment_ids)[..., :1]

    records = _pairs(24)
    results = {}
    for packing in (False, True):
        config = config_lib.base_config()
        config.objective.type = "reward"
        config.objective.reward = dict(center_rewards_coefficient=0.05)
        config.data.packing = packing
        transform = RewardRows(preference.PreferenceTransform(records, TEMPLATES, CharTokenizer(), seq_len=SEQ,
                                                              truncation="truncate", seed=0), CharTokenizer.pad_id)
        it, stats = preference.pair_dataset([records], [transform], batch_size=8, seed=1, packing=packing, max_pairs=4)
        objective = RewardModel(config)
        objective.pipeline_stats = stats  # as train_dataset keeps them: the row ladder
        batch = objective.next_batch(None, iter(it), None)
        if packing:
            assert len(batch["inputs"]) < 8 and batch[pair_packing.PAIR_MASK_KEY].sum() == 8

        @jax.jit
        def step_loss(b, objective=objective):
            weight = objective.weight(b)
            return base.normalise(*objective.loss(scores, params, b), weight), weight

        (loss, metrics), weight = step_loss({k: jnp.asarray(v) for k, v in batch.items()})
        results[packing] = (loss, metrics), float(weight)
    (loss_a, metrics_a), weight_a = results[False]
    (loss_b, metrics_b), weight_b = results[True]
    assert weight_a == weight_b == 8.0
    np.testing.assert_allclose(float(loss_b), float(loss_a), rtol=1e-5)
    for key in metrics_a:
        np.testing.assert_allclose(float(metrics_b[key]), float(metrics_a[key]), rtol=1e-5, atol=1e-6, err_msg=key)
