"""The "how to add a PEFT method" example in jaxtune/peft/__init__.py, run exactly as written: it
registers from one module, reads peft.targets from the config, creates its variables in the
adapters' collection with the layers axis, is the base model at init and without adapters, equals
the base with its scales folded into the kernels, and a train step moves the scales only."""

import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import jaxtune.peft
from jaxtune import config as config_lib
from jaxtune import models, objectives, optim, sharding, trainer
from jaxtune.errors import UserError
from jaxtune.peft import base, export, wrapper
from tests import helpers

TOKENS = jnp.asarray(np.random.default_rng(0).integers(1, 200, (2, 9)), jnp.int32)


@pytest.fixture
def ia3():
    """The docstring's example module, registered for this test only."""
    (code,) = re.findall(r"```python\n(.*?)```", jaxtune.peft.__doc__, re.S)
    module = types.ModuleType("jaxtune.peft.ia3_example")
    exec(compile(code, "jaxtune/peft/__init__.py (example)", "exec"), module.__dict__)
    try:
        yield module
    finally:
        base._REGISTRY.pop("ia3")


def _spec(targets="k,v,down"):
    c = config_lib.base_config()
    c.peft.method, c.peft.targets = "ia3", targets
    return base.spec_from_config(c.peft)


def test_example_is_registered_and_reads_its_targets(ia3):
    assert "ia3" in base.names() and base.method_for(_spec()).__class__ is ia3.IA3
    assert _spec().targets == ("k_proj", "v_proj", "down_proj")
    with pytest.raises(UserError, match=re.escape("'peft.targets': unknown target 'kk'")):
        _spec("kk")


def test_example_scales_outputs_like_scaled_kernels(ia3):
    config = models.get_config("llama", "tiny")
    plain = models.build(config)
    model = wrapper.wrap(plain, _spec())
    variables = sharding.unbox(jax.jit(model.init)(jax.random.key(0), TOKENS))
    scales = variables[base.COLLECTION]
    layers_, hd, kv = config.num_layers, config.resolved_head_dim, config.num_kv_heads
    assert scales["layers"]["attn"]["k_proj"]["ia3_scale"].shape == (layers_, kv, hd)
    assert scales["layers"]["mlp"]["down_proj"]["ia3_scale"].shape == (layers_, config.hidden_size)
    assert set(scales["layers"]["attn"]) == {"k_proj", "v_proj"} and set(scales["layers"]["mlp"]) == {"down_proj"}

    base_logits = plain.apply({"params": variables["params"]}, TOKENS)
    np.testing.assert_array_equal(model.apply(variables, TOKENS), base_logits)  # ones: the base model
    rng = np.random.default_rng(1)
    scales = jax.tree.map(lambda s: s + jnp.asarray(rng.normal(0, 0.3, s.shape), s.dtype), scales)
    adapted = model.apply({"params": variables["params"], base.COLLECTION: scales}, TOKENS)
    np.testing.assert_array_equal(model.apply({"params": variables["params"]}, TOKENS), base_logits)

    folded = jax.tree.map(lambda x: x, variables["params"])  # kernel [L, *in, *out] * scale [L, *out]
    for group, name in (("attn", "k_proj"), ("attn", "v_proj"), ("mlp", "down_proj")):
        site = folded["layers"][group][name]
        s = scales["layers"][group][name]["ia3_scale"]
        site["kernel"] = site["kernel"] * s.reshape(s.shape[0], *([1] * (site["kernel"].ndim - s.ndim)), *s.shape[1:])
    np.testing.assert_allclose(adapted, plain.apply({"params": folded}, TOKENS), atol=1e-5)
    assert float(jnp.abs(adapted - base_logits).max()) > 0.1


def test_example_trains_its_scales_only(ia3):
    model = wrapper.wrap(models.build(models.get_config("llama", "tiny")), _spec())
    tx, lr = optim.build(helpers.tiny_base_config("unused").optim, 10)
    rng = np.random.default_rng(0)
    batch = {k: rng.integers(1, 200, (8, 8)).astype(np.int32) for k in ("inputs", "targets")}
    batch.update(loss_mask=np.ones((8, 8), np.int32), segment_ids=np.ones((8, 8), np.int32),
                 positions=np.tile(np.arange(8, dtype=np.int32), (8, 1)))
    mesh = sharding.build_mesh({"data": 8, "fsdp": 1, "tensor": 1})
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules("dp")):
        _, _, init = trainer.plan_state(model, tx, mesh, sharding.rules("dp"), seq_len=8)
        state = init(jax.random.key(0))
        before = jax.device_get(state)
        sft = objectives.build(helpers.tiny_base_config("unused"))
        step = jax.jit(trainer.make_train_step(sft, trainer.make_apply_fn(model), tx, lr, accum=1))
        state, metrics = step(state, batch)
    jax.tree.map(np.testing.assert_array_equal, before.frozen, jax.device_get(state.frozen))
    changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), before.params, jax.device_get(state.params))
    assert jax.tree.leaves(changed) == [True, True, True]  # k, v and down scales
    assert np.isfinite(float(metrics["loss"]))


def test_export_of_a_method_without_a_peft_format_is_a_clear_error(ia3, tmp_path):
    config = models.get_config("llama", "tiny")
    with pytest.raises(UserError, match=re.escape("peft.method='ia3' has no PEFT-format export")):
        export.export_peft(config, _spec(), {}, tmp_path / "adapter")
    with pytest.raises(UserError, match=re.escape("peft.method='ia3' cannot be merged")):
        export.check_mergeable(_spec())
