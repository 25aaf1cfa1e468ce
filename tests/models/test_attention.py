"""Attention implementations (models/attention.py) equal the reference, forward and gradients.

Inputs are packed (two segments in a row), left padded (segment 0 first) and right padded, with
GQA (4 query heads on 2 kv heads), at lengths that are not block multiples, so the blockwise
tiles, their padding and the skipped causal tiles are all exercised.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune import config as config_lib
from jaxtune import models, validation
from jaxtune.errors import UserError
from jaxtune.models import attention, gpu_flash_attention

B, T, H, K, D = 2, 37, 4, 2, 8
TOL = 2e-5


def _segments(t: int = T) -> jax.Array:
    """Row 0: 5 left-padding tokens then one sequence; row 1: two packed sequences, then padding."""
    seg = np.ones((B, t), np.int32)
    seg[0, :5] = 0
    seg[1, 10:] = 2
    seg[1, t - 7:] = 0
    return jnp.asarray(seg)


def _qkv(t: int = T, s: int | None = None, heads: int = H, kv_heads: int = K, dtype=jnp.float32, d: int = D):
    """q, k, v and output weights (numpy draws: no per-shape random compiles in tests)."""
    rng = np.random.default_rng(0)
    s = t if s is None else s
    draw = lambda *shape: rng.standard_normal(shape, np.float32)
    q, k, v = draw(B, t, heads, d), draw(B, s, kv_heads, d), draw(B, s, kv_heads, d)
    return (*(jnp.asarray(x, dtype) for x in (q, k, v)), jnp.asarray(draw(B, t, heads, d)))


def _prefix():
    rng = np.random.default_rng(1)
    return tuple(jnp.asarray(rng.standard_normal((3, K, D), np.float32)) for _ in range(2))


CASES = {
    "packed_left_padded": dict(),
    "sliding_static": dict(sliding_window=5),
    "sliding_traced_on": dict(sliding_window=5, is_sliding=True),
    "sliding_traced_off": dict(sliding_window=5, is_sliding=False),
    "soft_cap_query_scale": dict(soft_cap=1.5, scale=0.7),
    "prefix_slots": dict(prefix=True),
    "everything": dict(sliding_window=6, is_sliding=True, soft_cap=2.0, scale=0.5, prefix=True),
}


def _attend_fn(implementation: str, case: dict, **extra):
    """jit(value_and_grad) of a weighted sum of attend(...) w.r.t. q, k, v (is_sliding traced)."""
    kw = {k: v for k, v in case.items() if k not in ("is_sliding", "prefix")}

    def loss(q, k, v, weights, segments, is_sliding):
        out = attention.attend(
            q, k, v, q_segment_ids=segments, implementation=implementation,
            is_sliding=is_sliding, prefix=_prefix() if case.get("prefix") else None, **kw, **extra,
        )
        return jnp.sum(out.astype(jnp.float32) * weights), out

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    is_sliding = None if "is_sliding" not in case else jnp.asarray(case["is_sliding"])
    return lambda q, k, v, w, seg: fn(q, k, v, w, seg, is_sliding)


def _assert_same(got, want, tol=TOL):
    (_, out), grads = got
    (_, ref_out), ref_grads = want
    np.testing.assert_allclose(out, ref_out, atol=tol, rtol=tol)
    for name, g, r in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=tol, rtol=tol, err_msg=f"d{name}")


@pytest.fixture
def small_blocks(monkeypatch):
    """Blockwise tiles of 8 queries x 16 keys: 5 x 3 tiles (both padded) at T = 37."""
    monkeypatch.setattr(attention, "BLOCK_Q", 8)
    monkeypatch.setattr(attention, "BLOCK_KV", 16)


FAST = "everything"  # the default run's representative; the single-feature cases are slow


@pytest.mark.parametrize("case", [pytest.param(c, marks=() if c == FAST else pytest.mark.slow) for c in CASES])
def test_blockwise_matches_reference(case, small_blocks):
    q, k, v, w = _qkv()
    seg = _segments()
    want = _attend_fn("reference", CASES[case])(q, k, v, w, seg)
    _assert_same(_attend_fn("blockwise", CASES[case])(q, k, v, w, seg), want)


@pytest.mark.slow
@pytest.mark.parametrize("kv_heads", [1, 4])
def test_blockwise_mqa_and_mha(kv_heads, small_blocks):
    q, k, v, w = _qkv(kv_heads=kv_heads)
    seg = _segments()
    _assert_same(_attend_fn("blockwise", {})(q, k, v, w, seg), _attend_fn("reference", {})(q, k, v, w, seg))


def test_blockwise_kv_cache_step(small_blocks):
    """A decode-style call: 3 new queries at cache index 20 of a 40-slot cache (later slots empty)."""
    q, k, v, w = _qkv(t=3, s=40)
    kv_seg = np.zeros((B, 40), np.int32)
    kv_seg[:, 2:23] = 1  # row contents written so far, 2 left-padding slots
    kv_seg, q_seg = jnp.asarray(kv_seg), jnp.ones((B, 3), jnp.int32)

    @jax.jit
    def run(q_offset):  # traced, as in generate.py
        kw = dict(q_segment_ids=q_seg, kv_segment_ids=kv_seg, q_offset=q_offset, sliding_window=8)
        return attention.attend(q, k, v, implementation="blockwise", **kw), attention.attend(
            q, k, v, implementation="reference", **kw)

    got, want = run(jnp.int32(20))
    np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL)


@pytest.mark.slow
def test_blockwise_bfloat16_close_to_reference():
    q, k, v, w = _qkv(dtype=jnp.bfloat16)
    seg = _segments()
    got, want = _attend_fn("blockwise", {})(q, k, v, w, seg), _attend_fn("reference", {})(q, k, v, w, seg)
    assert got[0][1].dtype == jnp.bfloat16
    _assert_same(got, want, tol=3e-2)


def _temp_bytes(implementation: str, t: int) -> int:
    q, k, v, w = _qkv(t=t)
    seg = jnp.ones((B, t), jnp.int32)

    def loss(q, k, v):
        return jnp.sum(attention.attend(q, k, v, q_segment_ids=seg, implementation=implementation) * w)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_blockwise_memory_grows_linearly(monkeypatch):
    """Compiled forward+backward temporaries (CPU memory_analysis) about double from T to 2T,
    and stay far below one float32 [B, H, T, T] score tensor."""
    monkeypatch.setattr(attention, "BLOCK_Q", 64)
    monkeypatch.setattr(attention, "BLOCK_KV", 64)
    short, long = _temp_bytes("blockwise", 512), _temp_bytes("blockwise", 1024)
    assert long / short < 2.3, (short, long)
    assert long < B * H * 1024 * 1024 * 4 / 8, long


@pytest.mark.slow
def test_reference_memory_grows_quadratically():
    """The contrast: the einsum's temporaries grow about 4x from T to 2T."""
    short, long = _temp_bytes("reference", 512), _temp_bytes("reference", 1024)
    assert long / short > 3.5, (short, long)


# ----------------------------------------------------------------------------- splash


@pytest.fixture
def splash_interpret(monkeypatch):
    monkeypatch.setattr(attention, "SPLASH_INTERPRET", True)


SPLASH_CASES = ["sliding_traced_on", "packed_left_padded", "sliding_static", "soft_cap_query_scale"]


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=() if i == 0 else pytest.mark.slow) for i, c in enumerate(SPLASH_CASES)]
)
def test_splash_interpret_matches_reference(case, splash_interpret):
    """Pallas interpret mode on CPU (the TPU kernel's own logic, not a stand-in)."""
    case = dict(CASES[case], soft_cap=3.0) if case == "sliding_traced_on" else CASES[case]
    q, k, v, w = _qkv()
    seg = _segments()
    assert attention.resolve("splash", q, k, _call(seg, case)) == "splash"
    _assert_same(_attend_fn("splash", case)(q, k, v, w, seg), _attend_fn("reference", case)(q, k, v, w, seg))


def _call(seg, case):
    return attention.Call(seg, seg, 0, case.get("sliding_window"), case.get("is_sliding"), case.get("soft_cap"),
                          1.0, _prefix() if case.get("prefix") else None)


def test_splash_hands_prefix_and_cache_to_blockwise(splash_interpret):
    q, k, v, _ = _qkv()
    seg = _segments()
    assert attention.resolve("splash", q, k, _call(seg, {"prefix": True})) == "blockwise"
    cached = _call(seg, {})._replace(q_offset=jnp.int32(0))
    assert attention.resolve("splash", q, k, cached) == "blockwise"


def test_splash_off_tpu_falls_back_to_blockwise():
    q, k, v, _ = _qkv()
    assert attention.resolve("splash", q, k, _call(_segments(), {})) == "blockwise"


def test_splash_compiles_for_tpu_topology():
    """Deviceless AOT compile of a sharded forward+backward for v5e:2x2 (libtpu, no TPU needed):
    auto picks splash, which lowers to Mosaic custom calls inside a shard_map over the batch."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # parallel test workers share libtpu
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    topologies = pytest.importorskip("jax.experimental.topologies")
    from flax import linen as nn
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxtune import sharding

    try:
        devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
    except Exception as e:  # noqa: BLE001  (libtpu missing: the [tpu] extra)
        pytest.skip(f"no TPU compiler: {e}")
    mesh = jax.sharding.Mesh(np.array(devices).reshape(2, 2, 1), sharding.MESH_AXES)
    b, t, h, kv, d = 4, 256, 4, 2, 128

    def loss(q, k, v, seg, is_sliding):
        out = attention.attend(q, k, v, q_segment_ids=seg, sliding_window=64, is_sliding=is_sliding, soft_cap=50.0)
        return jnp.sum(jnp.square(out.astype(jnp.float32)))

    batch = NamedSharding(mesh, PartitionSpec(sharding.BATCH_AXES))
    arg = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=batch)
    args = (arg((b, t, h, d), jnp.bfloat16), arg((b, t, kv, d), jnp.bfloat16), arg((b, t, kv, d), jnp.bfloat16),
            arg((b, t), jnp.int32), jax.ShapeDtypeStruct((), jnp.bool_))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules("fsdp")):
        # (no eager jnp ops under a compile-only mesh: they would be placed on the absent TPU)
        assert attention.resolve("auto", *args[:2], _call(np.ones((b, t), np.int32), {})) == "splash"
        lowered = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(*args)
        compiled = lowered.compile()
    text = lowered.as_text()
    assert "tpu_custom_call" in text  # the Pallas kernels, forward and backward
    scores = (b // 4) * h * t * t * 4  # one device's float32 [B, H, T, T]
    assert compiled.memory_analysis().temp_size_in_bytes < scores


# ----------------------------------------------------------------------------- Pallas GPU

PALLAS_D = 16  # Triton's smallest matmul tile: the kernel takes head_dim 16..256 (powers of two)


@pytest.fixture
def pallas_interpret(monkeypatch):
    """The GPU kernel in Pallas interpret mode on CPU, with 16-token tiles (T = 37 pads to 48:
    3 x 3 tiles, causal and window tile skipping, padded tail)."""
    monkeypatch.setattr(attention, "PALLAS_GPU_INTERPRET", True)
    for name in ("BLOCK_Q", "BLOCK_K", "BLOCK_BACKWARD"):
        monkeypatch.setattr(gpu_flash_attention, name, 16)


PALLAS_CASES = ["sliding_traced_on", "packed_left_padded", "sliding_static", "sliding_traced_off",
                "soft_cap_query_scale"]


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=() if i == 0 else pytest.mark.slow) for i, c in enumerate(PALLAS_CASES)]
)
def test_pallas_gpu_interpret_matches_reference(case, pallas_interpret):
    """Forward and gradients of the Triton-lowered kernel's own code (interpret mode) = reference,
    on packed + left-padded rows with GQA (4 query heads on 2 kv heads)."""
    case = dict(CASES[case], soft_cap=3.0, scale=0.5) if case == "sliding_traced_on" else CASES[case]
    q, k, v, w = _qkv(d=PALLAS_D)
    seg = _segments()
    assert attention.resolve("pallas_gpu", q, k, _call(seg, case)) == "pallas_gpu"
    _assert_same(_attend_fn("pallas_gpu", case)(q, k, v, w, seg), _attend_fn("reference", case)(q, k, v, w, seg))


@pytest.mark.slow
@pytest.mark.parametrize("kv_heads", [1, 4])
def test_pallas_gpu_mqa_and_mha(kv_heads, pallas_interpret):
    q, k, v, w = _qkv(kv_heads=kv_heads, d=PALLAS_D)
    seg = _segments()
    _assert_same(_attend_fn("pallas_gpu", {})(q, k, v, w, seg), _attend_fn("reference", {})(q, k, v, w, seg))


@pytest.mark.slow
def test_pallas_gpu_bfloat16_and_long_rows(pallas_interpret):
    """bfloat16 inputs, and 100 tokens in rows of 3 segments (7 x 7 tiles)."""
    t = 100
    q, k, v, w = _qkv(t=t, dtype=jnp.bfloat16, d=PALLAS_D)
    seg = np.ones((B, t), np.int32)
    seg[:, 30:] = 2
    seg[:, 71:] = 3
    seg[0, :9] = 0
    seg = jnp.asarray(seg)
    case = dict(sliding_window=20, soft_cap=5.0)
    got, want = _attend_fn("pallas_gpu", case)(q, k, v, w, seg), _attend_fn("reference", case)(q, k, v, w, seg)
    assert got[0][1].dtype == jnp.bfloat16
    _assert_same(got, want, tol=5e-2)


def test_pallas_gpu_lowers_to_triton_for_cuda():
    """The forward and both backward kernels lower to Triton custom calls for CUDA (a cross-
    platform export: no GPU needed; GQA, window, soft cap, a length that is no block multiple)."""

    def loss(q, k, v, seg):
        out = gpu_flash_attention.flash_attention(q, k, v, seg, seg, scale=0.125, window=64, soft_cap=30.0)
        return jnp.sum(out.astype(jnp.float32))

    arg = lambda *shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype)
    exported = jax.export.export(
        jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(arg(2, 200, 8, 128), arg(2, 200, 2, 128), arg(2, 200, 2, 128), arg(2, 200, dtype=jnp.int32))
    text = exported.mlir_module()
    for kernel in ("jaxtune_flash_forward", "jaxtune_flash_dkdv", "jaxtune_flash_dq"):
        assert f'name = "{kernel}"' in text, kernel


def test_pallas_gpu_rejects_what_it_cannot_run():
    q, k, v, _ = _qkv()  # head_dim 8
    seg = _segments()
    with pytest.raises(ValueError, match="head_dim 8"):
        gpu_flash_attention.flash_attention(q, k, v, seg, seg, scale=1.0)
    with pytest.raises(ValueError, match="same tokens"):
        gpu_flash_attention.flash_attention(q, k[:, :20], v[:, :20], seg, seg[:, :20], scale=1.0)


def test_auto_on_gpu_runs_packed_rows_on_pallas(monkeypatch):
    """`auto` on a GPU: cudnn, whose packed/left-padded branch is the Pallas kernel; calls cuDNN
    cannot take at all (soft cap, float32) go straight to it; prefix slots and KV-cache steps to
    blockwise. (The platform is faked: selection only, nothing runs.)"""
    monkeypatch.setattr(attention, "target_platform", lambda: "gpu")
    q, k, _, _ = _qkv(dtype=jnp.bfloat16, d=64)
    seg = _segments()
    assert attention.resolve("auto", q, k, _call(seg, {})) == "cudnn"
    assert attention._gpu_fallback(q, k, _call(seg, {})) == "pallas_gpu"
    assert attention.resolve("auto", q, k, _call(seg, {"soft_cap": 50.0})) == "pallas_gpu"
    assert attention.resolve("auto", q.astype(jnp.float32), k, _call(seg, {})) == "pallas_gpu"
    assert attention.resolve("auto", q, k, _call(seg, {"prefix": True})) == "blockwise"
    assert attention.resolve("auto", q, k, _call(seg, {})._replace(q_offset=jnp.int32(0))) == "blockwise"
    assert attention.resolve("pallas_gpu", *_qkv()[:2], _call(seg, {})) == "blockwise"  # head_dim 8


def test_cudnn_hands_packed_rows_to_pallas(pallas_interpret):
    """The cudnn path's run-time branch for packed/left-padded rows is the Pallas kernel (its
    jax.nn call run with implementation="xla" on CPU), and the result equals the reference."""
    q, k, v, _ = _qkv(d=PALLAS_D)
    seg = _segments()
    call = attention.Call(seg, seg, 0, None, None, None, 0.5, None)
    run = lambda q, k, v: attention._cudnn(q, k, v, call, implementation="xla")
    assert "pallas_call" in str(jax.make_jaxpr(run)(q, k, v))
    np.testing.assert_allclose(jax.jit(run)(q, k, v), attention._reference(q, k, v, call), atol=TOL, rtol=TOL)


# ----------------------------------------------------------------------------- cuDNN


def test_cudnn_call_matches_reference_on_real_tokens():
    """The cuDNN path's own jax.nn call, run with implementation="xla" (same semantics, any
    backend): one right-padded segment per row goes to it; packed/left-padded rows to blockwise."""
    q, k, v, w = _qkv()
    case = dict(sliding_window=6, is_sliding=jnp.asarray(True), scale=0.5)

    @jax.jit
    def run(seg):
        call = attention.Call(seg, seg, 0, 6, case["is_sliding"], None, 0.5, None)
        return attention._cudnn(q, k, v, call, implementation="xla"), attention._reference(q, k, v, call)

    right_padded = jnp.asarray(np.arange(T)[None] < np.array([[30], [T]]), jnp.int32)
    for seg in (right_padded, _segments()):
        real = np.asarray(seg != 0)[:, :, None, None]
        got, want = run(seg)
        np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), atol=TOL, rtol=TOL)
    assert bool(attention._single_segment_lengths(right_padded)[1])
    assert not bool(attention._single_segment_lengths(_segments())[1])


def test_cudnn_blockers_name_the_constraint():
    q, *_ = _qkv()
    call = _call(_segments(), {})
    assert "GPU" in attention._cudnn_blocker(q, call)  # this CPU
    assert attention.resolve("cudnn", q, q, call) == "blockwise"


# ----------------------------------------------------------------------------- setting


def test_auto_on_cpu_is_reference_short_blockwise_long():
    call = _call(jnp.ones((1, 8), jnp.int32), {})
    short = jnp.zeros((1, attention.CPU_REFERENCE_MAX_KEYS, 1, 8))
    long = jnp.zeros((1, attention.CPU_REFERENCE_MAX_KEYS + 1, 1, 8))
    assert attention.resolve("auto", short, short, call) == "reference"
    assert attention.resolve("auto", long, long, call) == "blockwise"


@pytest.mark.slow  # the kernel-level tests above cover these inputs in the default run
@pytest.mark.parametrize("implementation", ["blockwise", "pallas_gpu"])
@pytest.mark.parametrize("family", ["gemma2", "llama"])
def test_model_logits_same_for_blockwise(family, implementation, small_blocks, pallas_interpret):
    """Whole tiny models on a packed, left-padded batch (Gemma 2: the scanned per-layer traced
    sliding-window switch, soft cap, query_pre_attn_scalar): blockwise and Pallas GPU (interpret
    mode, head_dim 16) logits = reference logits."""
    base = models.get_config(family, "tiny", **({"sliding_window": 6} if family == "gemma2" else {}))
    base = base.replace(head_dim=PALLAS_D)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, base.vocab_size, (B, T)), jnp.int32)
    seg = _segments()
    params = jax.jit(models.build(base).init)(jax.random.key(0), tokens[:, :4])["params"]

    def logits(impl):
        model = models.build(base.replace(attention=impl))
        return jax.jit(lambda p: model.apply({"params": p}, tokens, segment_ids=seg))(params)

    np.testing.assert_allclose(logits(implementation), logits("reference"), atol=1e-4, rtol=1e-4)


def test_bad_attention_setting_is_a_clear_error():
    with pytest.raises(UserError, match="attention='flash'.*expected one of"):
        models.get_config("llama", "tiny", attention="flash")
    c = config_lib.base_config()
    c.model.attention = "flash"
    with pytest.raises(UserError, match="model.attention"):
        validation.validate(c)
