"""Prefix tuning (PEFT's PREFIX_TUNING for decoders): learned key/value prefixes per layer.

Every attention layer attends to P extra key/value slots before the sequence's own: the method
intercepts `layers.Attention.prefix_slots` and returns learned ones. They live in the "lora"
collection beside LoRA's adapters, in each attention layer's scope (so the trainer, optimizer
masking, checkpoints and `apply({"params": base})` = base model are shared):

    prefix_key, prefix_value [P, kv_heads, head_dim]   N(0, 1) (PEFT's nn.Embedding init)

scanned to [L, P, kv_heads, head_dim] and sharded like k/v. PEFT semantics, matched exactly:
- prefixes are past key/values: no RoPE, no k-norm; every non-padding query sees all P slots
  (a packed segment sees them too, as if it were alone in its row; sliding-window layers always
  see them, where HF would let them slide out of the window after W - P tokens);
- real tokens sit at positions P.. (transformers starts positions after the cache length, and
  PEFT shifts explicit position_ids by P), which only changes the query-prefix scores.

Reparameterisation (prefix_projection = h > 0, PEFT's prefix_projection with
encoder_hidden_size h): the trainable tree is an MLP, `embedding [P, D] -> Linear(D, h) -> tanh
-> Linear(h, L*2*D)`, D = kv_heads * head_dim. The shared part sits under "prefix_encoder"; the
last Linear is stored per layer at each attention site (`prefix_kernel [L, h, 2, kv, hd]`,
`prefix_bias [L, 2, kv, hd]`, the same function as one Linear with outputs ordered [L, 2, D]).
`effective` turns either tree into the direct prefixes the model reads.
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
from jaxtune.peft import base

ENCODER = "prefix_encoder"
KEYS = ("prefix_key", "prefix_value")


@base.register("prefix")
class Prefix(base.Method):
    """Prefix tuning: learned key/value slots from `Attention.prefix_slots` (LoRA's keys ignored)."""

    @classmethod
    def settings(cls, peft_cfg, projections=base.DECODER_PROJECTIONS) -> dict[str, Any]:
        if peft_cfg.prefix_length <= 0:
            raise UserError(f"config key 'peft.prefix_length' must be > 0 for peft.method=prefix, got {peft_cfg.prefix_length}")
        if peft_cfg.prefix_projection < 0:
            raise UserError(f"config key 'peft.prefix_projection' must be >= 0 (0: no MLP), got {peft_cfg.prefix_projection}")
        return dict(prefix_length=peft_cfg.prefix_length, prefix_projection=peft_cfg.prefix_projection)

    def intercept(self, next_fun, args, kwargs, context):
        module = context.module
        if not (context.method_name == "prefix_slots" and isinstance(module, layers.Attention)
                and base.has_adapters(module, KEYS[0])):
            return next_fun(*args, **kwargs)
        (kv_shape,) = args
        shape = (self.spec.prefix_length, *kv_shape)
        return tuple(base.adapter(module, name, nn.initializers.normal(1.0), shape, (None, "kv_heads", "head_dim"))
                     for name in KEYS)


# ------------------------------------------------------------------ the MLP reparameterisation


def _sites(tree: Mapping, path=()):
    """(path, node) of every attention layer's prefix entries (direct or reparameterised)."""
    if KEYS[0] in tree or "prefix_kernel" in tree:
        yield path, tree
        return
    for key, value in tree.items():
        if isinstance(value, Mapping) and key != ENCODER:
            yield from _sites(value, (*path, key))


def _set(tree: dict, path, value):
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def _copy(tree: Mapping) -> dict:
    return {k: _copy(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def _uniform(fan_in: int):
    """torch.nn.Linear's default init (weight and bias): uniform(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


def init_trainable(rng: jax.Array, direct: Mapping, hidden: int) -> Mapping:
    """The trainable tree for `direct` (the model's boxed "lora" init): itself, or (hidden > 0)
    PEFT's prefix encoder, with logical axes so the trainer shards it."""
    if hidden <= 0:
        return direct
    sites = list(_sites(direct))
    boxed_key = sites[0][1][KEYS[0]]
    length, kv, hd = boxed_key.value.shape[-3:]
    dim = kv * hd
    keys = iter(jax.random.split(rng, 3 + 2 * len(sites)))
    dtype = boxed_key.value.dtype

    def param(init, shape, names):
        return nn.with_logical_partitioning(init, names)(next(keys), shape, dtype)

    out = _copy(direct)
    out[ENCODER] = {
        "embedding": param(nn.initializers.normal(1.0), (length, dim), (None, None)),
        "kernel": param(_uniform(dim), (dim, hidden), (None, None)),
        "bias": param(_uniform(dim), (hidden,), (None,)),
    }
    for path, node in sites:
        layers = node[KEYS[0]].value.shape[0]
        _set(out, path, {
            "prefix_kernel": param(_uniform(hidden), (layers, hidden, 2, kv, hd), ("layers", None, None, "kv_heads", "head_dim")),
            "prefix_bias": param(_uniform(hidden), (layers, 2, kv, hd), ("layers", None, "kv_heads", "head_dim")),
        })
    return out


def effective(adapters: Any) -> Any:
    """The direct prefixes (what the model reads) of a trainable tree; other trees unchanged."""
    if not isinstance(adapters, Mapping) or ENCODER not in adapters:
        return adapters
    enc = adapters[ENCODER]
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    hidden = jnp.tanh(f32(enc["embedding"]) @ f32(enc["kernel"]) + f32(enc["bias"]))  # [P, h]
    out = {k: v for k, v in _copy(adapters).items() if k != ENCODER}
    for path, node in _sites(adapters):
        kv = jnp.einsum("ph,lhckd->lcpkd", hidden, f32(node["prefix_kernel"])) + f32(node["prefix_bias"])[:, :, None]
        dtype = jnp.asarray(node["prefix_kernel"]).dtype
        _set(out, path, {name: kv[:, i].astype(dtype) for i, name in enumerate(KEYS)})
    return out


def layer_prefixes(adapters: Mapping) -> list[tuple[tuple[str, ...], jax.Array]]:
    """(site path, [L, P, 2, kv, hd]) of the effective prefixes, for export."""
    direct = effective(adapters)
    return [(path, jnp.stack([node[KEYS[0]], node[KEYS[1]]], axis=2)) for path, node in _sites(direct)]
