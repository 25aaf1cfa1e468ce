"""Llama: parity with transformers (PyTorch CPU, random weights), packing, padding, counts, axes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxtune import models
from jaxtune.errors import UserError
from jaxtune.models import hf, layers
from jaxtune.models.llama import Llama, LlamaConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
# original_max 64 with factors 1/4 puts the 4 rope frequencies of head_dim 8 in all three
# llama3 regimes (kept, smoothed, divided by factor).
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def _hf_model(tie: bool):
    """Odd-sized HF Llama (GQA ratio 3) with weights large enough that logits are O(1)."""
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=101,
        hidden_size=48,
        intermediate_size=88,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=5000.0,
        rope_scaling=dict(LLAMA3_ROPE),
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        attn_implementation="eager",
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif p.ndim == 2:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))
    return model


def _hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids)[None], dtype=torch.long)).logits[0].numpy()


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def converted(request):
    model = _hf_model(tie=request.param)
    config = hf.llama_config_from_hf(model.config.to_dict())
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    return model, config, hf.llama_params_from_hf(state, config)


def test_config_from_hf(converted):
    model, config, params = converted
    assert config.num_layers == 3 and config.num_kv_heads == 2 and config.resolved_head_dim == 8
    assert config.rope_theta == 5000.0 and config.rope_scaling == LLAMA3_ROPE
    assert ("lm_head" in params) == (not config.tie_word_embeddings)


def test_logits_match_hf(converted):
    model, config, params = converted
    ids = np.random.default_rng(0).integers(0, config.vocab_size, size=(2, 37))
    ours = Llama(config).apply({"params": params}, jnp.asarray(ids, jnp.int32))
    ref = np.stack([_hf_logits(model, row) for row in ids])
    assert np.abs(ref).max() > 1.0  # the comparison is not trivially small numbers
    diff = float(np.abs(np.asarray(ours) - ref).max())
    print(f"max |logits - hf| = {diff:.2e} (tied={config.tie_word_embeddings})")
    assert diff <= TOL


def test_packed_segments_match_hf_alone(converted):
    model, config, params = converted
    rng = np.random.default_rng(1)
    a, b, pad = rng.integers(1, config.vocab_size, 13), rng.integers(1, config.vocab_size, 9), 5
    ids = np.concatenate([a, b, np.zeros(pad, int)])[None]
    seg = np.array([[1] * len(a) + [2] * len(b) + [0] * pad])
    pos = np.concatenate([np.arange(len(a)), np.arange(len(b)), np.arange(pad)])[None]
    out = Llama(config).apply(
        {"params": params},
        jnp.asarray(ids),
        positions=jnp.asarray(pos),
        segment_ids=jnp.asarray(seg),
    )
    out = np.asarray(out)[0]
    assert np.isfinite(out).all()
    assert np.abs(out[: len(a)] - _hf_logits(model, a)).max() <= TOL
    assert np.abs(out[len(a) : len(a) + len(b)] - _hf_logits(model, b)).max() <= TOL


def test_left_padding_matches_unpadded(converted):
    _, config, params = converted
    x = np.random.default_rng(2).integers(1, config.vocab_size, 11)
    pad = 3
    apply = lambda *a, **k: np.asarray(Llama(config).apply({"params": params}, *a, **k))
    plain = apply(jnp.asarray(x[None]))[0]
    padded = apply(
        jnp.asarray(np.concatenate([np.zeros(pad, int), x])[None]),
        positions=jnp.asarray(np.concatenate([np.zeros(pad, int), np.arange(len(x))])[None]),
        segment_ids=jnp.asarray(np.array([[0] * pad + [1] * len(x)])),
    )[0]
    assert np.isfinite(padded).all()
    assert np.abs(padded[pad:] - plain).max() <= TOL


def test_llama3_inv_freq_matches_hf():
    """The llama3 rule at real Llama-3.1 shapes (head_dim 128, theta 5e5, factor 8)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = models.get_config("llama", "llama3.1-8b")
    hf_cfg = transformers.LlamaConfig(
        hidden_size=4096,
        num_attention_heads=32,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        rope_scaling=dict(cfg.rope_scaling),
    )
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    ours = layers.rope_inv_freq(128, cfg.rope_theta, cfg.rope_scaling)
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-6)


@pytest.mark.parametrize(
    "variant, expected",
    [
        ("llama3.2-1b", 1_235_814_400),
        ("llama3.1-8b", 8_030_261_248),
        ("llama3.1-70b", 70_553_706_496),
    ],
)
def test_param_counts(variant, expected):
    assert models.count_params(models.get_config("llama", variant)) == expected


def test_every_param_has_logical_axes():
    config = models.get_config("llama", "tiny", tie_word_embeddings=False)
    ids = jnp.zeros((1, 4), jnp.int32)
    boxed = jax.eval_shape(Llama(config).init, jax.random.key(0), ids)["params"]
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
    leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=is_box)
    assert len(leaves) == 12
    allowed = {"vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "layers"}
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path)
        assert is_box(leaf), name
        assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= allowed, (name, leaf.names)
        assert (leaf.names[0] == "layers") == name.startswith("['layers']"), (name, leaf.names)
        if name.startswith("['layers']"):
            assert leaf.value.shape[0] == config.num_layers


def test_runs_under_mesh_and_rules():
    """Activation constraints resolve against a mesh (all local devices on the data axis)."""
    config = models.get_config("llama", "tiny")
    model = Llama(config)
    mesh = jax.make_mesh((len(jax.devices()), 1), ("data", "tensor"))
    rules = (
        ("act_batch", "data"),
        ("act_heads", "tensor"),
        ("act_mlp", "tensor"),
        ("heads", "tensor"),
    )
    ids = jnp.zeros((len(jax.devices()), 8), jnp.int32)
    with mesh, nn.logical_axis_rules(rules):
        params = jax.jit(model.init)(jax.random.key(0), ids)
        logits = jax.jit(model.apply)(params, ids)
    assert logits.shape == (ids.shape[0], 8, config.vocab_size)


def test_remat_policies_identical():
    base = models.get_config("llama", "tiny", rope_scaling=dict(LLAMA3_ROPE))
    ids = jax.random.randint(jax.random.key(1), (2, 16), 0, base.vocab_size)
    params = jax.jit(Llama(base).init)(jax.random.key(0), ids)["params"]

    @jax.jit  # one compile for all policies keeps this test fast
    def logits_and_grads(params):
        return _logits_and_grads({p: base.replace(remat_policy=p) for p in layers.REMAT_POLICIES}, ids, params)

    results = logits_and_grads(params)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for got in results.values():
        jax.tree.map(close, got, results["none"])


@pytest.mark.slow  # ~140 s of compiles on the loaded 2-core box
def test_layer_loops_identical():
    """The unrolled layer loop (an opt-in) computes the scan's logits and gradients (under
    remat) from the same [layers, ...] parameters."""
    base = models.get_config("llama", "tiny", num_layers=2, remat_policy="full")
    ids = jax.random.randint(jax.random.key(1), (2, 16), 0, base.vocab_size)
    params = jax.jit(Llama(base.replace(layer_loop="scan")).init)(jax.random.key(0), ids)["params"]
    unrolled_init = jax.jit(Llama(base.replace(layer_loop="unrolled")).init)(jax.random.key(0), ids)["params"]
    jax.tree.map(np.testing.assert_array_equal, unrolled_init, params)  # same layout and per-layer rngs

    @jax.jit
    def logits_and_grads(params):
        return _logits_and_grads({loop: base.replace(layer_loop=loop) for loop in ("scan", "unrolled")}, ids, params)

    results = logits_and_grads(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), results["unrolled"], results["scan"])


def test_layer_loop_auto_scans_on_every_backend(monkeypatch):
    """`auto` = scan (unrolling bought nothing on an idle Xeon); `unrolled` stays an explicit choice."""
    assert layers.resolve_layer_loop("auto") == "scan"  # the tests run on CPU
    assert layers.resolve_layer_loop("unrolled") == "unrolled"
    monkeypatch.setattr(layers.attention_lib, "target_platform", lambda: "tpu")
    assert layers.resolve_layer_loop("auto") == "scan"


def test_offload_policy_needs_a_pinned_host_memory_space(monkeypatch):
    class DeviceWithoutHostMemory:
        def addressable_memories(self):
            return [type("Memory", (), {"kind": "device"})()]

    assert layers.remat_policy_fn("offload") is not None  # CPU has pinned_host
    monkeypatch.setattr(jax, "local_devices", lambda: [DeviceWithoutHostMemory()])
    with pytest.raises(UserError, match="remat_policy='offload'.*pinned_host"):
        layers.remat_policy_fn("offload")


def test_bf16_compute_keeps_fp32_params():
    config = models.get_config("llama", "tiny", dtype="bfloat16", param_dtype="float32")
    ids = jnp.ones((2, 8), jnp.int32)
    params = nn.meta.unbox(jax.jit(Llama(config).init)(jax.random.key(0), ids))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    logits = jax.jit(Llama(config).apply)(params, ids)
    assert logits.dtype == jnp.bfloat16 and bool(jnp.isfinite(logits).all())


def test_get_config_and_build():
    cfg = models.get_config("llama", "tiny", num_layers=3)
    assert isinstance(cfg, LlamaConfig) and cfg.num_layers == 3
    assert isinstance(models.build(cfg), Llama)
    assert models.count_params(cfg) > models.count_params(cfg.replace(num_layers=2))


@pytest.mark.parametrize(
    "args, kwargs, needle",
    [
        (("lama", "tiny"), {}, "llama"),
        (("llama", "tiny2"), {}, "tiny"),
        (("llama", "llama3.1-8B"), {}, "llama3.1-8b"),
        (("llama", "tiny"), {"hiden_size": 32}, "hidden_size"),
        (("llama", "tiny"), {"num_kv_head": 2}, "num_kv_heads"),
    ],
)
def test_get_config_errors(args, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        models.get_config(*args, **kwargs)


def test_config_validation():
    with pytest.raises(ValueError, match="multiple"):
        models.get_config("llama", "tiny", num_kv_heads=3)
    with pytest.raises(ValueError, match="remat_policy"):
        models.get_config("llama", "tiny", remat_policy="some")
    with pytest.raises(ValueError, match="layer_loop='loop'.*'unrolled'"):
        models.get_config("llama", "tiny", layer_loop="loop")
    with pytest.raises(ValueError, match="rope_scaling"):
        models.get_config("llama", "tiny", rope_scaling={"rope_type": "yarn", "factor": 2.0})


def _logits_and_grads(configs, ids, params):
    """{name: (logits, grads of a log-softmax loss)} of a Llama built from each config, same params."""
    out = {}
    for name, config in configs.items():
        model = Llama(config)
        fwd = lambda p, model=model: model.apply({"params": p}, ids)
        loss = lambda p, fwd=fwd: jnp.mean(jax.nn.log_softmax(fwd(p))[..., 0])
        out[name] = (fwd(params), jax.grad(loss)(params))
    return out
