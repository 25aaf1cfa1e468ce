"""Packed pairs by step (data.pair_batching='pairs'): a step holds exactly its pairs, in stream order,
in the rows they need (a bounded ladder of row counts), and trains as the padded step does."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune import trainer
from jaxtune.data import pair_packing, preference
from jaxtune.errors import UserError
from jaxtune.metrics import read_metrics
from jaxtune.objectives import preference_loss, segments, step_shapes
from tests.data.test_pipeline import CharTokenizer
from tests.objectives.test_packed_pairs import SEQ, TEMPLATES, _pairs, _scores, model  # noqa: F401 (fixture)
from tests.test_preference_training import dpo_config, files  # noqa: F401 (fixture)


def _stream(records, pairs_per_step, packing):
    transform = preference.PreferenceTransform(records, TEMPLATES, CharTokenizer(), seq_len=SEQ, truncation="truncate",
                                               seed=0)
    it, stats = preference.pair_dataset([records], [transform], batch_size=pairs_per_step, seed=3, packing=packing,
                                        max_pairs=4)
    return iter(it), stats


def test_a_packed_step_holds_exactly_the_padded_steps_pairs_in_fewer_rows():
    records = _pairs(40)
    padded, _ = _stream(records, 8, packing=False)
    packed, stats = _stream(records, 8, packing=True)
    rows = []
    for _ in range(7):  # past the first epoch: the reshuffled order is followed too
        a, b = next(padded), next(packed)
        mask = b[pair_packing.PAIR_MASK_KEY] > 0
        assert sorted(b[preference.INDEX_KEY][mask]) == sorted(a[preference.INDEX_KEY])  # the same 8 pairs
        assert int(mask.sum()) == 8 and (mask.sum(axis=1) <= 4).all()
        assert np.count_nonzero(b["segment_ids"]) == np.count_nonzero(a["segment_ids"])  # every token, no more
        rows.append(len(b["inputs"]))
        assert b["inputs"].shape[1] == 2 * SEQ
    assert max(rows) < 8  # short pairs share rows
    assert stats.step_rows.top == 8 and 1 <= stats.step_rows.base <= max(rows)


def test_a_restored_iterator_continues_with_the_same_steps():
    """Resume: the packed-step stream's position is Grain iterator state, like every other stream's."""
    records = _pairs(40)
    it, _ = _stream(records, 8, packing=True)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]
    resumed, _ = _stream(records, 8, packing=True)
    resumed.set_state(state)
    for a, b in zip(expected, (next(resumed) for _ in range(4))):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_row_ladder_is_short_whole_rows_per_device_and_always_fits():
    rows = pair_packing.StepRows(base=3, top=64)
    assert rows.ladder() == [3, 6, 12, 24, 48, 64]
    assert rows.ladder(4) == [4, 8, 12, 24, 48, 64]
    assert rows.bucket(7, 4) == 8 and rows.bucket(64, 4) == 64 and rows.bucket(1, 1) == 3
    with pytest.raises(ValueError):
        rows.bucket(65)
    assert step_shapes.row_multiple(8, 1, 1) == 8 and step_shapes.row_multiple(8, 2, 2) == 8
    assert step_shapes.row_multiple(2, 1, 4) == 1  # four processes share two data-parallel groups


def test_base_rows_follow_the_length_statistics():
    short = pair_packing.estimate_step_rows([10] * 64, seq_len=SEQ, max_pairs=16, pairs_per_shard=16, shards=2)
    assert short == pair_packing.StepRows(base=4, top=32)  # 8 pairs of 10 tokens per 80-token row
    long = pair_packing.estimate_step_rows([2 * SEQ] * 64, seq_len=SEQ, max_pairs=16, pairs_per_shard=16, shards=1)
    assert long.base == long.top == 16
    capped = pair_packing.estimate_step_rows([2] * 64, seq_len=SEQ, max_pairs=4, pairs_per_shard=16, shards=1)
    assert capped.base == 4  # max_pairs per row bounds it too


def test_length_sample_leaves_the_counters_alone():
    records = _pairs(12)
    transform = preference.PreferenceTransform(records, TEMPLATES, CharTokenizer(), seq_len=SEQ, truncation="drop",
                                               seed=0)
    lengths = pair_packing.sample_lengths([records], [transform])
    assert 0 < len(lengths) <= 12 and transform.stats.examples == 0 and transform.stats.dropped == 0


def test_row_budget_batching_stays_available():
    records = _pairs(40)
    transform = preference.PreferenceTransform(records, TEMPLATES, CharTokenizer(), seq_len=SEQ, truncation="truncate",
                                               seed=0)
    it, stats = preference.pair_dataset([records], [transform], batch_size=3, seed=0, packing=True, max_pairs=4,
                                        pair_batching="rows")
    batch = next(iter(it))
    assert batch["inputs"].shape == (3, 2 * SEQ) and batch[pair_packing.PAIR_MASK_KEY].sum() > 3
    assert stats.step_rows is None


def test_packed_steps_give_the_padded_steps_dpo_losses(model):  # noqa: F811
    """Step by step from the two pipelines (packed steps padded to a larger bucket with empty rows):
    the same DPO loss and metrics (the gradients of the same pairs agree: test_packed_pairs.py)."""
    module, params = model
    ref_params = jax.tree.map(lambda x: x * 0.9, params)
    forward = jax.jit(lambda p, batch: _scores(module, p, batch))
    records = _pairs(40)
    padded, _ = _stream(records, 8, packing=False)
    packed, stats = _stream(records, 8, packing=True)

    def step_loss(batch):
        logps, lengths, valid = forward(params, batch)
        ref = forward(ref_params, batch)[0]
        losses, metrics = preference_loss("sigmoid", logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], valid=valid)
        return float(jnp.sum(losses) / segments.pair_count(batch)), metrics

    for _ in range(2):
        a, b = next(padded), next(packed)
        b = step_shapes.pad_rows(b, stats.step_rows.bucket(len(b["inputs"]), 4))
        (loss_a, metrics_a), (loss_b, metrics_b) = step_loss(a), step_loss(b)
        assert loss_b == pytest.approx(loss_a, rel=2e-5)
        for key in metrics_a:
            assert float(metrics_b[key]) == pytest.approx(float(metrics_a[key]), rel=2e-5, abs=1e-5), key


def _run(files, tmp_path, name, **overrides):  # noqa: F811
    tiny = {"model.num_layers": 1, "model.hidden_size": 16, "model.intermediate_size": 32}
    # seq_len 48: two of these pairs (34 tokens each) share a 96-token row, so 8 pairs take 4 rows
    config = dpo_config(files, **{**tiny, "train.steps": 3, "data.seq_len": 48, "mesh.data": 2, **overrides})
    trainer.train(config, tmp_path / name, devices=jax.devices()[:2])
    return {r["step"]: r for r in read_metrics(tmp_path / name) if "loss" in r}


@pytest.mark.slow
def test_packed_dpo_trains_as_padded_dpo_step_for_step(files, tmp_path, capsys):  # noqa: F811
    """The same pairs per step: loss, log-probs and rewards equal the padded run's at every step
    (the updates too, or later steps would drift)."""
    padded = _run(files, tmp_path, "padded", **{"data.packing": False})
    packed = _run(files, tmp_path, "packed", **{"data.packing": True, "data.max_pairs_per_row": 4})
    assert sorted(packed) == sorted(padded) == [1, 2, 3]
    for step in padded:
        for key in ("loss", "logps/chosen", "logps/rejected", "rewards/margins", "grad_norm"):
            assert packed[step][key] == pytest.approx(padded[step][key], rel=2e-5, abs=1e-6), (step, key)
    assert packed[3]["tokens_per_s"] > 0
    assert "packing efficiency (non-pad fraction): 70.8%" in capsys.readouterr().out  # 35.4% padded


def test_an_unknown_pair_batching_is_a_user_error(files):  # noqa: F811
    with pytest.raises(UserError, match=r"data\.pair_batching"):
        dpo_config(files, **{"data.pair_batching": "tokens"})
