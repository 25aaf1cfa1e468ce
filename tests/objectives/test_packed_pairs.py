"""Packed pairs (padding-free DPO): per-segment sums, and the same loss and gradients as padded pairs."""

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune import models, sharding
from jaxtune.data import pair_packing, preference
from jaxtune.data.pipeline import BATCH_KEYS
from jaxtune.objectives import model_token_stats, preference_loss, segments
from jaxtune.objectives.kto import kto_loss
from tests.data.test_pipeline import CharTokenizer

SEQ = 40
TEMPLATES = {"default": [("{prompt}", "{response}")]}


def test_segment_sums_match_numpy():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(3, 11)).astype(np.float32)
    ids = rng.integers(0, 5, size=(3, 11)).astype(np.int32)
    out = np.asarray(segments.segment_sums(jnp.asarray(values), jnp.asarray(ids), 4))
    expected = np.stack([[values[r][ids[r] == k].sum() for k in range(1, 5)] for r in range(3)])
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


def _pairs(n, unpaired=False):
    """Pairs of very different lengths (a realistic spread in miniature)."""
    if unpaired:
        return [{"prompt": "q" * (1 + i % 7), "completion": " a" * (1 + (3 * i) % 11), "label": i % 3 != 0}
                for i in range(n)]
    return [{"prompt": "q" * (1 + i % 7) + ":", "chosen": " yes" * (1 + i % 4), "rejected": " no" * (1 + (5 * i) % 9)}
            for i in range(n)]


def _batches(records, unpaired=False, ref=False, max_pairs=4, rows=3):
    """(padded [P, 2, T] batch, packed [rows, 2T] batch) holding the same P pairs."""
    ref_logps = None
    if ref:
        ref_logps = np.stack([-np.arange(len(records)) - 5.0, -2.0 * np.arange(len(records)) - 7.0], 1).astype(np.float32)
    transform = preference.PreferenceTransform(records, TEMPLATES, CharTokenizer(), seq_len=SEQ, truncation="truncate",
                                               seed=0, unpaired=unpaired, ref_logps=ref_logps)
    keys = preference.batch_keys(transform)
    examples = [transform(i, {**r, "_index": i}) for i, r in enumerate(records)]
    it = grain.MapDataset.source([{k: e[k] for k in keys} for e in examples]).to_iter_dataset()
    packed = next(iter(pair_packing.pack_pairs(it, seq_len=SEQ, max_pairs=max_pairs, pair_keys=keys[len(BATCH_KEYS):],
                                               bins=rows).batch(rows)))
    # The pairs the packed rows hold, in slot order, padded the usual way.
    order = packed[preference.INDEX_KEY][packed[pair_packing.PAIR_MASK_KEY] > 0]
    padded = {k: np.stack([examples[i][k] for i in order]) for k in keys}
    return padded, packed


def test_packed_rows_hold_whole_pairs_with_restarting_positions():
    padded, packed = _batches(_pairs(12))
    assert packed["inputs"].shape == (3, 2 * SEQ) and packed[pair_packing.PAIR_MASK_KEY].shape == (3, 4)
    assert packed[pair_packing.PAIR_MASK_KEY].sum() == len(padded["inputs"]) >= 6  # several pairs per row
    for r in range(3):
        for k in range(int(packed[pair_packing.PAIR_MASK_KEY][r].sum())):
            pair = int(np.flatnonzero(packed[preference.INDEX_KEY][r][: k + 1] == packed[preference.INDEX_KEY][r][k])[0])
            p = list(padded[preference.INDEX_KEY]).index(packed[preference.INDEX_KEY][r][pair])
            for side in range(2):  # segment 2k+1 = chosen, 2k+2 = rejected: the padded row's tokens, positions from 0
                at = packed["segment_ids"][r] == 2 * k + side + 1
                n = int(padded["segment_ids"][p, side].sum())
                np.testing.assert_array_equal(packed["inputs"][r][at], padded["inputs"][p, side, :n])
                np.testing.assert_array_equal(packed["loss_mask"][r][at], padded["loss_mask"][p, side, :n])
                np.testing.assert_array_equal(packed["positions"][r][at], np.arange(n))


@pytest.fixture(scope="module")
def model():
    config = models.get_config("llama", "tiny", vocab_size=CharTokenizer.vocab_size, hidden_size=16,
                               intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8)
    module = models.build(config)
    # Random weights of the model's shapes without compiling its init (any weights do for an equality test).
    shapes = sharding.unbox(jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.2, s.shape), s.dtype), shapes)
    return module, params


def _scores(module, p, batch):
    return segments.pair_logps(
        lambda rows: model_token_stats(module, {"params": p}, rows["inputs"], rows["targets"],
                                       positions=rows["positions"], segment_ids=rows["segment_ids"], chunk=0),
        batch, BATCH_KEYS)


def _losses(loss_type, logps, lengths, ref, valid, labels):
    if loss_type == "kto":  # unpaired KTO's arithmetic: row 0 the completion, row 1 its mismatched KL row
        return kto_loss(logps[:, 0], ref[:, 0], labels, logps[:, 1], ref[:, 1], valid=valid)
    return preference_loss(loss_type, logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], chosen_lengths=lengths[:, 0],
                           rejected_lengths=lengths[:, 1], valid=valid)


def test_packed_pairs_give_the_padded_losses_metrics_and_gradients(model):
    """One forward/backward per layout; each loss's gradient is the scores' VJP of its d loss / d logps.

    Losses with and without a reference (sigmoid DPO, length-normalised dpo_norm and SimPO, ORPO,
    and KTO, whose batch-mean reference point must ignore empty slots) against the padded batch."""
    module, params = model
    padded, packed = _batches(_pairs(12), ref=True)
    ref_params = jax.tree.map(lambda x: x * 0.9, params)  # a reference that differs from the policy

    @jax.jit
    def forward(p, batch):
        return _scores(module, p, batch)

    @jax.jit
    def backward(p, batch, cotangent):
        _, vjp = jax.vjp(lambda q: _scores(module, q, batch)[0], p)
        return vjp(cotangent)[0]

    results = {}
    for name, batch in (("padded", padded), ("packed", packed)):
        logps, lengths, valid = forward(params, batch)
        ref_logps = forward(ref_params, batch)[0]
        precomputed = jnp.stack([segments.per_pair(batch, k) for k in preference.REF_KEYS], -1)
        labels = segments.per_pair(batch, preference.INDEX_KEY) % 2
        for loss_type, ref in (("sigmoid", ref_logps), ("sigmoid", precomputed), ("dpo_norm", ref_logps),
                               ("simpo", None), ("orpo", None), ("kto", ref_logps)):
            ref = jnp.zeros_like(logps) if ref is None else ref

            def mean_loss(x):
                losses, metrics = _losses(loss_type, x, lengths, ref, valid, labels)
                return jnp.sum(losses) / segments.pair_count(batch), metrics

            (loss, metrics), d_logps = jax.jit(jax.value_and_grad(mean_loss, has_aux=True))(logps)
            grads = backward(params, batch, d_logps)
            results.setdefault(name, []).append((loss_type, loss, metrics, grads))
    for (loss_type, loss_a, metrics_a, grads_a), (_, loss_b, metrics_b, grads_b) in zip(results["padded"], results["packed"]):
        assert np.isfinite(float(loss_a)), loss_type
        np.testing.assert_allclose(float(loss_b), float(loss_a), rtol=2e-5, err_msg=loss_type)
        for key in metrics_a:
            np.testing.assert_allclose(float(metrics_b[key]), float(metrics_a[key]), rtol=2e-5, atol=1e-5,
                                       err_msg=f"{loss_type} {key}")
        for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-3, atol=1e-6, err_msg=loss_type)


def test_held_out_pair_metrics_match_the_training_loss(model):
    """evaluate.pair_sequence_scores + pair_eval on an eval set == the loss/metrics of the same pairs as a batch."""
    from jaxtune import evaluate
    from jaxtune.data.datasets import PairEvalSet
    from jaxtune.objectives import pair_eval

    module, params = model
    padded, _ = _batches(_pairs(7))
    eval_set = PairEvalSet("heldout", {k: v for k, v in padded.items()})

    def pair_losses(logps, lengths, ref, batch):
        return preference_loss("sigmoid", logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1])

    def scores(variables):
        return lambda arrays: evaluate.pair_sequence_scores(module, variables, arrays, batch_size=4, logits_chunk=0)

    ref_params = jax.tree.map(lambda x: x * 0.9, params)
    same = pair_eval.evaluate_pair_sets([eval_set], scores({"params": params}),
                                        lambda s: scores({"params": params})(s.arrays)[0], pair_losses)
    assert same["heldout/loss"] == pytest.approx(np.log(2.0), abs=1e-6)
    assert same["heldout/rewards/margins"] == 0.0 and same["heldout/rewards/accuracies"] == 0.0
    got = pair_eval.evaluate_pair_sets([eval_set], scores({"params": params}),
                                       lambda s: scores({"params": ref_params})(s.arrays)[0], pair_losses)
    logps, ref = jax.jit(lambda p, q: (_scores(module, p, padded)[0], _scores(module, q, padded)[0]))(params, ref_params)
    losses, metrics = pair_losses(logps, None, ref, padded)
    assert got["heldout/loss"] == pytest.approx(float(jnp.mean(losses)), rel=1e-5)
    for key in ("rewards/accuracies", "rewards/margins", "rewards/chosen", "logps/rejected"):
        assert got[f"heldout/{key}"] == pytest.approx(float(metrics[key]), rel=1e-5, abs=1e-6), key
