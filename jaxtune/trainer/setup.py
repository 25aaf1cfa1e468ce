"""Everything a run builds before it touches weights or data, shared by `jaxtune train` and `plan`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import optax
from jax.sharding import NamedSharding, PartitionSpec

from jaxtune import loading, models, nonfinite, objectives, optim, sharding, validation
from jaxtune.trainer import step as step_lib
from jaxtune.trainer.state import TrainState, plan_state


@dataclasses.dataclass
class TrainSetup:
    """The run's objective, mesh, model, optimizer, abstract state and jitted step.

    The state and batch are abstract (shapes, dtypes, shardings); `train_step` is the jitted step
    that `train` runs and `plan` compiles. `init_state(rng)` materialises a seeded state in its shards.
    """

    objective: objectives.Objective
    model_config: Any
    model: nn.Module
    num_params: int
    mesh: jax.sharding.Mesh
    mesh_shape: dict[str, int]  # each axis over all devices
    dcn_shape: dict[str, int]  # the across-slice part of each axis (all 1 on one slice)
    rule_table: sharding.Rules
    tx: optax.GradientTransformation
    lr_schedule: optax.Schedule
    apply_fn: Callable  # step.ModelApply: what the objective's loss calls
    abstract_state: TrainState
    state_shardings: TrainState
    init_state: Callable
    reference_kind: str
    batch_shapes: dict[str, jax.ShapeDtypeStruct]  # the global batch, with shardings
    train_step: Callable  # jitted: (state, batch, ref_params) -> (state, metrics)

    @property
    def batch_sharding(self) -> dict[str, NamedSharding]:
        return {k: v.sharding for k, v in self.batch_shapes.items()}

    @property
    def ref_sharding(self):
        """Shardings of the frozen reference copy (reference_kind 'copy'), else None."""
        return self.state_shardings.params if self.reference_kind == "copy" else None

    def abstract_args(self) -> tuple:
        """(state, batch, ref_params) as sharded ShapeDtypeStructs: what `train_step.lower` takes."""
        def with_sharding(shapes, shardings):
            return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)

        state = with_sharding(self.abstract_state, self.state_shardings)
        ref = with_sharding(self.abstract_state.params, self.ref_sharding) if self.ref_sharding is not None else None
        return state, self.batch_shapes, ref


def batch_shapes(config: ml_collections.ConfigDict, mesh, objective: objectives.Objective
                 ) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch the run's objective yields, its leading axis sharded over the data-parallel axes."""
    return {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding.batch_sharding(mesh, len(s.shape)))
            for k, s in objective.batch_shapes(config.train.global_batch_size).items()}


def build_setup(config: ml_collections.ConfigDict, devices: Sequence[jax.Device], *,
                vocab_size: int | None = None, process_count: int = 1,
                objective: objectives.Objective | None = None) -> TrainSetup:
    """Mesh, model, optimizer, abstract state + shardings, batch shapes and the jitted step of the
    run's `objective` (the one instance the run built and loaded its data with; None builds it
    from the config, for callers that have none yet, e.g. `jaxtune plan`).

    Allocates nothing and touches no device: the state is `eval_shape`d, and no array is created
    eagerly, so `devices` may be compile-only TPU devices (deviceless compile). A from-scratch
    run's vocab comes from its tokenizer (`vocab_size`); None keeps the model's configured vocab.
    """
    devices = list(devices)
    objective = objective if objective is not None else objectives.build(config)
    num_slices = sharding.slice_count(devices)
    ici_shape, dcn_shape = sharding.resolve_hybrid_mesh_shape(config.mesh, len(devices), num_slices)
    mesh_shape = {a: ici_shape[a] * dcn_shape[a] for a in sharding.MESH_AXES}
    validation.validate_for_devices(config, mesh_shape, process_count)
    model_config = loading.model_config_from(config, vocab_size=vocab_size, adapt=objective.adapt_model_config)
    validation.validate_for_model(config, getattr(model_config, "max_position_embeddings", None))  # T5: no limit
    model = loading.build_model(config, model_config)
    num_params = models.count_params(model_config)  # the base model's (outside the mesh context)

    mesh = sharding.build_mesh(ici_shape, devices, dcn_shape=dcn_shape)
    rule_table = sharding.rules(config.mesh.rules)
    tx, lr_schedule = optim.build(config.optim, config.train.steps)
    apply_fn = step_lib.make_apply_fn(model, logits_chunk=config.train.logits_chunk)
    with nn.logical_axis_rules(rule_table):  # no mesh entered: nothing here may run eagerly on it
        abstract_state, state_shardings, init_state = plan_state(model, tx, mesh, rule_table,
                                                                 seq_len=config.data.seq_len)
    reference_kind = objective.reference_kind()
    shapes = batch_shapes(config, mesh, objective)
    step_fn = step_lib.make_train_step(
        objective, apply_fn, tx, lr_schedule, accum=config.train.grad_accum_steps,
        microbatch_sharding=NamedSharding(mesh, PartitionSpec(None, sharding.BATCH_AXES)), seed=config.seed,
        grad_check=nonfinite.grad_flags,
    )
    step_fn = nonfinite.guard(step_fn)  # a non-finite update is never applied (train.nonfinite)
    ref_sharding = state_shardings.params if reference_kind == "copy" else None
    train_step = jax.jit(
        step_fn, in_shardings=(state_shardings, {k: v.sharding for k, v in shapes.items()}, ref_sharding),
        out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=(0,),
    )
    return TrainSetup(
        objective=objective, model_config=model_config, model=model, num_params=num_params, mesh=mesh,
        mesh_shape=mesh_shape, dcn_shape=dcn_shape, rule_table=rule_table, tx=tx, lr_schedule=lr_schedule,
        apply_fn=apply_fn, abstract_state=abstract_state, state_shardings=state_shardings, init_state=init_state,
        reference_kind=reference_kind, batch_shapes=shapes, train_step=train_step,
    )


def model_config_from(config: ml_collections.ConfigDict, vocab_size: int | None = None,
                      objective: objectives.Objective | None = None):
    """The model config the run trains: `loading.model_config_from` adapted by its objective
    (e.g. a reward model's scalar head); `objective` is the run's, else one built from the config."""
    objective = objective if objective is not None else objectives.build(config)
    return loading.model_config_from(config, vocab_size, adapt=objective.adapt_model_config)


def start_weights(config: ml_collections.ConfigDict, objective: objectives.Objective, *, vocab_size: int | None):
    """The weights the run started from (loading.start_weights), outside a training run: `jaxtune
    eval` hands this to the objective as its `start_params` (a held-out pair set's reference)."""
    setup = build_setup(config, jax.devices(), vocab_size=vocab_size, objective=objective)
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rule_table):
        return loading.start_weights(config, setup)
