"""LoRA / rsLoRA / DoRA adapters: the spec, the adapter math inside `layers.Projection`, merge.

Adapters live in the "lora" variable collection beside the frozen "params":
`model.apply({"params": base, "lora": adapters}, ...)` is the adapted model and
`model.apply({"params": base}, ...)` is exactly the base model (`base_apply`; the free DPO
reference). For a projection with kernel [*in, *out] (logical axes in_axes + out_axes):

    lora_a [*in, r]   axes (*in_axes, None)   uniform(+-1/sqrt(prod(in)))  (PEFT's Kaiming init)
    lora_b [r, *out]  axes (None, *out_axes)  zeros
    magnitude [*out]  axes out_axes           DoRA only: column norm of W (see `init_magnitudes`)

y = x W + scaling * dropout(x) A B, scaling = alpha / r (or alpha / sqrt(r) with rsLoRA).
DoRA (PEFT 0.21's formula): with n = ||W + scaling * A B|| over the input axes, detached,
y = x W + (m/n - 1) * x' W + (m/n) * scaling * x' A B, x' = dropout(x).
Under nn.scan every adapter gets the leading "layers" axis like its base weight.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxtune.errors import UserError
from jaxtune.peft import quant

COLLECTION = "lora"
# A fully trained head under PEFT (layers.ScoreHead; peft's modules_to_save): kernel + delta.
HEAD_DELTA = "delta"
# Short target names (config) -> projection module names (also the HF / PEFT module names).
TARGETS = {
    "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
    "gate": "gate_proj", "up": "up_proj", "down": "down_proj",
}
METHODS = ("none", "lora", "dora", "prefix")


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Static adapter settings; a model config's `peft` field carries one to every Projection and
    Attention. Prefix tuning (peft/prefix.py) sets prefix_length > 0 and adapts no projection."""

    rank: int
    alpha: float
    targets: tuple[str, ...]  # projection module names, e.g. ("q_proj", "v_proj")
    dropout: float = 0.0
    rslora: bool = False
    dora: bool = False
    quantize: str = "none"  # none | nf4 | int8 (the base kernels; see peft.quant)
    quant_block_size: int = 64
    prefix_length: int = 0  # prefix tuning: virtual tokens per layer (0: none)
    prefix_projection: int = 0  # prefix tuning: hidden size of the reparameterising MLP (0: direct)
    base_dtype: str = ""  # dtype the frozen base is held in ("": the model's param_dtype)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


BASE_DTYPES = ("", "float32", "bfloat16")


def parse_targets(targets: str) -> tuple[str, ...]:
    """"q,k,v,o" / "q_proj,v_proj" / "all-linear" -> projection module names, in TARGETS order."""
    if targets.strip() == "all-linear":
        return tuple(TARGETS.values())
    names = [t.strip() for t in targets.split(",") if t.strip()]
    if not names:
        raise UserError("config key 'peft.targets' is empty; expected e.g. 'q,k,v,o' or 'all-linear'")
    chosen = set()
    for name in names:
        full = TARGETS.get(name, name)
        if full not in TARGETS.values():
            valid = ", ".join(list(TARGETS) + ["all-linear"])
            raise UserError(f"config key 'peft.targets': unknown target {name!r}; valid targets: {valid} (or the *_proj names)")
        chosen.add(full)
    return tuple(t for t in TARGETS.values() if t in chosen)


def spec_from_config(peft_cfg) -> LoraSpec | None:
    """The LoraSpec of a config's `peft` section (None when method is 'none'), validated."""
    method = peft_cfg.method
    if method not in METHODS:
        raise UserError(f"config key 'peft.method' is {method!r}; expected one of {', '.join(METHODS)}")
    if peft_cfg.quantize not in ("none", *quant.KINDS):
        raise UserError(f"config key 'peft.quantize' is {peft_cfg.quantize!r}; expected one of none, {', '.join(quant.KINDS)}")
    if method == "none":
        if peft_cfg.quantize != "none":
            raise UserError("config key 'peft.quantize' needs an adapter method (peft.method=lora, dora or prefix): "
                            "a quantised base cannot be fully fine-tuned")
        return None
    if peft_cfg.quant_block_size <= 0 or peft_cfg.quant_block_size % 2:
        raise UserError(f"config key 'peft.quant_block_size' must be a positive even number, got {peft_cfg.quant_block_size}")
    if peft_cfg.base_dtype not in BASE_DTYPES:
        raise UserError(f"config key 'peft.base_dtype' is {peft_cfg.base_dtype!r}; expected one of "
                        f"{', '.join(repr(d) for d in BASE_DTYPES)} ('' keeps model.param_dtype)")
    if method == "prefix":  # rank/alpha/dropout/rslora/targets are LoRA's and ignored here
        if peft_cfg.prefix_length <= 0:
            raise UserError(f"config key 'peft.prefix_length' must be > 0 for peft.method=prefix, got {peft_cfg.prefix_length}")
        if peft_cfg.prefix_projection < 0:
            raise UserError(f"config key 'peft.prefix_projection' must be >= 0 (0: no MLP), got {peft_cfg.prefix_projection}")
        return LoraSpec(rank=0, alpha=0.0, targets=(), quantize=peft_cfg.quantize,
                        quant_block_size=peft_cfg.quant_block_size, prefix_length=peft_cfg.prefix_length,
                        prefix_projection=peft_cfg.prefix_projection, base_dtype=peft_cfg.base_dtype)
    if peft_cfg.rank <= 0:
        raise UserError(f"config key 'peft.rank' must be > 0, got {peft_cfg.rank}")
    if peft_cfg.alpha <= 0:
        raise UserError(f"config key 'peft.alpha' must be > 0, got {peft_cfg.alpha}")
    if not 0.0 <= peft_cfg.dropout < 1.0:
        raise UserError(f"config key 'peft.dropout' must be in [0, 1), got {peft_cfg.dropout}")
    return LoraSpec(
        rank=peft_cfg.rank, alpha=float(peft_cfg.alpha), targets=parse_targets(peft_cfg.targets),
        dropout=float(peft_cfg.dropout), rslora=bool(peft_cfg.rslora), dora=method == "dora",
        quantize=peft_cfg.quantize, quant_block_size=peft_cfg.quant_block_size, base_dtype=peft_cfg.base_dtype,
    )


def _kaiming_uniform(fan_in: int):
    """PEFT's lora_A init: kaiming_uniform_(a=sqrt(5)) = uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


def adapt(module: nn.Module, x: jax.Array, y: jax.Array, kernel: jax.Array, axis: tuple[int, ...],
          axes: tuple[str, ...], spec: LoraSpec) -> jax.Array:
    """The adapted output of a Projection (called from its compact __call__; y = x . kernel).

    Creates the adapters at init; at apply time a model without the "lora" collection is the
    base model, unchanged.
    """
    if not (module.is_initializing() or module.has_variable(COLLECTION, "lora_a")):
        return y
    n_in = len(axis)
    in_dims, out_dims = kernel.shape[:n_in], kernel.shape[n_in:]
    in_axes, out_axes = axes[:n_in], axes[n_in:]
    param_dtype, dtype = module.param_dtype, y.dtype

    def variable(name, init, shape, names):
        boxed = nn.with_logical_partitioning(init, names)
        return module.variable(COLLECTION, name, lambda: boxed(module.make_rng("params"), shape, param_dtype)).value

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


def init_magnitudes(base: Mapping, adapters: Mapping, spec: LoraSpec, *, lead: int = 1) -> Mapping:
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


def merge(base: Mapping, adapters: Mapping, spec: LoraSpec, *, lead: int = 1, dtype: Any = None) -> dict:
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
    for path, delta in head_deltas(adapters):  # fully trained heads (layers.ScoreHead)
        old = _get(base, (*path, "kernel"))
        w = old.astype(jnp.float32) + delta.astype(jnp.float32)
        _get(merged, path)["kernel"] = w.astype(dtype or old.dtype)
    return merged


def head_deltas(adapters: Mapping, path=()):
    """(path, delta) for every fully trained head (a `HEAD_DELTA` leaf beside no lora_a)."""
    for key, value in adapters.items():
        if key == HEAD_DELTA and "lora_a" not in adapters:
            yield path, value
        elif isinstance(value, Mapping):
            yield from head_deltas(value, (*path, key))


def base_apply(model: nn.Module, base: Mapping, tokens, **kwargs):
    """The base (reference) model: the same module applied without the "lora" collection."""
    return model.apply({"params": base}, tokens, **kwargs)


def adapter_bytes(adapters: Any) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(adapters))
