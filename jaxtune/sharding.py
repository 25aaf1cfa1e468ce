"""The only place that names mesh axes: mesh building and logical -> mesh rule presets.

Models label weights and activations with logical names (docs/architecture.md); a preset maps those names
to the mesh axes `data, fsdp, tensor`. A dimension that does not divide its mesh axes is
replicated (with one logged warning) instead of failing, so odd vocabularies and small head
counts still run on any mesh.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxtune.errors import UserError

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch is split over both data-parallel axes

Rules = tuple[tuple[str, Any], ...]

_ACTIVATIONS_DP: Rules = (
    ("act_batch", BATCH_AXES),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", None),
    ("act_mlp", None),
    ("act_vocab", None),
)
_TENSOR_PARALLEL: Rules = (
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)
_REPLICATED_WEIGHTS: Rules = tuple(
    (name, None) for name in ("vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "layers")
)

# Flax uses the first rule whose mesh axes are still free, so the specific rules go first.
PRESETS: dict[str, Rules] = {
    # Pure data parallel: weights replicated, batch split over data x fsdp.
    "dp": _ACTIVATIONS_DP + _REPLICATED_WEIGHTS,
    # FSDP (ZeRO-3 style): each weight's embed dimension is split over fsdp.
    "fsdp": _ACTIVATIONS_DP + (("embed", "fsdp"),) + _REPLICATED_WEIGHTS,
    # FSDP + Megatron-style tensor parallelism over heads / mlp / vocab.
    "fsdp_tp": _TENSOR_PARALLEL + _ACTIVATIONS_DP + (("embed", "fsdp"),) + _REPLICATED_WEIGHTS,
}


def rules(preset: str) -> Rules:
    try:
        return PRESETS[preset.replace("+", "_")]
    except KeyError:
        raise ValueError(f"unknown sharding preset {preset!r}; expected one of {', '.join(PRESETS)}") from None


def build_mesh(shape: dict[str, int], devices: Sequence[jax.Device] | None = None,
               dcn_shape: dict[str, int] | None = None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor); `shape` has every axis resolved (no -1).

    With `dcn_shape` (devices on several TPU slices), `shape` is the part of each axis within a
    slice and `dcn_shape` the part across slices, so the fast ICI links carry the inner axes
    (MaxText's layout, through `mesh_utils.create_hybrid_device_mesh`); the axes are their products.
    """
    from jax.experimental import mesh_utils

    devices = list(devices if devices is not None else jax.devices())
    dims = tuple(shape[a] for a in MESH_AXES)
    if dcn_shape is not None and math.prod(dcn_shape.values()) > 1:
        dcn = tuple(dcn_shape[a] for a in MESH_AXES)
        if math.prod(dims) * math.prod(dcn) != len(devices):
            raise ValueError(f"mesh {shape} per slice x {dcn_shape} slices needs {math.prod(dims) * math.prod(dcn)} "
                             f"devices, found {len(devices)}")
        return Mesh(mesh_utils.create_hybrid_device_mesh(dims, dcn, devices=devices), MESH_AXES)
    if math.prod(dims) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, dims))} needs {math.prod(dims)} devices, found {len(devices)}")
    try:
        grid = mesh_utils.create_device_mesh(dims, devices=devices)
    except Exception:  # unusual topologies: a plain reshape is always valid
        grid = np.asarray(devices).reshape(dims)
    return Mesh(grid, MESH_AXES)


def slice_count(devices: Sequence[jax.Device]) -> int:
    """How many TPU slices the devices span (1 for GPUs, CPUs and single-slice TPUs)."""
    return len({getattr(d, "slice_index", 0) for d in devices})


def resolve_mesh_shape(mesh_config: Any, device_count: int, *, prefix: str = "",
                       what: str = "devices") -> dict[str, int]:
    """Fills the one -1 axis so the mesh covers all devices; errors when sizes don't multiply out.

    `mesh_config` is a config's `mesh` section. prefix="dcn_" resolves the across-slice sizes
    against the slice count (what="slices").
    """
    shape = {a: mesh_config[prefix + a] for a in MESH_AXES}
    keys = f"mesh.{prefix}data x mesh.{prefix}fsdp x mesh.{prefix}tensor"
    known = math.prod(v for v in shape.values() if v != -1)
    if any(v == -1 for v in shape.values()):
        if device_count % known:
            raise UserError(
                f"config keys {keys}: fixed axes multiply to {known}, which does not divide the {device_count} {what}"
            )
        for a, v in shape.items():
            if v == -1:
                shape[a] = device_count // known
    elif known != device_count:
        raise UserError(f"config keys {keys} = {known}, but there are {device_count} {what}; set one axis to -1 to fill")
    return shape


def resolve_hybrid_mesh_shape(mesh_config: Any, device_count: int,
                              num_slices: int) -> tuple[dict[str, int], dict[str, int]]:
    """(within-slice, across-slice) axis sizes of a config's `mesh` section; one slice gives
    across-slice sizes of 1."""
    if num_slices == 1:
        return resolve_mesh_shape(mesh_config, device_count), {a: 1 for a in MESH_AXES}
    ici = resolve_mesh_shape(mesh_config, device_count // num_slices, what="devices per slice")
    return ici, resolve_mesh_shape(mesh_config, num_slices, prefix="dcn_", what="slices")


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Rows over data x fsdp, everything else replicated (for [B, T] and [B, 2, T] batches)."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


_warned: set[tuple] = set()


def _mesh_axes_for(names: Sequence[str | None], rule_table: Rules) -> list[Any]:
    """Flax's logical->mesh resolution: first rule per name whose mesh axes are not yet used."""
    used: set[str] = set()
    out: list[Any] = []
    for name in names:
        chosen = None
        if name is not None:
            for logical, mesh_axes in rule_table:
                if logical != name:
                    continue
                axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
                if not used.intersection(axes):
                    chosen = mesh_axes
                    used.update(axes)
                    break
        out.append(chosen)
    return out


def spec_for(shape: Sequence[int], names: Sequence[str | None], mesh: Mesh, rule_table: Rules) -> PartitionSpec:
    """PartitionSpec for one array, replicating any dimension its mesh axes don't divide."""
    spec = []
    for dim, name, axes in zip(shape, names, _mesh_axes_for(names, rule_table)):
        if axes is not None:
            axis_tuple = (axes,) if isinstance(axes, str) else tuple(axes)
            size = math.prod(mesh.shape[a] for a in axis_tuple)
            if dim % size:
                key = (name, dim, axis_tuple)
                if key not in _warned:
                    _warned.add(key)
                    log.warning(
                        "logical axis %r (size %d) does not divide mesh axes %s (size %d); replicating it",
                        name, dim, axis_tuple, size,
                    )
                axes = None
        spec.append(axes)
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def logical_shardings(abstract_tree: Any, mesh: Mesh, rule_table: Rules) -> Any:
    """NamedShardings for a pytree that may hold `nn.LogicallyPartitioned` boxes.

    The result has the structure of the *unboxed* tree: a box becomes one sharding, an
    unannotated leaf (step counters, scalars) is replicated.
    """

    def one(leaf):
        if isinstance(leaf, nn.LogicallyPartitioned):
            return NamedSharding(mesh, spec_for(leaf.value.shape, leaf.names, mesh, rule_table))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, abstract_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def unbox(tree: Any) -> Any:
    """Strips `nn.Partitioned` boxes without applying constraints (jit's out_shardings place data)."""
    return jax.tree.map(
        lambda x: x.value if isinstance(x, nn.Partitioned) else x, tree, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )
