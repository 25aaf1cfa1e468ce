"""QLoRA base weights: block-wise NF4 (or int8) codes + per-block absmax, dequantised on the fly.

A quantised kernel is a dict `{"nf4": uint8[..., blocks, block/2], "absmax": f32[..., blocks]}`
(two 4-bit codes per byte, high nibble first) or `{"int8": int8[..., blocks, block],
"absmax": ...}`, stored in the params tree where the float kernel was. `dequantizing` (an
interceptor of `layers.Projection.get_kernel`, part of every PEFT wrapper with a quantised base)
sees the dict and dequantises it to the compute dtype for the projection's one matmul, so only
one layer's float kernel exists at a time. Leading axes (the scanned "layers" axis) are kept so nn.scan
slices codes like any other stacked param. Storage: NF4 0.5 + 4/block bytes/param (0.5625 at
block 64), int8 1 + 4/block.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxtune.models import layers
from jaxtune.peft.base import QUANT_KINDS as KINDS

# The 16 NormalFloat-4 levels (QLoRA paper, Dettmers et al. 2023; the bitsandbytes table).
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], dtype=np.float32)


def is_quantized(kernel: Any) -> bool:
    return isinstance(kernel, Mapping) and "absmax" in kernel


def _blocks(w: jax.Array, batch_dims: int, block: int) -> jax.Array:
    """[*batch, *shape] -> [*batch, blocks, block], zero-padding the flattened tail."""
    lead = w.shape[:batch_dims]
    flat = w.reshape(*lead, -1)
    pad = -flat.shape[-1] % block
    if pad:
        flat = jnp.pad(flat, [(0, 0)] * batch_dims + [(0, pad)])
    return flat.reshape(*lead, -1, block)


def quantize(w: jax.Array, kind: str, block: int = 64, batch_dims: int = 0) -> dict[str, jax.Array]:
    """Block-wise absmax quantisation of `w`; the first `batch_dims` axes are kept (e.g. layers)."""
    if kind not in KINDS:
        raise ValueError(f"quantize kind {kind!r} not in {KINDS}")
    if block % 2:
        raise ValueError(f"quant block size must be even, got {block}")
    blocks = _blocks(w.astype(jnp.float32), batch_dims, block)
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    scaled = blocks / jnp.where(absmax == 0, 1.0, absmax)[..., None]  # in [-1, 1]
    if kind == "int8":
        return {"int8": jnp.round(scaled * 127).astype(jnp.int8), "absmax": absmax}
    midpoints = jnp.asarray((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2)
    codes = jnp.searchsorted(midpoints, scaled).astype(jnp.uint8)  # nearest level
    packed = (codes[..., 0::2] << 4) | codes[..., 1::2]
    return {"nf4": packed, "absmax": absmax}


def dequantize(q: Mapping[str, jax.Array], shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """The float kernel of shape [*batch, *shape] (batch = leading axes of absmax but one)."""
    absmax = q["absmax"].astype(jnp.float32)[..., None]
    if "int8" in q:
        values = q["int8"].astype(jnp.float32) / 127.0
    else:
        packed = q["nf4"]
        codes = jnp.stack([packed >> 4, packed & 0xF], axis=-1).reshape(*packed.shape[:-1], -1)
        values = jnp.asarray(NF4_LEVELS)[codes]
    flat = (values * absmax).reshape(*absmax.shape[:-2], -1)
    return flat[..., : math.prod(shape)].reshape(*absmax.shape[:-2], *shape).astype(dtype)


def dequantize_params(params: Any, like: Any, dtype: Any = jnp.float32) -> Any:
    """`params` with every quantised kernel dequantised to the shape of its float counterpart in
    `like` (e.g. the model's abstract params): the float base a QLoRA run trained against."""

    def visit(tree, shapes):
        out = {}
        for key, value in tree.items():
            if is_quantized(value):
                lead = value["absmax"].ndim - 1
                out[key] = dequantize(value, tuple(shapes[key].shape[lead:]), dtype)
            else:
                out[key] = visit(value, shapes[key]) if isinstance(value, Mapping) else value
        return out

    return visit(params, like)


def dequantizing(next_fun, args, kwargs, context):
    """The interceptor: a Projection whose stored kernel is quantised gets it dequantised to
    its compute dtype instead of reading (or creating) a float "params" kernel."""
    module = context.module
    if context.method_name == "get_kernel" and isinstance(module, layers.Projection):
        stored = module.get_variable("params", "kernel")
        if is_quantized(stored):
            (shape,) = args
            return dequantize(stored, shape, module.dtype)
    return next_fun(*args, **kwargs)


def max_block_error(q: Mapping[str, jax.Array]) -> jax.Array:
    """The rounding bound per block: half the largest gap between adjacent levels, times absmax."""
    if "int8" in q:
        half_gap = 0.5 / 127.0
    else:
        half_gap = float(np.max(np.diff(NF4_LEVELS))) / 2
    return half_gap * q["absmax"]


def quantize_params(params: Any, kind: str, block: int, *, under: str = "layers") -> Any:
    """Quantises every kernel below `under` (the decoder's projections); embeddings, norms and
    lm_head stay in their float dtype. Boxed (logically partitioned) kernels give boxed codes
    whose block axis shards like "embed" (FSDP) and whose leading axis stays "layers".
    """

    def visit(tree, inside):
        out = {}
        for key, value in tree.items():
            if isinstance(value, Mapping) and not is_quantized(value):
                out[key] = visit(value, inside or key == under)
            elif key == "kernel" and inside:
                out[key] = _quantize_leaf(value, kind, block)
            else:
                out[key] = value
        return out

    return visit(params, False)


def _quantize_leaf(value, kind: str, block: int):
    if isinstance(value, nn.LogicallyPartitioned):
        q = quantize(value.value, kind, block, batch_dims=1)
        names = {"absmax": ("layers", "embed"), kind: ("layers", "embed", None)}
        return {k: nn.LogicallyPartitioned(v, names[k], mesh=value.mesh, rules=value.rules) for k, v in q.items()}
    return quantize(value, kind, block, batch_dims=1)


def bytes_per_param(params: Any) -> dict[str, float]:
    """Storage of the quantised kernels (codes + absmax) per original weight, and the share of
    all base params they cover (the rest: embeddings, norms, lm_head stay in float)."""
    q_bytes = q_params = other = 0

    def visit(tree):
        nonlocal q_bytes, q_params, other
        for value in tree.values():
            if is_quantized(value):
                codes = next(v for k, v in value.items() if k in KINDS)
                per_code = 2 if "nf4" in value else 1
                q_params += codes.size * per_code
                q_bytes += codes.size * codes.dtype.itemsize + value["absmax"].size * value["absmax"].dtype.itemsize
            elif isinstance(value, Mapping):
                visit(value)
            else:
                other += value.size

    visit(params)
    return {
        "quantized_bytes_per_param": q_bytes / max(q_params, 1),
        "quantized_fraction": q_params / max(q_params + other, 1),
    }
