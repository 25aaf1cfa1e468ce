"""QLoRA base quantisation: NF4/int8 round-trip error within the rounding bound per block,
storage bytes per parameter, and a quantised model that runs close to the float one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxtune import models
from jaxtune.peft import base as peft_base
from jaxtune.peft import quant, wrapper


@pytest.mark.parametrize("kind", quant.KINDS)
def test_dequantisation_error_is_within_the_bound_per_block(kind):
    w = jax.random.normal(jax.random.key(0), (3, 40, 37)) * jnp.linspace(0.1, 3.0, 37)  # 1480: a padded tail
    q = quant.quantize(w, kind, 64, batch_dims=1)
    back = quant.dequantize(q, (40, 37), jnp.float32)
    assert back.shape == w.shape
    err = np.abs(np.asarray(quant._blocks(back - w, 1, 64))).max(axis=-1)  # per block
    bound = np.asarray(quant.max_block_error(q)) * (1 + 1e-6)
    assert (err <= bound).all() and err.max() > 0
    # Each block's absmax itself is exact: the extreme levels are +-1.
    np.testing.assert_allclose(np.abs(np.asarray(back)).max(), np.abs(np.asarray(w)).max(), rtol=1e-6)


def test_nf4_levels_are_the_qlora_table():
    assert quant.NF4_LEVELS.shape == (16,) and quant.NF4_LEVELS[0] == -1 and quant.NF4_LEVELS[-1] == 1
    assert quant.NF4_LEVELS[7] == 0 and (np.diff(quant.NF4_LEVELS) > 0).all()


def test_quantised_base_bytes_and_forward():
    config = models.get_config("llama", "tiny")
    model = models.build(config)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 12)))
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), tokens))["params"]
    ref = jax.jit(model.apply)({"params": params}, tokens)
    for kind, expected_bytes, tol in (("nf4", 0.5 + 4 / 64, 0.5), ("int8", 1 + 4 / 64, 0.03)):
        q = quant.quantize_params(params, kind, 64)
        assert quant.is_quantized(q["layers"]["mlp"]["down_proj"]["kernel"])
        assert not quant.is_quantized(q["embed"]) and q["lm_head"]["kernel"].dtype == jnp.float32
        stats = quant.bytes_per_param(q)
        assert stats["quantized_bytes_per_param"] == pytest.approx(expected_bytes)
        assert 0.5 < stats["quantized_fraction"] < 1  # embeddings, norms, lm_head stay float
        quantised = wrapper.wrap(model, peft_base.Spec("lora", rank=1, alpha=1.0, quantize=kind))  # no targets
        out = jax.jit(quantised.apply)({"params": q}, tokens)
        rel = float(jnp.sqrt(jnp.mean((out - ref) ** 2) / jnp.mean((ref - ref.mean()) ** 2)))
        print(f"{kind}: {stats}, relative rms logit error {rel:.3f}")
        assert 0 < rel < tol


@pytest.mark.slow  # an export and a reload; the dequantisation itself runs in the T5 QLoRA test's helper too
def test_merged_qlora_export_writes_untargeted_kernels_dequantised(tmp_path):
    """--merged of a QLoRA run whose targets leave some projections out (default q,k,v,o): those
    kernels are written as the dequantised float base, not left as codes."""
    from jaxtune.peft import export, lora

    config = models.get_config("llama", "tiny", num_layers=2, hidden_size=32, intermediate_size=64, num_heads=4,
                               num_kv_heads=2, vocab_size=64)
    spec = peft_base.Spec("lora", rank=2, alpha=4.0, targets=("q_proj",), quantize="nf4")
    model, tokens = models.build(config), jnp.zeros((1, 4), jnp.int32)
    float_base = nn.meta.unbox(model.init(jax.random.key(0), tokens)["params"])
    held = quant.quantize_params(float_base, "nf4", 64)
    adapters = nn.meta.unbox(wrapper.wrap(model, spec).init(jax.random.key(1), tokens)["lora"])
    export.export_merged(config, spec, held, adapters, tmp_path / "merged")
    _, written = models.from_pretrained(tmp_path / "merged")
    expected = lora.merge(quant.dequantize_params(held, float_base), adapters, spec)
    for path in (("layers", "mlp", "down_proj", "kernel"), ("layers", "attn", "q_proj", "kernel")):
        got, want = written, expected
        for key in path:
            got, want = got[key], want[key]
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
    assert np.abs(np.asarray(written["layers"]["mlp"]["down_proj"]["kernel"])
                  - np.asarray(float_base["layers"]["mlp"]["down_proj"]["kernel"])).max() > 0  # NF4 rounding kept
