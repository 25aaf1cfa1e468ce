"""Sequence-classification (reward-model) heads: jaxtune's score on the last non-padding token
equals transformers' `*ForSequenceClassification` for every family, both ways through a saved
checkpoint (tiny random fp32 models; nothing is downloaded)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune import models, sharding
from jaxtune.models import hf, hf_mapping, layers

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PAD = 3
# Right padding, left padding, a row whose content ends in the pad id (pad = eos: HF pools the
# token before it, and so must we), and a full row.
IDS = np.array([
    [11, 42, 7, 99, 5, PAD, PAD, PAD, PAD],
    [PAD, PAD, PAD, 17, 8, 250, 61, 2, 9],
    [20, 21, 22, 23, PAD, PAD, PAD, PAD, PAD],
    [31, 77, 140, 6, 18, 200, 9, 13, 4],
], np.int32)
MASK = np.array([
    [1, 1, 1, 1, 1, 0, 0, 0, 0],
    [0, 0, 0, 1, 1, 1, 1, 1, 1],
    [1, 1, 1, 1, 1, 0, 0, 0, 0],  # the fifth token is a real PAD-valued token
    [1] * 9,
], np.int32)


def test_last_token_index_is_transformers_rule():
    ids = jnp.asarray(IDS)
    np.testing.assert_array_equal(layers.last_token_index(ids, pad_token_id=PAD), [4, 8, 3, 8])
    # segment id 0 is padding too; with no pad id, only the segment ids decide
    np.testing.assert_array_equal(layers.last_token_index(ids, jnp.asarray(MASK)), [4, 8, 4, 8])
    np.testing.assert_array_equal(layers.last_token_index(jnp.full((1, 4), PAD), pad_token_id=PAD), [0])


def _random_params(config, seed=1):
    params = sharding.unbox(models.build(config).init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"])
    # Norm scales start at ones/zeros: perturb them so a swapped norm would show.
    return jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.1 * jax.random.normal(jax.random.key(len(p)), x.shape, x.dtype)
        if "scale" in jax.tree_util.keystr(p) else x, params)


def _jax_scores(config, params):
    model = models.build(config)
    return np.asarray(model.apply({"params": params}, jnp.asarray(IDS), segment_ids=jnp.asarray(MASK),
                                  method=model.sequence_scores))


def _hf_scores(hf_model):
    with torch.no_grad():
        out = hf_model(torch.as_tensor(IDS, dtype=torch.long), attention_mask=torch.as_tensor(MASK))
    return out.logits.float().numpy()


CAUSAL_FAMILIES = sorted(name for name, fam in models.FAMILIES.items() if not fam.is_encoder_decoder)


# Slow-marked (about 10 s each on 2 busy cores): the default run checks the export of a trained
# Llama reward model against transformers (tests/test_reward_training.py) and, here, that every
# family's sequence-classification class exists in transformers.
@pytest.mark.slow
@pytest.mark.parametrize("family", CAUSAL_FAMILIES)
def test_export_loads_as_hf_sequence_classifier_with_equal_scores(tmp_path, family):
    config = models.get_config(family, "tiny", num_labels=1, pad_token_id=PAD)
    params = _random_params(config)
    assert "lm_head" not in params and params["score"]["kernel"].shape == (config.hidden_size, 1)
    ours = _jax_scores(config, params)
    out = hf.save_pretrained(config, params, tmp_path / "rm")
    hf_model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(hf_model).__name__.endswith("ForSequenceClassification") and hf_model.config.num_labels == 1
    theirs = _hf_scores(hf_model)
    assert theirs.shape == ours.shape == (len(IDS), 1)
    print(f"{family}: max |jaxtune - transformers| score difference {np.abs(ours - theirs).max():.2e}")
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    assert np.ptp(ours) > 1e-2  # the rows score differently: the test can see a wrong pooled token
    # ... and back: the same config and weights.
    model2, params2 = models.from_pretrained(out)
    assert model2.config.num_labels == 1 and model2.config.pad_token_id == PAD
    fam = models.FAMILIES[family]
    assert fam.config_to_hf(model2.config) == fam.config_to_hf(config)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_causal_lm_checkpoint_starts_a_reward_model_with_a_new_head(tmp_path):
    """model.hf_dir on a causal LM + num_labels: decoder weights read, lm_head unused, score new."""
    causal = models.get_config("llama", "tiny")
    params = _random_params(causal)
    out = hf.save_pretrained(causal, params, tmp_path / "lm")
    config = hf.config_from_pretrained(out, num_labels=1, pad_token_id=PAD)
    model = models.build(config)
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]),
                             sharding.unbox(hf._abstract_boxed_params(model)))
    loaded = hf.load_params(out, config, shardings, head_seed=5)
    assert "lm_head" not in loaded
    np.testing.assert_array_equal(np.asarray(loaded["layers"]["attn"]["q_proj"]["kernel"]),
                                  np.asarray(params["layers"]["attn"]["q_proj"]["kernel"]))
    again = hf.load_params(out, config, shardings, head_seed=5)["score"]["kernel"]
    np.testing.assert_array_equal(np.asarray(loaded["score"]["kernel"]), np.asarray(again))  # seeded
    assert float(jnp.std(loaded["score"]["kernel"])) > 0


def test_seq_cls_class_names():
    assert hf_mapping.seq_cls_class("LlamaForCausalLM") == "LlamaForSequenceClassification"
    assert hf_mapping.seq_cls_class("Gemma3ForCausalLM") == "Gemma3TextForSequenceClassification"
    for fam in (models.FAMILIES[name] for name in CAUSAL_FAMILIES):
        arch = fam.config_to_hf(fam.variants["tiny"].replace(num_labels=1, pad_token_id=0))["architectures"][0]
        assert hasattr(transformers, arch), arch
