"""LoRA / rsLoRA / DoRA: the methods (interceptors of `layers.Projection.contract`), merge.

Adapters live in the "lora" variable collection beside the frozen "params", in each target
projection's own scope: `wrapped.apply({"params": base, "lora": adapters}, ...)` is the adapted
model and `wrapped.apply({"params": base}, ...)` is exactly the base model (`base_apply`; the free
DPO reference). For a projection with kernel [*in, *out] (logical axes in_axes + out_axes):

    lora_a [*in, r]   axes (*in_axes, None)   uniform(+-1/sqrt(prod(in)))  (PEFT's Kaiming init)
    lora_b [r, *out]  axes (None, *out_axes)  zeros
    magnitude [*out]  axes out_axes           DoRA only: column norm of W (see `init_magnitudes`)

y = x W + scaling * dropout(x) A B, scaling = alpha / r (or alpha / sqrt(r) with rsLoRA).
DoRA (PEFT 0.21's formula): with n = ||W + scaling * A B|| over the input axes, detached,
y = x W + (m/n - 1) * x' W + (m/n) * scaling * x' A B, x' = dropout(x).
Under nn.scan every adapter gets the leading "layers" axis like its base weight.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxtune.errors import UserError
from jaxtune.models import layers
from jaxtune.peft import base, heads, quant


@base.register("lora")
class Lora(base.Method):
    """LoRA (rsLoRA with `peft.rslora`) on the target projections: adds to `Projection.contract`."""

    @classmethod
    def settings(cls, peft_cfg, projections=base.DECODER_PROJECTIONS) -> dict[str, Any]:
        if peft_cfg.rank <= 0:
            raise UserError(f"config key 'peft.rank' must be > 0, got {peft_cfg.rank}")
        if peft_cfg.alpha <= 0:
            raise UserError(f"config key 'peft.alpha' must be > 0, got {peft_cfg.alpha}")
        if not 0.0 <= peft_cfg.dropout < 1.0:
            raise UserError(f"config key 'peft.dropout' must be in [0, 1), got {peft_cfg.dropout}")
        return dict(rank=peft_cfg.rank, alpha=float(peft_cfg.alpha), targets=base.parse_targets(peft_cfg.targets, projections),
                    dropout=float(peft_cfg.dropout), rslora=bool(peft_cfg.rslora))

    def intercept(self, next_fun, args, kwargs, context):
        module = context.module
        if not (context.method_name == "contract" and isinstance(module, layers.Projection)
                and module.name in self.spec.targets):
            return next_fun(*args, **kwargs)
        x, kernel = args
        return adapt(module, x, next_fun(x, kernel), kernel, self.spec)


@base.register("dora")
class Dora(Lora):
    """DoRA: LoRA plus a learned magnitude per output feature (`Spec.dora`, read by `adapt`)."""


def _kaiming_uniform(fan_in: int):
    """PEFT's lora_A init: kaiming_uniform_(a=sqrt(5)) = uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


def adapt(module: layers.Projection, x: jax.Array, y: jax.Array, kernel: jax.Array, spec: base.Spec) -> jax.Array:
    """The adapted output of a Projection whose `contract(x, kernel)` gave y (the interceptor).

    Creates the adapters at init; at apply time a model without the "lora" collection is the
    base model, unchanged.
    """
    if not base.has_adapters(module, "lora_a"):
        return y
    n_in = kernel.ndim - len(module.features)
    axis = tuple(range(x.ndim - n_in, x.ndim))
    in_dims, out_dims = kernel.shape[:n_in], kernel.shape[n_in:]
    in_axes, out_axes = module.axes[:n_in], module.axes[n_in:]
    dtype = y.dtype

    def variable(name, init, shape, names):
        return base.adapter(module, name, init, shape, names)

    a = variable("lora_a", _kaiming_uniform(math.prod(in_dims)), (*in_dims, spec.rank), (*in_axes, None))
    b = variable("lora_b", nn.initializers.zeros_init(), (spec.rank, *out_dims), (None, *out_axes))
    a, b = a.astype(dtype), b.astype(dtype)

    xd = x.astype(dtype)
    if spec.dropout > 0 and module.has_rng("dropout"):
        keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - spec.dropout, xd.shape)
        xd = jnp.where(keep, xd / (1.0 - spec.dropout), 0).astype(dtype)
        dropped = True
    else:
        dropped = False
    in_contract = (axis, tuple(range(n_in)))
    low = jnp.tensordot(xd, a, axes=in_contract)  # [..., r]
    lora_out = jnp.tensordot(low, b, axes=((-1,), (0,))) * spec.scaling
    if not spec.dora:
        return y + lora_out

    magnitude = variable("magnitude", nn.initializers.ones_init(), out_dims, out_axes)
    norm = jax.lax.stop_gradient(weight_norm(kernel, a, b, spec.scaling, n_in))
    scale = (magnitude.astype(jnp.float32) / norm).astype(dtype)
    base_dropped = jnp.tensordot(xd, kernel.astype(dtype), axes=in_contract) if dropped else y
    return y + (scale - 1) * base_dropped + scale * lora_out


def weight_norm(kernel: jax.Array, a: jax.Array, b: jax.Array, scaling: float, n_in: int) -> jax.Array:
    """DoRA's ||W + scaling * A B|| over the input axes (PEFT: norm of each output row), in fp32."""
    delta = jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=((-1,), (0,)))
    w = kernel.astype(jnp.float32) + scaling * jax.lax.stop_gradient(delta)
    return jnp.sqrt(jnp.sum(jnp.square(w), axis=tuple(range(n_in))))


# ------------------------------------------------------------------ whole-tree operations


def _adapter_sites(adapters: Mapping, path=()):
    """(path, {lora_a, lora_b[, magnitude]}) for every adapted projection."""
    if "lora_a" in adapters:
        yield path, adapters
        return
    for key, value in adapters.items():
        if isinstance(value, Mapping):
            yield from _adapter_sites(value, (*path, key))


def _get(tree: Mapping, path):
    for key in path:
        tree = tree[key]
    return tree


def site_kernel(base: Mapping, path, site: Mapping) -> jax.Array:
    """The float kernel [L?, *in, *out] of an adapted projection (dequantised when QLoRA)."""
    kernel = _get(base, (*path, "kernel"))
    if not quant.is_quantized(kernel):
        return kernel.astype(jnp.float32)
    a, b = site["lora_a"], site["lora_b"]
    lead = kernel["absmax"].ndim - 1
    shape = (*a.shape[lead:-1], *b.shape[lead + 1:])
    return quant.dequantize(kernel, shape, jnp.float32)


def _n_in(site: Mapping, lead: int) -> int:
    return site["lora_a"].ndim - 1 - lead


def _delta(site: Mapping, lead: int) -> jax.Array:
    """A B with the leading (layers) axes batched: [L?, *in, *out] in fp32."""
    a, b = site["lora_a"].astype(jnp.float32), site["lora_b"].astype(jnp.float32)
    if lead == 0:
        return jnp.tensordot(a, b, axes=((-1,), (0,)))
    a2 = a.reshape(a.shape[0], -1, a.shape[-1])
    b2 = b.reshape(b.shape[0], b.shape[1], -1)
    out = jnp.einsum("lir,lro->lio", a2, b2)
    return out.reshape(*a.shape[:-1], *b.shape[2:])


def init_magnitudes(base: Mapping, adapters: Mapping, spec: base.Spec, *, lead: int = 1) -> Mapping:
    """DoRA's magnitude init, m = ||W + scaling * A B|| (B = 0 at init, so the column norm of W),
    computed from the actual base weights (random init or loaded from HF)."""
    if not spec.dora:
        return adapters
    out = jax.tree.map(lambda x: x, adapters)  # a copy with fresh dict nodes
    for path, site in _adapter_sites(adapters):
        w = site_kernel(base, path, site) + spec.scaling * _delta(site, lead)
        axes = tuple(range(lead, lead + _n_in(site, lead)))
        norm = jnp.sqrt(jnp.sum(jnp.square(w), axis=axes))
        _get(out, path)["magnitude"] = norm.astype(site["magnitude"].dtype)
    return out


def merge(base: Mapping, adapters: Mapping, spec: base.Spec, *, lead: int = 1, dtype: Any = None) -> dict:
    """Base params with the adapters folded into the kernels (fp32 math, then cast to `dtype` or
    the base kernel's float dtype); quantised kernels come out dequantised."""
    merged = jax.tree.map(lambda x: x, base, is_leaf=quant.is_quantized)
    for path, site in _adapter_sites(adapters):
        old = _get(base, (*path, "kernel"))
        out_dtype = dtype or (jnp.float32 if quant.is_quantized(old) else old.dtype)
        w = site_kernel(base, path, site) + spec.scaling * _delta(site, lead)
        if spec.dora:
            axes = tuple(range(lead, lead + _n_in(site, lead)))
            norm = jnp.sqrt(jnp.sum(jnp.square(w), axis=axes, keepdims=True))
            mag = jnp.expand_dims(site["magnitude"].astype(jnp.float32), axes)
            w = w * (mag / norm)
        _get(merged, path)["kernel"] = w.astype(out_dtype)
    for path, delta in heads.head_deltas(adapters):  # fully trained heads (layers.ScoreHead)
        old = _get(base, (*path, "kernel"))
        w = old.astype(jnp.float32) + delta.astype(jnp.float32)
        _get(merged, path)["kernel"] = w.astype(dtype or old.dtype)
    return merged


def base_apply(model: nn.Module, base: Mapping, tokens, **kwargs):
    """The base (reference) model: the same module applied without the "lora" collection."""
    return model.apply({"params": base}, tokens, **kwargs)


def adapter_bytes(adapters: Any) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(adapters))
