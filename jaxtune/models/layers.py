"""Building blocks shared by every decoder family (Llama, Qwen, Gemma, Mistral ...).

Conventions that the rest of jaxtune relies on:
- every parameter is boxed with logical axis names (`nn.with_logical_partitioning`), so the
  trainer's rules decide sharding; activations carry `act_*` constraints, which are no-ops
  when no mesh/rules context is active (plain CPU init/apply works).
- parameters live in `param_dtype`; compute happens in `dtype`; norms, RoPE and softmax run
  in float32 because bf16 loses too much there.
- RoPE uses the Hugging Face layout (rotate_half), so HF checkpoints load without permuting
  q/k weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from jaxtune.errors import UserError
from jaxtune.models import attention as attention_lib
from jaxtune.models import matmul

Array = jax.Array
DType = Any

# The test-sized shape every family's "tiny" variant starts from (GQA 2, trains in seconds on CPU).
TINY_SHAPE = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4, num_kv_heads=2)

# Kernels: truncated normal with variance 1/fan_in (fan_in = product of contracted dims).
# Keeps activations O(1) at any width, which trains well from scratch at small sizes.
default_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


def embed_init(embed_dim: int) -> nn.initializers.Initializer:
    """Embedding init with std 1/sqrt(embed): with tied embeddings the initial logits are O(1)."""
    return nn.initializers.normal(stddev=1.0 / math.sqrt(embed_dim))


class Projection(nn.Module):
    """A bias-free linear map contracting `axis` of x with a kernel [*in_dims, *features].

    The kernel is created at its full logical shape (DenseGeneral creates it flat and reshapes,
    which breaks the logical sharding constraint under a mesh), initialised like a 2-D matrix of
    shape (prod(in_dims), prod(features)).

    Two methods are stable hook points for code that wraps the model from outside (Flax method
    interception, `nn.intercept_methods`), so that code never needs a change here: `get_kernel`
    (the float kernel this call multiplies by; a wrapper may read it from another storage format)
    and `contract` (x . kernel, before the bias; a wrapper may add to it). The module's `name`
    (q_proj, ..., down_proj: also the Hugging Face module names) and `axes` say what it projects.
    """

    features: tuple[int, ...]
    axes: tuple[str, ...]
    axis: tuple[int, ...] = (-1,)
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    kernel_init: nn.initializers.Initializer = default_kernel_init
    use_bias: bool = False  # a zero-initialised bias [*features] (Qwen2 q/k/v)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        axis = tuple(a % x.ndim for a in self.axis)
        if axis != tuple(range(x.ndim - len(axis), x.ndim)):
            raise ValueError(f"Projection contracts trailing axes only, got axis={self.axis} for x of rank {x.ndim}.")
        in_dims = tuple(x.shape[a] for a in axis)
        y = self.contract(x, self.get_kernel(in_dims + self.features))
        if self.use_bias:
            bias_axes = self.axes[len(in_dims):]
            bias = self.param(
                "bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), bias_axes),
                self.features, self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        return checkpoint_name(y, self.name)  # remat policies save/offload projection outputs by name

    def get_kernel(self, shape: tuple[int, ...]) -> Array:
        """The kernel [*in_dims, *features] ("params"/"kernel", created on init)."""
        in_dims = shape[: len(shape) - len(self.features)]

        def init(key, full_shape, dtype):
            flat = (math.prod(in_dims), math.prod(self.features))
            return self.kernel_init(key, flat, dtype).reshape(full_shape)

        return self.param("kernel", nn.with_logical_partitioning(init, self.axes), shape, self.param_dtype)

    def contract(self, x: Array, kernel: Array) -> Array:
        """x[..., *in_dims] . kernel -> [..., *features] in the compute dtype (no bias)."""
        n_in = kernel.ndim - len(self.features)
        return matmul.linear(x.astype(self.dtype), kernel.astype(self.dtype), n_in)


def dense(
    features: int | tuple[int, ...],
    axes: tuple[str, ...],
    *,
    axis: int | tuple[int, ...] = -1,
    dtype: DType,
    param_dtype: DType,
    name: str,
    kernel_init: nn.initializers.Initializer = default_kernel_init,
    use_bias: bool = False,
) -> Projection:
    """A projection (bias-free by default) whose kernel carries the logical `axes` (inputs then outputs)."""
    return Projection(
        use_bias=use_bias,
        features=(features,) if isinstance(features, int) else tuple(features),
        axes=tuple(axes),
        axis=(axis,) if isinstance(axis, int) else tuple(axis),
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=kernel_init,
        name=name,
    )


def default_positions_and_segments(inputs: Array, positions: Array | None, segment_ids: Array | None) -> tuple[Array, Array]:
    """The batch contract's defaults: one unpacked sequence per row (positions 0.., segment 1)."""
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(inputs.shape[-1]), inputs.shape)
    if segment_ids is None:
        segment_ids = jnp.ones_like(inputs)
    return positions, segment_ids


def token_embedding(vocab_size: int, hidden_size: int, *, dtype: DType, param_dtype: DType) -> nn.Embed:
    """The input embedding (also the tied output projection via `.attend`), named "embed"."""
    return nn.Embed(
        vocab_size,
        hidden_size,
        embedding_init=nn.with_logical_partitioning(embed_init(hidden_size), ("vocab", "embed")),
        dtype=dtype,
        param_dtype=param_dtype,
        name="embed",
    )


class RMSNorm(nn.Module):
    """y = x / rms(x) * scale, computed in float32 and cast back to the compute dtype.

    unit_offset (Gemma): y = x / rms(x) * (1 + scale), scale initialised to zeros.
    axis_name: the logical name of the normalised axis ("head_dim" for per-head q/k norms).
    """

    eps: float = 1e-5
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    unit_offset: bool = False
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = nn.initializers.zeros_init() if self.unit_offset else nn.initializers.ones_init()
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(init, (self.axis_name,)),
            (x.shape[-1],),
            self.param_dtype,
        )
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        scale = jnp.asarray(scale, jnp.float32)
        return (x * (1.0 + scale if self.unit_offset else scale)).astype(self.dtype)


# ----------------------------------------------------------------------------- RoPE


def rope_inv_freq(
    head_dim: int, theta: float, scaling: Mapping[str, Any] | None = None
) -> np.ndarray:
    """Inverse frequencies 1/theta^(2i/d), optionally rescaled (HF `rope_scaling` dict).

    Computed in float32 as transformers does, so the llama3 wavelength regimes match its choice.
    """
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    inv_freq = inv_freq.astype(np.float32)
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "llama3":
        return _llama3_scaling(inv_freq, scaling)
    if rope_type == "linear":  # position interpolation: positions / factor
        return (inv_freq / np.float32(scaling["factor"])).astype(np.float32)
    raise ValueError(
        f"rope_scaling type {rope_type!r} is not supported (supported: 'default', 'llama3', 'linear')."
    )


def _llama3_scaling(inv_freq: np.ndarray, s: Mapping[str, Any]) -> np.ndarray:
    """Llama 3.1 rule: keep high frequencies, divide low ones by `factor`, blend in between."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = (2 * math.pi / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: Array, positions: Array, inv_freq: np.ndarray) -> Array:
    """Rotates x[B,T,N,D] by angle positions[B,T] * inv_freq (HF rotate_half layout)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B,T,D/2]
    freqs = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B,T,1,D]
    cos, sin = jnp.cos(freqs), jnp.sin(freqs)
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)


# ----------------------------------------------------------------------------- attention


# KV cache layout [B, S_max, kv_heads, head_dim]: batch over data/fsdp, heads over tensor.
CACHE_AXES = ("act_batch", "act_length", "act_heads", None)


class Attention(nn.Module):
    """Multi-head self-attention with GQA and RoPE; q/k/v/o kernels keep the head axes split.

    Optional features (all off by default, i.e. Llama), each a static switch:
      qkv_bias: biases on q/k/v (Qwen2); qk_norm: per-head RMSNorm on q and k before RoPE
      (Qwen3; Gemma 3 with qk_norm_unit_offset); sliding_window: local attention over the last
      W keys; local_rope_theta: a separate RoPE base (no scaling) on sliding layers (Gemma 3);
      logit_soft_cap (Gemma 2); query_scale: score scale instead of head_dim**-0.5.
    `is_sliding` (a traced bool scalar, e.g. a scanned per-layer input) picks sliding vs global
    for alternating-layer models; None means every layer slides when sliding_window is set.

    The attention itself is `attention.attend` with the configured `implementation`.
    Decoding: when `apply` makes the "cache" collection mutable the layer keeps a KV cache (see
    `_cached_kv`), so every family inherits prefill/decode without a copy of this code.
    Hook points for code that wraps the model from outside (Flax method interception): the q/k/v/o
    `Projection`s (see there), and `prefix_slots`, which supplies key/value slots placed in front
    of the (cached) keys, seen by every non-padding query (`attention.attend`'s `prefix`).
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: Mapping[str, Any] | None = None
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    qkv_bias: bool = False
    qk_norm: bool = False
    qk_norm_eps: float = 1e-6
    qk_norm_unit_offset: bool = False
    sliding_window: int | None = None
    local_rope_theta: float | None = None
    logit_soft_cap: float | None = None
    query_scale: float | None = None
    implementation: str = "auto"  # models/attention.py: auto | splash | blockwise | cudnn | reference

    @nn.compact
    def __call__(
        self, x: Array, positions: Array, segment_ids: Array, is_sliding: Array | None = None
    ) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q_shape, kv_shape = (self.num_heads, self.head_dim), (self.num_kv_heads, self.head_dim)
        qkv = dict(use_bias=self.qkv_bias, **kw)
        q = dense(q_shape, ("embed", "heads", "head_dim"), name="q_proj", **qkv)(x)
        k = dense(kv_shape, ("embed", "kv_heads", "head_dim"), name="k_proj", **qkv)(x)
        v = dense(kv_shape, ("embed", "kv_heads", "head_dim"), name="v_proj", **qkv)(x)
        act = ("act_batch", "act_length", "act_heads", None)
        q = nn.with_logical_constraint(q, act)
        k = nn.with_logical_constraint(k, act)
        v = nn.with_logical_constraint(v, act)
        if self.qk_norm:
            norm = dict(eps=self.qk_norm_eps, unit_offset=self.qk_norm_unit_offset, axis_name="head_dim", **kw)
            q = RMSNorm(name="q_norm", **norm)(q)
            k = RMSNorm(name="k_norm", **norm)(k)

        prefix = self.prefix_slots(kv_shape)
        if prefix is not None:  # real tokens follow the slots, as they would follow a cached prefix
            positions = positions + prefix[0].shape[0]
        inv_freq = rope_inv_freq(self.head_dim, self.rope_theta, self.rope_scaling)
        if self.local_rope_theta is not None and is_sliding is not None:
            local_inv_freq = rope_inv_freq(self.head_dim, self.local_rope_theta)
            inv_freq = jnp.where(is_sliding, local_inv_freq, inv_freq)
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)

        kv_segment_ids, q_offset = None, None
        if self.is_mutable_collection("cache") and not self.is_initializing():  # init never makes a cache
            k, v, kv_segment_ids, q_offset = self._cached_kv(k, v, segment_ids)
        out = attention_lib.attend(
            q, k, v, q_segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, q_offset=q_offset,
            sliding_window=self.sliding_window, is_sliding=is_sliding, soft_cap=self.logit_soft_cap,
            scale=self.query_scale, prefix=prefix, implementation=self.implementation,
        )
        out = nn.with_logical_constraint(out, act)
        o_axes = ("heads", "head_dim", "embed")
        return dense(x.shape[-1], o_axes, axis=(-2, -1), name="o_proj", **kw)(out)

    def prefix_slots(self, kv_shape: tuple[int, int]) -> tuple[Array, Array] | None:
        """(keys, values) [P, kv_heads, head_dim] placed in front of this layer's keys, or None.

        The model itself has none. Code wrapping the model may intercept this method and return P
        slots (e.g. learned ones in a variable collection of this module): every non-padding query
        sees all of them whatever its segment or window, they get no RoPE, and real tokens then sit
        at positions P.., as if the slots were an already cached prefix.
        """
        del kv_shape
        return None

    def _cached_kv(self, k: Array, v: Array, segment_ids: Array) -> tuple[Array, Array, Array | None, Array | None]:
        """KV cache [B, S_max, kv_heads, head_dim] + per-slot segment ids + a write index.

        The first call with a mutable "cache" creates it sized by that call's input length
        (S_max) and attends normally; later calls write their k/v/segments at the index,
        advance it, and attend over the whole cache (unwritten slots are segment 0, so masked).
        Rows share one index, so batches of different prompt lengths are left-padded.
        """
        initialized = self.has_variable("cache", "key")

        def zeros(name, like, axes):
            init = nn.with_logical_partitioning(lambda: jnp.zeros(like.shape, like.dtype), axes)
            return self.variable("cache", name, init)

        cache_k = zeros("key", k, CACHE_AXES)
        cache_v = zeros("value", v, CACHE_AXES)
        cache_seg = zeros("segment_ids", segment_ids.astype(jnp.int32), CACHE_AXES[:2])
        index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        if not initialized:
            return k, v, None, None
        i = index.value
        write = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), i, axis=1)
        cache_k.value = nn.with_logical_constraint(write(cache_k.value, k), CACHE_AXES)
        cache_v.value = nn.with_logical_constraint(write(cache_v.value, v), CACHE_AXES)
        cache_seg.value = write(cache_seg.value, segment_ids)
        index.value = i + k.shape[1]
        return cache_k.value, cache_v.value, cache_seg.value, i


# HF `hidden_act` names -> functions.
ACTIVATIONS = {
    "silu": nn.silu,
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),  # T5 v1.1's name for the same function
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "relu": nn.relu,
}


@jax.custom_vjp
def swiglu(gate: Array, up: Array) -> Array:
    """silu(gate) * up whose backward recomputes the sigmoid from (gate, up), the only
    residuals (autodiff saved four [tokens, mlp] arrays per layer)."""
    return nn.silu(gate) * up


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(residuals, dh):
    gate, up = residuals
    g = gate.astype(jnp.float32)
    sig = jax.nn.sigmoid(g)
    dh = dh.astype(jnp.float32)
    dgate = dh * up.astype(jnp.float32) * sig * (1.0 + g * (1.0 - sig))
    dup = dh * g * sig
    return dgate.astype(gate.dtype), dup.astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class MLP(nn.Module):
    """Gated feed-forward: down(act(gate(x)) * up(x)); SwiGLU by default, GeGLU for Gemma."""

    intermediate_size: int
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    activation: str = "silu"  # a key of ACTIVATIONS

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        gate = dense(self.intermediate_size, ("embed", "mlp"), name="gate_proj", **kw)(x)
        up = dense(self.intermediate_size, ("embed", "mlp"), name="up_proj", **kw)(x)
        h = swiglu(gate, up) if self.activation == "silu" else ACTIVATIONS[self.activation](gate) * up
        h = nn.with_logical_constraint(h, ("act_batch", "act_length", "act_mlp"))
        return dense(x.shape[-1], ("mlp", "embed"), name="down_proj", **kw)(h)


# Outputs of these projections (tagged with checkpoint_name in Projection) are what the
# "projections" and "offload" remat policies keep; everything else in a block is recomputed.
# DECODER_PROJECTIONS: the projections of every decoder-only family (the HF module names), which
# is what a family without its own `projection_names(config)` has (models.registry).
DECODER_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROJECTION_NAMES = (*DECODER_PROJECTIONS, "q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo")  # the last: T5's (HF) names

# model.remat_policy -> what the backward pass finds saved from each decoder block's forward pass
# (README "Memory"). None of them ever saves logits (the LM head is outside the blocks and the
# loss recomputes it chunk by chunk); only "none" and "dots" keep the [B, heads, T, S] scores.
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")  # model.dtype
PARAM_DTYPES = ("float32", "bfloat16")  # model.param_dtype
REMAT_POLICIES = {
    "none": None,  # no rematerialisation: every activation kept (fastest, most memory)
    "full": jax.checkpoint_policies.nothing_saveable,  # only block inputs; recompute the whole block
    "projections": jax.checkpoint_policies.save_only_these_names(*PROJECTION_NAMES),
    # the same projection outputs, moved to host memory during the forward pass and back for the
    # backward (TPU/GPU: backends with a "pinned_host" memory space; see remat_policy_fn)
    "offload": "offload",
    "dots": jax.checkpoint_policies.checkpoint_dots,  # every matmul incl. attention scores: short T only
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # weight matmuls, not scores
}


def remat_policy_fn(name: str) -> Any:
    """The jax.checkpoint policy for a REMAT_POLICIES name, checked against the local backend."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat_policy {name!r} not in {sorted(REMAT_POLICIES)}.")
    if name != "offload":
        return REMAT_POLICIES[name]
    kinds = {m.kind for m in jax.local_devices()[0].addressable_memories()}
    if "pinned_host" not in kinds:
        raise UserError(f"model.remat_policy='offload' needs a 'pinned_host' memory space; the "
                        f"{jax.default_backend()} backend has {sorted(kinds)}. Use 'projections' (the same saved "
                        "tensors, kept on the device) or 'full'.")
    return jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=(), names_which_can_be_offloaded=PROJECTION_NAMES,
        offload_src="device", offload_dst="pinned_host")


# model.layer_loop: how the stacked decoder blocks run (the parameters are [layers, ...] either way).
LAYER_LOOPS = ("auto", "scan", "unrolled")


def resolve_layer_loop(layer_loop: str) -> str:
    """`auto` -> "scan" on every backend; "unrolled" is an opt-in.

    A rolled scan writes every layer's saved activations into zero-filled [layers, ...] buffers
    in the forward pass and slices them out again in the backward pass; on XLA:CPU that copying
    was 18% of the bench step's op time (benchmarks/RESULTS.md). Unrolled, each layer's residuals
    stay separate buffers (XLA folds the slices of the stacked outputs away), at the price of a
    compile time that grows with depth; accelerators keep the scan (one compiled body, and their
    memory bandwidth makes the copies cheap). Unrolling looked faster on a loaded Xeon but not on an
    idle one (benchmarks/RESULTS.md, issue 25), so `auto` keeps the scan's depth-independent compile."""
    if layer_loop not in LAYER_LOOPS:
        raise UserError(f"layer_loop={layer_loop!r}, expected one of {LAYER_LOOPS}.")
    if layer_loop == "auto":
        return "scan"
    return layer_loop


def stack_layers(
    block: type[nn.Module], num_layers: int, remat_policy: str, in_axes: Any = nn.broadcast,
    layer_loop: str = "scan",
) -> type[nn.Module]:
    """Wraps `block(x, *args) -> (x, None)` in remat + scan over a leading "layers" axis.

    scan keeps compile time independent of depth (every variable collection gets the leading
    axis; each layer draws its own dropout rng); by default every block argument after the
    carry is broadcast (same positions/segment ids for each layer). Pass a tuple `in_axes`
    (nn.broadcast or 0 per argument) to scan some arguments per layer, e.g. a [L] array that
    says which layers use local attention. `layer_loop` (resolve_layer_loop): "unrolled" is the
    same scan fully unrolled (same parameters, rngs, remat and maths; no loop in the program).
    """
    policy = remat_policy_fn(remat_policy)  # also validates the name
    unrolled = resolve_layer_loop(layer_loop) == "unrolled"
    if remat_policy != "none":
        block = nn.remat(block, policy=policy, prevent_cse=False)
    return nn.scan(
        block,
        variable_axes={True: 0},  # every collection: weights, the KV cache, whatever a wrapper adds
        split_rngs={"params": True, "dropout": True},
        in_axes=in_axes,
        length=num_layers,
        unroll=num_layers if unrolled else 1,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )


# ----------------------------------------------------------------------------- sequence scores


def last_token_index(inputs: Array, segment_ids: Array | None = None, pad_token_id: int | None = None) -> Array:
    """inputs[..., T] -> [...]: the rightmost position that is not padding (0 when every position is).

    The rule of transformers' `*ForSequenceClassification`: the rightmost token != pad_token_id,
    so left and right padding both work and a trailing token equal to the pad id (pad = eos) is
    skipped exactly as there; segment id 0 (the batch contract's padding) is padding too.
    """
    xp = np if isinstance(inputs, np.ndarray) else jnp  # numpy in host data pipelines, jax in models
    keep = xp.ones(inputs.shape, bool) if segment_ids is None else segment_ids > 0
    if pad_token_id is not None:
        keep = keep & (inputs != pad_token_id)
    positions = xp.broadcast_to(xp.arange(inputs.shape[-1]), inputs.shape)
    return xp.argmax(xp.where(keep, positions, -1), axis=-1)


class ScoreHead(nn.Module):
    """hidden[..., embed] -> scores[..., num_labels]: HF `*ForSequenceClassification`'s bias-free `score`.

    `get_kernel` is a hook point for code that wraps the model from outside (as in `Projection`):
    e.g. a wrapper that trains the whole head while its "params" stay frozen.
    """

    num_labels: int
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.get_kernel((x.shape[-1], self.num_labels))
        return matmul.linear(x.astype(self.dtype), kernel.astype(self.dtype), 1)

    def get_kernel(self, shape: tuple[int, int]) -> Array:
        """The kernel [embed, num_labels] ("params"/"kernel", created on init)."""
        return self.param("kernel", nn.with_logical_partitioning(default_kernel_init, ("embed", None)), shape,
                          self.param_dtype)


# ----------------------------------------------------------------------------- the decoder LM


class CausalLM(nn.Module):
    """The top level every family shares: embed -> scanned decoder blocks -> final norm -> LM head.

    It is split in two methods so that the loss can run the LM head in token chunks and never
    hold [B, T, vocab] float32 logits (jaxtune/logprobs.py): `hidden_states` (everything up
    to and including the final norm) and `logits_from_hidden` (tied embedding or `lm_head`,
    then the optional final soft-cap); `__call__` is their composition, inputs[B,T] int ->
    logits[B,T,vocab] in the compute dtype. positions default to arange(T) and segment_ids to
    ones (one unpacked sequence per row); attention is causal within equal segment ids only.

    A family sets `decoder_layer` (its scanned block) and overrides the hooks `embed_tokens`
    (e.g. Gemma's sqrt(hidden) scale) and `layer_inputs` (per-layer scanned inputs such as
    Gemma's sliding-window flags); `final_norm_unit_offset` picks Gemma's (1 + w) norm.

    Sequence classification (`config.num_labels` set; a reward model is num_labels=1, HF's
    `*ForSequenceClassification`): a `score` head replaces the LM head, `__call__` returns
    per-token scores [B,T,num_labels] (HF's pre-pooling logits) and `sequence_scores` the scores
    at each row's last non-padding token [B,num_labels] (`last_token_index`).
    """

    config: Any
    decoder_layer = None  # type[nn.Module] with signature (x, positions, segment_ids, *layer_inputs)
    final_norm_unit_offset = False

    def setup(self):
        cfg = self.config
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        self.embed = token_embedding(cfg.vocab_size, cfg.hidden_size, **kw)
        extra_axes = tuple(0 for _ in self.layer_inputs())  # one entry per layer
        in_axes = (nn.broadcast, nn.broadcast, *extra_axes) if extra_axes else nn.broadcast
        self.layers = stack_layers(self.decoder_layer, cfg.num_layers, cfg.remat_policy, in_axes,
                                   cfg.layer_loop)(cfg, name="layers")
        self.final_norm = RMSNorm(cfg.rms_norm_eps, unit_offset=self.final_norm_unit_offset, name="final_norm", **kw)
        if cfg.num_labels:
            self.score = ScoreHead(cfg.num_labels, name="score", **kw)
        elif not cfg.tie_word_embeddings:
            self.lm_head = dense(cfg.vocab_size, ("embed", "vocab"), name="lm_head", **kw)
        if getattr(cfg, "value_head", False) and getattr(cfg, "value_backbone", False):
            self.value_model = type(self)(cfg.replace(value_head=False, value_backbone=False, num_labels=1),
                                          name="value_model")  # a reward model's shape: its weights load as they are
        elif getattr(cfg, "value_head", False):
            self.value_head = ScoreHead(1, name="value_head", **kw)

    def embed_tokens(self, inputs: Array) -> Array:
        return self.embed(inputs.astype(jnp.int32))

    def layer_inputs(self) -> tuple[Array, ...]:
        """Extra block arguments with a leading [num_layers] axis (scanned, one slice per layer)."""
        return ()

    def hidden_states(self, inputs: Array, *, positions: Array | None = None, segment_ids: Array | None = None) -> Array:
        """inputs[B,T] -> the final-normed hidden states [B,T,hidden] in the compute dtype."""
        positions, segment_ids = default_positions_and_segments(inputs, positions, segment_ids)
        x = nn.with_logical_constraint(self.embed_tokens(inputs), ("act_batch", "act_length", "act_embed"))
        x, _ = self.layers(x, positions, segment_ids, *self.layer_inputs())
        return self.final_norm(x)

    def logits_from_hidden(self, x: Array) -> Array:
        """hidden[..., hidden] -> logits[..., vocab]: the LM head (any number of tokens at a time)."""
        logits = self.embed.attend(x) if self.config.tie_word_embeddings else self.lm_head(x)
        cap = getattr(self.config, "final_logit_softcapping", None)  # Gemma 2+
        if cap is not None:
            logits = (cap * jnp.tanh(logits.astype(jnp.float32) / cap)).astype(logits.dtype)
        return nn.with_logical_constraint(logits, ("act_batch", "act_length", "act_vocab"))

    def __call__(self, inputs: Array, *, positions: Array | None = None, segment_ids: Array | None = None) -> Array:
        hidden = self.hidden_states(inputs, positions=positions, segment_ids=segment_ids)
        if getattr(self.config, "value_head", False) and self.is_initializing():  # init creates the value model too
            if self.separate_value_model:
                self.values(inputs, positions=positions, segment_ids=segment_ids)
            else:
                self.values_from_hidden(hidden)
        return self.score(hidden) if self.config.num_labels else self.logits_from_hidden(hidden)

    @property
    def separate_value_model(self) -> bool:
        """Whether PPO's value model has its own backbone (config.value_backbone) or shares this one."""
        return bool(getattr(self.config, "value_head", False) and getattr(self.config, "value_backbone", False))

    def values_from_hidden(self, x: Array) -> Array:
        """hidden[..., hidden] -> PPO's value estimates [...] in float32 (config.value_head on this backbone)."""
        return self.value_head(x)[..., 0].astype(jnp.float32)

    def values(self, inputs: Array, *, positions: Array | None = None, segment_ids: Array | None = None) -> Array:
        """inputs[B,T] -> PPO's value estimates [B,T] in float32: the separate value model's per-token
        scores (config.value_backbone), else the value head on this backbone's hidden states."""
        if self.separate_value_model:
            return self.value_model(inputs, positions=positions, segment_ids=segment_ids)[..., 0].astype(jnp.float32)
        return self.values_from_hidden(self.hidden_states(inputs, positions=positions, segment_ids=segment_ids))

    def sequence_scores(self, inputs: Array, *, positions: Array | None = None,
                        segment_ids: Array | None = None) -> Array:
        """inputs[B,T] -> scores[B,num_labels] at each row's last non-padding token, in float32
        (one sequence per row; the pooled hidden state is taken before the head, which is linear)."""
        hidden = self.hidden_states(inputs, positions=positions, segment_ids=segment_ids)
        index = last_token_index(inputs, segment_ids, self.config.pad_token_id)
        pooled = jnp.take_along_axis(hidden, index[:, None, None], axis=1)[:, 0]
        return self.score(pooled).astype(jnp.float32)
