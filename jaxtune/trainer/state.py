"""Building the train state: where a run's weights come from, in one place.

`build_state` is the one way a training run gets its state, in this order of precedence:

1. **resume**: the latest checkpoint in the workdir (params, optimizer state, step and the data
   position; a PEFT run's frozen base is re-created, never checkpointed);
2. **model.hf_dir**: a Hugging Face directory's weights (PEFT: as the frozen base, adapters fresh);
3. **model.init_from**: the params of another run's latest checkpoint (optimizer and step fresh);
4. **seed**: the seeded init (PEFT: a seeded base and adapters).

Where the weights of 2-4 come from (`start_weights`, `base_params`) and the model a config
describes (`model_config_from`) are jaxtune/loading.py's, shared with generate/eval/export.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxtune import checkpoint as checkpoint_lib
from jaxtune import loading, sharding
from jaxtune.peft import base as peft_base
from jaxtune.peft import lora, prefix, wrapper


@flax.struct.dataclass
class TrainState:
    """`params` is what the optimizer trains: every weight, or (LoRA) the "lora" adapters only.
    `frozen` is the LoRA base ("params" collection, maybe quantised): an argument of every step,
    never differentiated, donated and passed through, and never checkpointed. None otherwise."""

    step: jax.Array
    params: Any
    opt_state: Any
    frozen: Any = None


def model_variables(state: TrainState) -> dict:
    """The model's variables for inference (sampling, eval): weights, or LoRA base + adapters."""
    return loading.variables_for(state.params, state.frozen)


def plan_state(model: nn.Module, tx: optax.GradientTransformation, mesh, rule_table, *, seq_len: int):
    """Shapes and shardings of the train state, and a jitted init that creates it already sharded.

    eval_shape gives the boxed (logically annotated) structure without allocating; the rules turn
    it into shardings; jit(init, out_shardings) then materialises every array directly in its
    shards, so no device ever holds a full replica it doesn't need. Call inside the mesh and
    logical-rules context.
    """

    spec = wrapper.spec_of(model)
    tokens = jnp.zeros((1, seq_len), jnp.int32)

    def init_boxed(rng):
        if spec is None:
            params = model.init(rng, tokens)["params"]
            return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
        # LoRA: the base is exactly the plain model's init from the seed (what full fine-tuning
        # would start from); adapters come from their own stream.
        base = loading.base_model(model).init(rng, tokens)["params"]
        adapters = model.init(jax.random.fold_in(rng, 1), tokens)[peft_base.COLLECTION]
        adapters = prefix.init_trainable(jax.random.fold_in(rng, 2), adapters, spec.prefix_projection)
        base = loading.prepare_base(base, spec)
        return TrainState(step=jnp.zeros((), jnp.int32), params=adapters, opt_state=tx.init(adapters), frozen=base)

    def init(rng):
        state = sharding.unbox(init_boxed(rng))
        if spec is not None:
            state = state.replace(params=lora.init_magnitudes(state.frozen, state.params, spec))
        return state

    abstract_boxed = jax.eval_shape(init_boxed, jax.random.key(0))
    shardings = sharding.logical_shardings(abstract_boxed, mesh, rule_table)
    return sharding.unbox(abstract_boxed), shardings, jax.jit(init, out_shardings=shardings)


def state_from_params(params, tx: optax.GradientTransformation, state_shardings) -> TrainState:
    """A step-0 full fine-tuning state around `params`."""
    opt_state = jax.jit(tx.init, out_shardings=state_shardings.opt_state)(params)
    return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), state_shardings.step), params=params,
                      opt_state=opt_state)


def fresh_state(config: ml_collections.ConfigDict, setup) -> TrainState:
    """A step-0 state: model.hf_dir > model.init_from > seed (see the module docstring)."""
    model_config, shardings, spec = setup.model_config, setup.state_shardings, loading.peft_spec(config)
    objective = getattr(setup, "objective", None)
    adapts = objective is not None and objective.adapts_start_weights
    if spec is not None and (config.model.hf_dir or adapts):  # the base as base_params builds it on resume too
        base = loading.base_params(config, model_config, setup)
        adapters_only = jax.jit(lambda rng: setup.init_state(rng).replace(frozen=None),  # XLA drops the random base
                                out_shardings=shardings.replace(frozen=None))
        state = adapters_only(jax.random.key(config.seed)).replace(frozen=base)
        magnitudes = jax.jit(functools.partial(lora.init_magnitudes, spec=spec),
                             out_shardings=shardings.params)
        return state.replace(params=magnitudes(base, state.params))
    if spec is None and (config.model.hf_dir or config.model.init_from):
        return state_from_params(loading.start_weights(config, setup), setup.tx, shardings)
    state = setup.init_state(jax.random.key(config.seed))
    if adapts and spec is None:  # the objective's part of the seeded weights (e.g. PPO's value model)
        state = state.replace(params=objective.adapt_start_weights(state.params, setup, frozen_base=False))
    return state


@dataclasses.dataclass
class Start:
    """What `build_state` returns: the state, the step it is at, and (resumed) the checkpoint's config."""

    state: TrainState
    step: int = 0
    saved_config: dict | None = None


def build_state(config: ml_collections.ConfigDict, setup, *, checkpointer=None, data_iter=None) -> Start:
    """The run's train state: resume > model.hf_dir > model.init_from > seed (module docstring).

    With a `checkpointer`, its latest complete checkpoint wins and `data_iter` (Grain) is restored
    to its position. Every process makes the orbax calls and lands on the same step: a damaged
    latest step falls back to the one before (warned, moved aside). Call inside the run's mesh.
    """
    from jaxtune import distributed

    if checkpointer is not None:
        saved_state = checkpoint_lib.abstract_with_shardings(setup.abstract_state.replace(frozen=None),
                                                             setup.state_shardings.replace(frozen=None))
        restored = checkpointer.restore_latest(saved_state, data_iter)
        distributed.agree(None if restored is None else restored[0], "resume step")
        if restored is not None:
            latest, state = restored
            saved = checkpointer.saved_config(latest)
            if loading.peft_spec(config) is not None:  # adapters-only checkpoint: re-create the base
                state = state.replace(frozen=loading.base_params(config, setup.model_config, setup))
            return Start(state, int(latest), saved)
    return Start(fresh_state(config, setup))
