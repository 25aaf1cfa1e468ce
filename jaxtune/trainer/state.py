"""Building the train state: where a run's weights come from, in one place.

`build_state` is the one way a training run gets its state, in this order of precedence:

1. **resume**: the latest checkpoint in the workdir (params, optimizer state, step and the data
   position; a PEFT run's frozen base is re-created, never checkpointed);
2. **model.hf_dir**: a Hugging Face directory's weights (PEFT: as the frozen base, adapters fresh);
3. **model.init_from**: the params of another run's latest checkpoint (optimizer and step fresh);
4. **seed**: the seeded init (PEFT: a seeded base and adapters).

`start_weights` gives the weights of 2-4 (PEFT: the base) for a frozen reference copy, rebuilt on
resume rather than checkpointed; `base_params` a PEFT run's base outside a training mesh
(generate, eval, export); `model_config_from` the model a config describes, `peft_spec` its PEFT
settings and `build_model` the model wrapped by them (jaxtune/peft/wrapper.py).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxtune import checkpoint as checkpoint_lib
from jaxtune import models, sharding
from jaxtune.errors import UserError
from jaxtune.peft import base as peft_base
from jaxtune.peft import lora, prefix, quant, wrapper

log = logging.getLogger(__name__)

_MODEL_OVERRIDE_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
    "head_dim", "max_position_embeddings", "rope_theta", "tie_word_embeddings",
)


@flax.struct.dataclass
class TrainState:
    """`params` is what the optimizer trains: every weight, or (LoRA) the "lora" adapters only.
    `frozen` is the LoRA base ("params" collection, maybe quantised): an argument of every step,
    never differentiated, donated and passed through, and never checkpointed. None otherwise."""

    step: jax.Array
    params: Any
    opt_state: Any
    frozen: Any = None


def model_config_from(config: ml_collections.ConfigDict, vocab_size: int | None = None):
    """The model config: named variant + non-None overrides (a from-scratch vocab comes from the
    tokenizer), as the run's objective trains it (`Objective.adapt_model_config`)."""
    from jaxtune import objectives

    m = config.model
    attention = m.get("attention", "auto")  # configs saved before the setting existed
    if m.hf_dir:
        model_config = models.config_from_pretrained(
            m.hf_dir, dtype=m.dtype, param_dtype=m.param_dtype, remat_policy=m.remat_policy,
            attention=attention)
    else:
        overrides = {k: m[k] for k in _MODEL_OVERRIDE_KEYS if m[k] is not None}
        if "vocab_size" not in overrides and vocab_size is not None:
            overrides["vocab_size"] = vocab_size
        overrides.update(dtype=m.dtype, param_dtype=m.param_dtype, remat_policy=m.remat_policy, attention=attention)
        model_config = models.get_config(m.family, m.variant, **overrides)
    if "objective" not in config:
        return model_config
    return objectives.build(config).adapt_model_config(model_config)


def peft_spec(config: ml_collections.ConfigDict) -> peft_base.Spec | None:
    """The run's PEFT settings (config.peft), validated; None for full fine-tuning."""
    return peft_base.spec_from_config(config.peft) if "peft" in config else None


def build_model(config: ml_collections.ConfigDict, model_config):
    """The model a run trains and samples: `model_config`'s model, wrapped by the run's PEFT method."""
    return wrapper.wrap(models.build(model_config), peft_spec(config))


def peft_base_pointer(config: ml_collections.ConfigDict) -> dict | None:
    """Where a LoRA run's frozen base comes from (written beside its adapters-only checkpoints)."""
    if config.peft.method == "none":
        return None
    if config.model.hf_dir:
        return {"hf_dir": config.model.hf_dir}
    return {"family": config.model.family, "variant": config.model.variant, "seed": config.seed}


def variables_for(params, frozen=None) -> dict:
    """The model's variables: the weights, or a PEFT run's base + adapters (prefix runs: the
    effective prefixes of their trainable tree)."""
    if frozen is None:
        return {"params": params}
    return {"params": frozen, peft_base.COLLECTION: prefix.effective(params)}


def model_variables(state: TrainState) -> dict:
    """The model's variables for inference (sampling, eval): weights, or LoRA base + adapters."""
    return variables_for(state.params, state.frozen)


def base_model(model) -> nn.Module:
    """The model without adapters (its params are the base params of the LoRA model)."""
    return wrapper.unwrap(model)


def prepare_base(base, spec):
    """A PEFT run's frozen base as it is held: float weights cast to `spec.base_dtype` (when set),
    then QLoRA's decoder kernels as NF4/int8 codes (when `spec.quantize`)."""
    if spec is None:
        return base
    if spec.base_dtype:
        dtype = jnp.dtype(spec.base_dtype)
        base = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, base)
    if spec.quantize == "none":
        return base
    return quant.quantize_params(base, spec.quantize, spec.quant_block_size)


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
        base = base_model(model).init(rng, tokens)["params"]
        adapters = model.init(jax.random.fold_in(rng, 1), tokens)[peft_base.COLLECTION]
        adapters = prefix.init_trainable(jax.random.fold_in(rng, 2), adapters, spec.prefix_projection)
        base = prepare_base(base, spec)
        return TrainState(step=jnp.zeros((), jnp.int32), params=adapters, opt_state=tx.init(adapters), frozen=base)

    def init(rng):
        state = sharding.unbox(init_boxed(rng))
        if spec is not None:
            state = state.replace(params=lora.init_magnitudes(state.frozen, state.params, spec))
        return state

    abstract_boxed = jax.eval_shape(init_boxed, jax.random.key(0))
    shardings = sharding.logical_shardings(abstract_boxed, mesh, rule_table)
    return sharding.unbox(abstract_boxed), shardings, jax.jit(init, out_shardings=shardings)


# ---- where the weights come from ----------------------------------------------------------------


def base_params(config: ml_collections.ConfigDict, model_config, setup=None, *, as_held: bool = True):
    """A PEFT run's frozen base as training holds it (cast/quantised): from model.hf_dir, or the
    seed's init. With `setup` (a TrainSetup) in its training shardings; without, on the default
    device outside any mesh (generate, eval, export). No PEFT (`peft_spec(config)` None): the
    plain model's weights from the same sources. `as_held=False` (without `setup`): the float base
    before PEFT casts or quantises it."""
    spec = peft_spec(config) if as_held else None
    if setup is None:
        if config.model.hf_dir:
            _, base = models.from_pretrained(config.model.hf_dir, dtype=model_config.param_dtype,
                                             num_labels=model_config.num_labels)  # a reward model's head
        else:
            plain = models.build(model_config)
            init = jax.jit(lambda rng: sharding.unbox(plain.init(rng, jnp.zeros((1, 1), jnp.int32))["params"]))
            base = init(jax.random.key(config.seed))
        return base if spec is None else jax.jit(functools.partial(prepare_base, spec=spec))(base)
    shardings = setup.state_shardings
    if not config.model.hf_dir:
        return jax.jit(lambda rng: setup.init_state(rng).frozen, out_shardings=shardings.frozen)(
            jax.random.key(config.seed))
    plain = models.build(model_config)
    abstract = jax.eval_shape(plain.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    base = models.load_params(config.model.hf_dir, plain.config,
                              sharding.logical_shardings(abstract, setup.mesh, setup.rule_table))
    if spec.quantize == "none" and not spec.base_dtype:
        return base
    return jax.jit(functools.partial(prepare_base, spec=spec), out_shardings=shardings.frozen)(base)


def start_weights(config: ml_collections.ConfigDict, setup) -> Any:
    """The weights a fresh run starts from (PEFT: the frozen base), in their shards: model.hf_dir >
    model.init_from > seed. Deterministic, so a frozen reference copy is rebuilt from it on resume."""
    model_config, shardings = setup.model_config, setup.state_shardings
    if peft_spec(config) is not None:
        return base_params(config, model_config, setup)
    if config.model.hf_dir:
        return models.load_params(config.model.hf_dir, model_config, shardings.params)
    if config.model.init_from:
        target = checkpoint_lib.abstract_with_shardings(setup.abstract_state.params, shardings.params)
        return _restore_init_from(config, setup, target)
    return setup.init_state(jax.random.key(config.seed)).params


def _restore_init_from(config: ml_collections.ConfigDict, setup, target) -> Any:
    """model.init_from's params; a reward model started from a causal-LM run (a checkpoint without
    the score head) takes the decoder from it and the head from the seed's init."""
    try:
        return checkpoint_lib.restore_params(config.model.init_from, target)
    except UserError:
        if not getattr(setup.model_config, "num_labels", None) or "score" not in target:
            raise
    decoder = checkpoint_lib.restore_params(config.model.init_from, {k: v for k, v in target.items() if k != "score"})
    head = jax.jit(lambda rng: setup.init_state(rng).params["score"], out_shardings=setup.state_shardings.params["score"])
    return {**decoder, "score": head(jax.random.key(config.seed))}


def state_from_params(params, tx: optax.GradientTransformation, state_shardings) -> TrainState:
    """A step-0 full fine-tuning state around `params`."""
    opt_state = jax.jit(tx.init, out_shardings=state_shardings.opt_state)(params)
    return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), state_shardings.step), params=params,
                      opt_state=opt_state)


def fresh_state(config: ml_collections.ConfigDict, setup) -> TrainState:
    """A step-0 state: model.hf_dir > model.init_from > seed (see the module docstring)."""
    model_config, shardings, spec = setup.model_config, setup.state_shardings, peft_spec(config)
    if spec is not None and config.model.hf_dir:
        base = base_params(config, model_config, setup)
        adapters_only = jax.jit(lambda rng: setup.init_state(rng).replace(frozen=None),  # XLA drops the random base
                                out_shardings=shardings.replace(frozen=None))
        state = adapters_only(jax.random.key(config.seed)).replace(frozen=base)
        magnitudes = jax.jit(functools.partial(lora.init_magnitudes, spec=spec),
                             out_shardings=shardings.params)
        return state.replace(params=magnitudes(base, state.params))
    if spec is None and (config.model.hf_dir or config.model.init_from):
        return state_from_params(start_weights(config, setup), setup.tx, shardings)
    return setup.init_state(jax.random.key(config.seed))


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
            if peft_spec(config) is not None:  # adapters-only checkpoint: re-create the base
                state = state.replace(frozen=base_params(config, setup.model_config, setup))
            return Start(state, int(latest), saved)
    return Start(fresh_state(config, setup))
