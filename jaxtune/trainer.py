"""The training loop: one loop for every objective, and the only module that wires the others.

Order of a run: validate config -> data (tokenizer, records) -> model -> mesh + sharded init or
exact resume -> jitted train step (sharded in/out, donated state) -> log / eval / checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from jaxtune import checkpoint as checkpoint_lib
from jaxtune import config as config_lib
from jaxtune import distributed, evaluate, metrics as metrics_lib, models, nonfinite, optim, paths, reference, sharding
from jaxtune.data import datasets, pair_packing, pipeline, preference
from jaxtune.errors import UserError
from jaxtune.models import hf_check
from jaxtune.objectives import (TokenStats, kto_loss, masked_sequence_sums, model_token_stats, preference_loss,
                                sft_loss_from_stats, token_stats)
from jaxtune.objectives import segments
from jaxtune.objectives.logprobs import DEFAULT_CHUNK as DEFAULT_LOGITS_CHUNK
from jaxtune.peft import lora, prefix, quant

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
    """The model config: named variant + non-None overrides; a from-scratch vocab comes from the tokenizer."""
    m = config.model
    peft = lora.spec_from_config(config.peft) if "peft" in config else None
    attention = m.get("attention", "auto")  # configs saved before the setting existed
    if m.hf_dir:
        return models.config_from_pretrained(
            m.hf_dir, dtype=m.dtype, param_dtype=m.param_dtype, remat_policy=m.remat_policy,
            attention=attention).replace(peft=peft)
    overrides = {k: m[k] for k in _MODEL_OVERRIDE_KEYS if m[k] is not None}
    if "vocab_size" not in overrides and vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    overrides.update(dtype=m.dtype, param_dtype=m.param_dtype, remat_policy=m.remat_policy, attention=attention,
                     peft=peft)
    return models.get_config(m.family, m.variant, **overrides)


def peft_base_pointer(config: ml_collections.ConfigDict) -> dict | None:
    """Where a LoRA run's frozen base comes from (written beside its adapters-only checkpoints)."""
    if config.peft.method == "none":
        return None
    if config.model.hf_dir:
        return {"hf_dir": config.model.hf_dir}
    return {"family": config.model.family, "variant": config.model.variant, "seed": config.seed}


class ModelApply:
    """apply_fn(params, tokens, positions, segment_ids, frozen=None, rngs=None) -> logits, for a jaxtune model.

    Full fine-tuning: params are the weights. LoRA: params are the adapters and `frozen` the base;
    `apply_fn(state.frozen, ...)` (no adapters) is the base model, the free reference for DPO.
    `token_stats` is what the losses use: per-token log-probs with the LM head run `logits_chunk`
    sequence positions at a time (objectives/logprobs.py; 0 = full logits).
    """

    def __init__(self, model: nn.Module, logits_chunk: int = DEFAULT_LOGITS_CHUNK):
        self.model, self.logits_chunk = model, logits_chunk

    def __call__(self, params, tokens, positions, segment_ids, frozen=None, rngs=None):
        return self.model.apply(variables_for(params, frozen), tokens, positions=positions, segment_ids=segment_ids,
                                rngs=rngs)

    def token_stats(self, params, rows: dict[str, jax.Array], frozen=None, rngs=None) -> TokenStats:
        return model_token_stats(self.model, variables_for(params, frozen), rows["inputs"], rows["targets"],
                                 positions=rows["positions"], segment_ids=rows["segment_ids"], rngs=rngs,
                                 chunk=self.logits_chunk)


def make_apply_fn(model: nn.Module, logits_chunk: int = DEFAULT_LOGITS_CHUNK) -> ModelApply:
    """The model's apply function (see ModelApply)."""
    return ModelApply(model, logits_chunk)


def token_stats_of(apply_fn: Callable, params, rows: dict[str, jax.Array], frozen=None, rngs=None) -> TokenStats:
    """Per-token stats of [N, T] rows: the chunked LM head for a ModelApply, full logits for any other apply_fn."""
    if isinstance(apply_fn, ModelApply):
        return apply_fn.token_stats(params, rows, frozen=frozen, rngs=rngs)
    logits = apply_fn(params, rows["inputs"], rows["positions"], rows["segment_ids"], frozen=frozen, rngs=rngs)
    return token_stats(logits, rows["targets"])


def variables_for(params, frozen=None) -> dict:
    """The model's variables: the weights, or a PEFT run's base + adapters (prefix runs: the
    effective prefixes of their trainable tree)."""
    if frozen is None:
        return {"params": params}
    return {"params": frozen, lora.COLLECTION: prefix.effective(params)}


def model_variables(state: TrainState) -> dict:
    """The model's variables for inference (sampling, eval): weights, or LoRA base + adapters."""
    return variables_for(state.params, state.frozen)


def plan_state(model: nn.Module, tx: optax.GradientTransformation, mesh, rule_table, *, seq_len: int):
    """Shapes and shardings of the train state, and a jitted init that creates it already sharded.

    eval_shape gives the boxed (logically annotated) structure without allocating; the rules turn
    it into shardings; jit(init, out_shardings) then materialises every array directly in its
    shards, so no device ever holds a full replica it doesn't need. Call inside the mesh and
    logical-rules context.
    """

    spec = model.config.peft
    tokens = jnp.zeros((1, seq_len), jnp.int32)

    def init_boxed(rng):
        if spec is None:
            params = model.init(rng, tokens)["params"]
            return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
        # LoRA: the base is exactly the plain model's init from the seed (what full fine-tuning
        # would start from); adapters come from their own stream.
        base = base_model(model).init(rng, tokens)["params"]
        adapters = model.init(jax.random.fold_in(rng, 1), tokens)[lora.COLLECTION]
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


def base_model(model: nn.Module) -> nn.Module:
    """The model without adapters (its params are the base params of the LoRA model)."""
    return models.build(model.config.replace(peft=None))


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


def init_from_pretrained(hf_dir: str, model_config, tx: optax.GradientTransformation, state_shardings,
                         init_state: Callable | None = None, mesh=None, rule_table=None, seed: int = 0) -> TrainState:
    """A step-0 train state whose params are read from an HF checkpoint straight into their shards.

    LoRA (`model_config.peft`): the checkpoint is the frozen base; adapters come from `init_state`.
    """
    if model_config.peft is not None:
        base = load_base(hf_dir, model_config, state_shardings, mesh, rule_table)
        adapters_only = jax.jit(lambda rng: init_state(rng).replace(frozen=None),  # XLA drops the random base
                                out_shardings=state_shardings.replace(frozen=None))
        state = adapters_only(jax.random.key(seed)).replace(frozen=base)
        magnitudes = jax.jit(functools.partial(lora.init_magnitudes, spec=model_config.peft),
                             out_shardings=state_shardings.params)
        return state.replace(params=magnitudes(base, state.params))
    return state_from_params(models.load_params(hf_dir, model_config, state_shardings.params), tx, state_shardings)


def initial_params(config, model_config, abstract_state, state_shardings, init_state, mesh, rule_table) -> Any:
    """The reference weights a run starts from: model.hf_dir, model.init_from or the seeded init
    (LoRA: the frozen base), in their shards.

    Deterministic, so a frozen reference copy is rebuilt from it on resume instead of being
    checkpointed.
    """
    if model_config.peft is not None:
        return _frozen_base(config, model_config, init_state, state_shardings, mesh, rule_table)
    if config.model.hf_dir:
        return models.load_params(config.model.hf_dir, model_config, state_shardings.params)
    if config.model.init_from:
        target = checkpoint_lib.abstract_with_shardings(abstract_state.params, state_shardings.params)
        return checkpoint_lib.restore_params(config.model.init_from, target)
    return init_state(jax.random.key(config.seed)).params


def state_from_params(params, tx: optax.GradientTransformation, state_shardings) -> TrainState:
    """A step-0 full fine-tuning state around `params`."""
    opt_state = jax.jit(tx.init, out_shardings=state_shardings.opt_state)(params)
    return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), state_shardings.step), params=params,
                      opt_state=opt_state)


def load_base(hf_dir: str, model_config, state_shardings, mesh, rule_table):
    """A LoRA run's frozen base from an HF dir, in its shardings (quantised when QLoRA)."""
    plain = base_model(models.build(model_config))
    abstract = jax.eval_shape(plain.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    base = models.load_params(hf_dir, plain.config, sharding.logical_shardings(abstract, mesh, rule_table))
    if model_config.peft.quantize == "none" and not model_config.peft.base_dtype:
        return base
    return jax.jit(functools.partial(prepare_base, spec=model_config.peft), out_shardings=state_shardings.frozen)(base)


def data_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """config.data, reading the HF dir's own tokenizer when model.hf_dir is set and data.tokenizer is not."""
    if not config.model.hf_dir or config.data.tokenizer:
        return config.data
    data_cfg = ml_collections.ConfigDict(config.data.to_dict())
    data_cfg.tokenizer = config.model.hf_dir  # load_tokenizer picks tokenizer.json, else tokenizer.model
    return data_cfg


def split_microbatches(x: jax.Array, accum: int) -> jax.Array:
    """[B, ...] -> [accum, B/accum, ...] taking strided rows, so every micro-batch spans all devices."""
    x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:])
    return jnp.swapaxes(x, 0, 1)


def pair_scores(apply_fn: Callable, params, batch: dict[str, jax.Array], frozen=None, rngs=None):
    """Summed log-probs and lengths [B, 2] of a [B, 2, T] preference batch, in one [2B, T] forward pass.

    The pair axis is folded into the batch axis next to its pair, so sharding B keeps a pair on one device.
    """
    logps, lengths, _ = segments.pair_logps(
        lambda rows: token_stats_of(apply_fn, params, rows, frozen=frozen, rngs=rngs), batch, pipeline.BATCH_KEYS)
    return logps, lengths


def make_loss_fn(apply_fn: Callable, *, z_loss: float, objective=None, reference_kind: str = "none") -> Callable:
    """loss_fn(params, batch, normalizer, frozen, rng, ref_params) -> (loss, metrics) for config.objective.

    SFT normalises by the global batch's trained tokens, preference objectives by its pairs, so
    summing over micro-batches gives the global-batch mean (metrics are scaled the same way).
    The reference log-probs come from `ref_params` (copy), the LoRA model without its adapters
    (base: no extra weights), the batch (precomputed), or nowhere (none: reference-free losses).
    """

    def sft_loss_fn(params, batch, normalizer, frozen=None, rng=None, ref_params=None):
        rngs = None if rng is None else {"dropout": rng}
        stats = token_stats_of(apply_fn, params, batch, frozen=frozen, rngs=rngs)
        return sft_loss_from_stats(stats, batch, normalizer=normalizer, z_loss=z_loss)

    if objective is None or objective.type == "sft":
        return sft_loss_fn

    def reference_logps(batch, frozen, ref_params):
        if reference_kind == "copy":
            return jax.lax.stop_gradient(pair_scores(apply_fn, ref_params, batch)[0])
        if reference_kind == "base":
            return jax.lax.stop_gradient(pair_scores(apply_fn, frozen, batch)[0])
        if reference_kind == "precomputed":
            return jnp.stack([segments.per_pair(batch, k) for k in preference.REF_KEYS], axis=-1)
        return jnp.zeros(segments.per_pair(batch, preference.INDEX_KEY).shape + (2,), jnp.float32)  # reference-free

    def preference_loss_fn(params, batch, normalizer, frozen=None, rng=None, ref_params=None):
        rngs = None if rng is None else {"dropout": rng}
        logps, lengths = pair_scores(apply_fn, params, batch, frozen=frozen, rngs=rngs)
        ref = reference_logps(batch, frozen, ref_params)
        valid = batch[segments.PAIR_MASK_KEY].reshape(-1) > 0 if segments.is_packed(batch) else None
        if objective.type == "kto":
            losses, metrics = kto_loss(
                logps[:, 0], ref[:, 0], segments.per_pair(batch, preference.LABEL_KEY), logps[:, 1], ref[:, 1],
                beta=objective.beta, desirable_weight=objective.desirable_weight,
                undesirable_weight=objective.undesirable_weight, valid=valid,
            )
        else:
            losses, metrics = preference_loss(
                objective.loss_type, logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1],
                chosen_lengths=lengths[:, 0], rejected_lengths=lengths[:, 1], beta=objective.beta,
                label_smoothing=objective.label_smoothing, gamma=objective.gamma,
                desirable_weight=objective.desirable_weight, undesirable_weight=objective.undesirable_weight,
                sft_weight=objective.sft_weight, valid=valid,
            )
        share = segments.pair_count(batch) / normalizer  # this micro-batch's share of the global batch
        loss = jnp.sum(losses) / normalizer
        return loss, dict({k: v * share for k, v in metrics.items()}, loss=loss)

    return preference_loss_fn


def make_train_step(
    apply_fn: Callable, tx: optax.GradientTransformation, lr_schedule: optax.Schedule, *, accum: int,
    z_loss: float, microbatch_sharding: NamedSharding | None = None, seed: int = 0, objective=None,
    reference_kind: str = "none", grad_check: Callable | None = None,
) -> Callable:
    """train_step(state, batch, ref_params=None) -> (state, metrics); one optimizer step per call.

    Gradients are taken w.r.t. state.params only (LoRA: the adapters); state.frozen is passed to
    apply_fn and returned untouched. Each (step, micro-batch) gets its own dropout rng.
    `ref_params` is the frozen reference copy (objective.reference='copy'): never updated, no
    optimizer state. `grad_check(grads) -> dict` adds its entries to the metrics (nonfinite.grad_flags).
    """
    loss_fn = make_loss_fn(apply_fn, z_loss=z_loss, objective=objective, reference_kind=reference_kind)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    pairs = objective is not None and objective.type != "sft"

    def train_step(state: TrainState, batch: dict[str, jax.Array], ref_params=None):
        # Normalise by the trained tokens (pairs) of the whole global batch, so accumulation is exact.
        if pairs:
            normalizer = jnp.maximum(segments.pair_count(batch), 1.0)
        else:
            normalizer = jnp.sum(batch["loss_mask"].astype(jnp.float32))
        dropout_key = jax.random.fold_in(jax.random.key(seed), 0x1d0)  # traced: no eager array
        step_key = jax.random.fold_in(dropout_key, state.step)
        if accum == 1:
            (_, metrics), grads = grad_fn(state.params, batch, normalizer, state.frozen, step_key, ref_params)
        else:
            micro = jax.tree.map(lambda x: split_microbatches(x, accum), batch)
            if microbatch_sharding is not None:
                micro = jax.lax.with_sharding_constraint(micro, microbatch_sharding)
            first = jax.tree.map(lambda x: x[0], micro)
            shapes = jax.eval_shape(grad_fn, state.params, first, normalizer, state.frozen, step_key, ref_params)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (shapes[1], shapes[0][1]))

            def body(carry, xs):
                mb, i = xs
                (_, m), g = grad_fn(state.params, mb, normalizer, state.frozen, jax.random.fold_in(step_key, i),
                                    ref_params)
                return jax.tree.map(jnp.add, carry, (g, m)), None

            (grads, metrics), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(accum)))
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, grad_norm=grad_norm, lr=lr_schedule(state.step))
        if grad_check is not None:
            metrics.update(grad_check(grads))
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


class _StopSignal:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the next step and exits cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:  # second signal: give up immediately
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclasses.dataclass
class RunSummary:
    steps: int
    wall_s: float
    train_s: float
    tokens_per_s: float
    stopped_early: bool  # by a signal; a time budget (train.max_seconds) ends the run normally
    metrics: dict[str, float]
    eval_before: dict[str, float] | None
    eval_after: dict[str, float] | None
    param_bytes: int = 0  # weights held on the devices: trained + frozen + reference copy


@dataclasses.dataclass
class TrainSetup:
    """Everything a run builds before it touches weights or data, shared by `train` and `plan`.

    The state and batch are abstract (shapes, dtypes, shardings); `train_step` is the jitted step
    that `train` runs and `plan` compiles. `init_state(rng)` materialises a seeded state in its shards.
    """

    model_config: Any
    model: nn.Module
    num_params: int
    mesh: jax.sharding.Mesh
    mesh_shape: dict[str, int]  # each axis over all devices
    dcn_shape: dict[str, int]  # the across-slice part of each axis (all 1 on one slice)
    rule_table: sharding.Rules
    tx: optax.GradientTransformation
    lr_schedule: optax.Schedule
    apply_fn: Callable
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
        """Shardings of the frozen reference copy (objective.reference='copy'), else None."""
        return self.state_shardings.params if self.reference_kind == "copy" else None

    def abstract_args(self) -> tuple:
        """(state, batch, ref_params) as sharded ShapeDtypeStructs: what `train_step.lower` takes."""
        def with_sharding(shapes, shardings):
            return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)

        state = with_sharding(self.abstract_state, self.state_shardings)
        ref = with_sharding(self.abstract_state.params, self.ref_sharding) if self.ref_sharding is not None else None
        return state, self.batch_shapes, ref


def batch_shapes(config: ml_collections.ConfigDict, mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch a run's data pipeline yields, as sharded shapes: [B, T] rows for SFT,
    [B, 2, T] pairs (+ per-pair index, KTO label, precomputed reference log-probs) otherwise."""
    batch, seq_len = config.train.global_batch_size, config.data.seq_len

    def spec(shape, dtype=jnp.int32):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))

    if config.objective.type == "sft":
        return {k: spec((batch, seq_len)) for k in pipeline.BATCH_KEYS}
    if config.data.packing:  # packed pairs: rows of two padded rows' room, [rows, max_pairs] pair slots
        pair = (batch, config.data.max_pairs_per_row)
        shapes = {k: spec((batch, pair_packing.row_length(seq_len))) for k in pipeline.BATCH_KEYS}
        shapes[pair_packing.PAIR_MASK_KEY] = spec(pair)
    else:
        pair = (batch,)
        shapes = {k: spec((batch, 2, seq_len)) for k in pipeline.BATCH_KEYS}
    shapes[preference.INDEX_KEY] = spec(pair)
    if config.objective.type == "kto":
        shapes[preference.LABEL_KEY] = spec(pair)
    if config_lib.resolved_reference(config) == "precomputed":
        shapes.update({k: spec(pair, jnp.float32) for k in preference.REF_KEYS})
    return shapes


def build_setup(config: ml_collections.ConfigDict, devices: Sequence[jax.Device], *,
                vocab_size: int | None = None, process_count: int = 1) -> TrainSetup:
    """Mesh, model, optimizer, abstract state + shardings, batch shapes and the jitted train step.

    Allocates nothing and touches no device: the state is `eval_shape`d, and no array is created
    eagerly, so `devices` may be compile-only TPU devices (deviceless compile). A from-scratch
    run's vocab comes from its tokenizer (`vocab_size`); None keeps the model's configured vocab.
    """
    devices = list(devices)
    num_slices = sharding.slice_count(devices)
    ici_shape, dcn_shape = config_lib.resolve_hybrid_mesh_shape(config, len(devices), num_slices)
    mesh_shape = {a: ici_shape[a] * dcn_shape[a] for a in sharding.MESH_AXES}
    config_lib.validate_for_devices(config, mesh_shape, process_count)
    model_config = model_config_from(config, vocab_size=vocab_size)
    config_lib.validate_for_model(config, model_config.max_position_embeddings)
    model = models.build(model_config)
    num_params = models.count_params(model_config)  # the base model's (outside the mesh context)

    mesh = sharding.build_mesh(ici_shape, devices, dcn_shape=dcn_shape)
    rule_table = sharding.rules(config.mesh.rules)
    tx, lr_schedule = optim.build(config.optim, config.train.steps)
    apply_fn = make_apply_fn(model, logits_chunk=config.train.logits_chunk)
    with nn.logical_axis_rules(rule_table):  # no mesh entered: nothing here may run eagerly on it
        abstract_state, state_shardings, init_state = plan_state(model, tx, mesh, rule_table,
                                                                 seq_len=config.data.seq_len)
    reference_kind = config_lib.resolved_reference(config)
    shapes = batch_shapes(config, mesh)
    step_fn = make_train_step(
        apply_fn, tx, lr_schedule, accum=config.train.grad_accum_steps, z_loss=config.train.z_loss,
        microbatch_sharding=NamedSharding(mesh, PartitionSpec(None, sharding.BATCH_AXES)), seed=config.seed,
        objective=config.objective, reference_kind=reference_kind, grad_check=nonfinite.grad_flags,
    )
    step_fn = nonfinite.guard(step_fn)  # a non-finite update is never applied (train.nonfinite)
    ref_sharding = state_shardings.params if reference_kind == "copy" else None
    train_step = jax.jit(
        step_fn, in_shardings=(state_shardings, {k: v.sharding for k, v in shapes.items()}, ref_sharding),
        out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=(0,),
    )
    return TrainSetup(
        model_config=model_config, model=model, num_params=num_params, mesh=mesh, mesh_shape=mesh_shape,
        dcn_shape=dcn_shape, rule_table=rule_table, tx=tx, lr_schedule=lr_schedule, apply_fn=apply_fn,
        abstract_state=abstract_state, state_shardings=state_shardings, init_state=init_state,
        reference_kind=reference_kind, batch_shapes=shapes, train_step=train_step,
    )


def train(config: ml_collections.ConfigDict, workdir: str | Path, *, devices: Sequence[jax.Device] | None = None,
          on_metrics: Callable[[dict], None] | None = None) -> RunSummary:
    """Runs (or resumes) the job described by `config` in `workdir`, on `devices` (default: all).

    `on_metrics(row)` is called with every row written to metrics.jsonl (train and eval rows)."""
    wall_start = time.time()
    if config.model.hf_dir:  # a damaged download fails here, naming the file, before anything is written
        hf_check.validate_hf_dir(config.model.hf_dir, tokenizer=not config.data.tokenizer)
    workdir = paths.path(workdir)  # local or gs://...
    workdir.mkdir(parents=True, exist_ok=True)
    process_count = jax.process_count()
    devices = list(devices) if devices is not None else jax.devices()
    config_json = config_lib.to_json_dict(config)
    distributed.agree(config_json, "config")  # every process runs the same command

    pairs = config.objective.type != "sft"
    if pairs:
        data = datasets.load_preference_data(data_config(config), workdir, unpaired=config.objective.type == "kto",
                                             eval_cfg=config.eval)
    else:
        data = datasets.load_sft_data(data_config(config), workdir, seed=config.seed)
    tokenizer = data.tokenizer
    setup = build_setup(config, devices, vocab_size=tokenizer.vocab_size, process_count=process_count)
    model_config, model, num_params = setup.model_config, setup.model, setup.num_params
    if tokenizer.vocab_size > model_config.vocab_size:
        raise UserError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {model_config.vocab_size} "
            f"({'config.json of model.hf_dir' if config.model.hf_dir else 'model.vocab_size'}); "
            "use a tokenizer that fits the embedding or a larger vocab_size"
        )
    mesh, mesh_shape, rule_table, tx = setup.mesh, setup.mesh_shape, setup.rule_table, setup.tx
    seq_len = config.data.seq_len
    replicated = sharding.replicated(mesh)
    apply_fn = setup.apply_fn
    batch_sharding = setup.batch_sharding
    batch_keys = tuple(batch_sharding)

    local_batch = config.train.global_batch_size // process_count
    if pairs:
        dataset, data_stats = _preference_dataset(config, data, local_batch)
    else:
        dataset, data_stats = datasets.train_dataset(
            data, config.data, batch_size=local_batch, seed=config.seed, process_index=jax.process_index(),
            process_count=process_count,
        )
        if len(data.tasks) > 1 and jax.process_index() == 0:
            print(f"jaxtune: data mixture ({data.mixture.mode}):\n{data.mixture.describe()}", flush=True)
    checkpointer = checkpoint_lib.Checkpointer(
        workdir, every=config.train.checkpoint_every, keep=config.train.keep_checkpoints,
        use_async=config.train.async_checkpoints,
    )
    if peft_base_pointer(config):
        config_json["peft_base"] = peft_base_pointer(config)
    progress = None
    writer = None
    with jax.set_mesh(mesh), nn.logical_axis_rules(rule_table):
        abstract_state, state_shardings, init_state = setup.abstract_state, setup.state_shardings, setup.init_state
        reference_kind = setup.reference_kind

        def start_params():
            return initial_params(config, model_config, abstract_state, state_shardings, init_state, mesh, rule_table)

        if reference_kind == "precomputed":  # before the data iterator exists: batches carry the result
            padded = batch_shapes(_padded(config), mesh)  # the reference pass scores padded pairs
            data_stats.transform.ref_logps = reference.precompute(
                jax.jit(lambda p, b: pair_scores(apply_fn, p, b)[0], out_shardings=replicated), start_params,
                data.train_source, data_stats.transform, workdir, batch_size=config.train.global_batch_size,
                put=lambda b: {k: jax.device_put(v, padded[k].sharding) for k, v in b.items()},
                fingerprint=_reference_fingerprint(config, model_config, len(data.train_source)),
            )
        if pairs:  # the keys train_step was built for
            keys = preference.batch_keys(data_stats.transform)
            if config.data.packing:
                keys = pair_packing.packed_keys(keys[len(pipeline.BATCH_KEYS):])
            if set(keys) != set(batch_keys):
                raise AssertionError(f"preference batches carry {keys}, expected {batch_keys}")
        data_iter = iter(dataset)

        saved_state = checkpoint_lib.abstract_with_shardings(abstract_state.replace(frozen=None),
                                                             state_shardings.replace(frozen=None))
        # Every process makes the orbax calls (they may synchronise processes) and must land on the
        # same step: a damaged latest step falls back to the one before (warned, moved aside).
        restored = checkpointer.restore_latest(saved_state, data_iter)
        distributed.agree(None if restored is None else restored[0], "resume step")
        if restored is not None:
            latest, state = restored
            saved = checkpointer.saved_config(latest)
            if jax.process_index() == 0:
                for warning in checkpoint_lib.resume_warnings(saved, config_json) if saved else []:
                    log.warning("%s", warning)
            if model_config.peft is not None:  # adapters-only checkpoint: re-create the base
                state = state.replace(frozen=_frozen_base(config, model_config, init_state, state_shardings,
                                                          mesh, rule_table))
            start_step = int(latest)
            print(f"jaxtune: resuming from step {start_step} in {workdir}", flush=True)
        else:
            if config.model.hf_dir:
                state = init_from_pretrained(config.model.hf_dir, model_config, tx, state_shardings,
                                             init_state, mesh, rule_table, seed=config.seed)
            elif config.model.init_from:
                state = state_from_params(start_params(), tx, state_shardings)
            else:
                state = init_state(jax.random.key(config.seed))
            start_step = 0
        # The frozen reference: never updated, no optimizer state, rebuilt from the init source on resume.
        ref_params = start_params() if reference_kind == "copy" else None
        param_bytes = sum(x.nbytes for x in jax.tree.leaves((state.params, state.frozen, ref_params)))
        if pairs:
            print(f"jaxtune: {config.objective.type} objective ({config.objective.loss_type}), reference: "
                  f"{_REFERENCE_NAMES[reference_kind]}", flush=True)

        if model_config.peft is not None:
            adapters = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_state.params))
            print(f"jaxtune: {config.peft.method} adapters {adapters / 1e6:.3f}M trainable params "
                  f"({adapters / num_params:.2%} of the base)", flush=True)
        flops_per_token = metrics_lib.train_flops_per_token(
            num_params, model_config.num_layers, model_config.hidden_size, seq_len
        )
        peak = metrics_lib.peak_flops_per_device(config.eval.peak_tflops)
        print(
            f"jaxtune: model {config.model.family}/{config.model.variant} {num_params / 1e6:.2f}M params, "
            f"mesh {mesh_shape} ({config.mesh.rules}), {len(devices)} {devices[0].platform} device(s)",
            flush=True,
        )

        train_step = setup.train_step
        group_names = nonfinite.group_names(abstract_state.params)
        skipped = 0

        held_out = (data.eval_records, data.eval_templates) if data.eval_records else ((), {})  # preference data: none
        eval_set = evaluate.build_eval_set(*held_out, config.eval, seed=config.seed)
        pair_sets = (datasets.preference_eval_sets(data, config.data, config.eval, seed=config.seed,
                                                   unpaired=config.objective.type == "kto") if pairs else [])
        pair_eval_scores = _pair_evaluator(config, model, pair_sets, reference_kind, start_params, ref_params)

        def run_eval(step: int, show: int = 0) -> dict[str, float]:
            # Separately jitted, bucketed eval functions: the train step's compile cache is untouched.
            if not eval_set and not pair_sets:
                return {}
            scores = evaluate.run(model, model_variables(state), tokenizer, eval_set, config.eval, seq_len=seq_len,
                                  seed=config.seed, show=show, printer=_print_fn(progress),
                                  logits_chunk=config.train.logits_chunk) if eval_set else {}
            scores.update(pair_eval_scores(state))
            writer.write(step, {f"eval/{k}": v for k, v in scores.items()})
            if jax.process_index() == 0:
                evaluate.write_results(workdir / "eval" / f"step_{step}.json", scores, step=step)
            return scores

        writer = metrics_lib.MetricsWriter(workdir, resume_step=start_step, on_write=on_metrics)
        eval_before = None
        if start_step == 0 and (eval_set or pair_sets):
            eval_before = run_eval(0)
            name, value = _headline(eval_before)
            print(f"jaxtune: held-out {name} before training: {value}", flush=True)

        progress = metrics_lib.Progress(config.train.steps, start_step, enabled=config.train.progress_bar)
        stopped_early = False
        last_row: dict[str, float] = {}
        window_tokens, window_start = 0, None
        train_time = 0.0
        step = start_step
        with _StopSignal() as stop:
            for step in range(start_step, config.train.steps):
                local = next(data_iter)
                batch = {k: jax.make_array_from_process_local_data(batch_sharding[k], np.asarray(local[k])) for k in batch_keys}
                t0 = time.time()
                state, step_metrics = train_step(state, batch, ref_params)
                done = step + 1
                if step_metrics[nonfinite.FLAG] > 0:  # one scalar read per step
                    report = nonfinite.describe(done, jax.device_get(step_metrics), group_names)
                    if config.train.nonfinite == "halt":
                        checkpointer.wait()  # the last good checkpoint is complete
                        path = nonfinite.save_diagnostics(workdir, done, state, local, report)
                        raise nonfinite.NonFiniteError(
                            f"non-finite loss or gradients at {report}. The update was not applied; the state "
                            f"before it and the batch are in {path}. Set train.nonfinite='skip' to skip such steps, "
                            "or lower optim.lr")
                    skipped += 1
                    progress.write(f"jaxtune: {report}; update skipped (train.nonfinite='skip', {skipped} so far)")
                if window_start is None:  # the first step includes compilation: keep it out of tokens/s
                    jax.block_until_ready(step_metrics)
                    log.info("first step (with compile) took %.1fs", time.time() - t0)
                    train_time += time.time() - t0
                    window_start = time.time()
                else:
                    window_tokens += int(np.count_nonzero(local["segment_ids"])) * process_count
                if done % config.train.log_every == 0 or done == config.train.steps:
                    row = {k: float(v) for k, v in jax.device_get(step_metrics).items() if k not in (nonfinite.GROUPS_KEY, nonfinite.FLAG)}
                    if skipped:
                        row["skipped_steps"] = skipped
                    now = time.time()
                    if window_tokens:
                        row["tokens_per_s"] = window_tokens / (now - window_start)
                        if peak:
                            row["mfu"] = row["tokens_per_s"] * flops_per_token / (peak * len(devices))
                    train_time += now - window_start
                    last_row = writer.write(done, row)
                    progress.update(done, row)
                    window_tokens, window_start = 0, now
                if config.train.eval_every and done % config.train.eval_every == 0 and done != config.train.steps:
                    scores = run_eval(done)
                    if scores:
                        progress.write("step {}: held-out {} {}".format(done, *_headline(scores)))
                    window_tokens, window_start = 0, time.time()  # keep eval time out of tokens/s
                checkpointer.save(done, state, data_iter, config_json)
                out_of_time = config.train.max_seconds and time.time() - wall_start > config.train.max_seconds
                if stop.requested or out_of_time:
                    stopped_early = stop.requested
                    checkpointer.save(done, state, data_iter, config_json, force=True)
                    reason = "signal" if stop.requested else f"train.max_seconds={config.train.max_seconds:g} reached"
                    progress.write(f"jaxtune: stopping at step {done} ({reason}); checkpoint saved, rerun to resume")
                    break
            else:
                done = config.train.steps
                if start_step < config.train.steps:
                    checkpointer.save(done, state, data_iter, config_json, force=True)
        progress.close()

        eval_after = None
        if (eval_set or pair_sets) and not stopped_early and start_step < done:
            eval_after = run_eval(done, show=config.eval.show_examples)
            name, value = _headline(eval_after)
            if eval_before is not None:
                print(f"jaxtune: held-out {name} {_headline(eval_before)[1]} before -> {value} after training", flush=True)
            else:
                print(f"jaxtune: held-out {name} after training: {value}", flush=True)
    counts = data_stats.pipeline if pairs else data_stats
    dropped = sum(s.dropped for s in counts.tasks.values())
    if pairs and dropped:
        seen = dropped + sum(s.examples for s in counts.tasks.values())
        print(f"jaxtune: data: {dropped} of {seen} preference pairs dropped (could not fit "
              "data.seq_len with a preference left, or data.truncation='drop')", flush=True)
    if jax.process_index() == 0 and counts.slots:
        print("jaxtune: data (this process):\n  " + "\n  ".join(counts.report()), flush=True)
    checkpointer.close()
    writer.close()
    summary = RunSummary(
        steps=done, wall_s=time.time() - wall_start, train_s=train_time,
        tokens_per_s=last_row.get("tokens_per_s", 0.0), stopped_early=stopped_early, metrics=last_row,
        eval_before=eval_before, eval_after=eval_after, param_bytes=param_bytes,
    )
    if jax.process_index() == 0:
        print(f"jaxtune: done: {done} steps in {summary.wall_s:.0f}s; outputs in {workdir}", flush=True)
    return summary


def _frozen_base(config, model_config, init_state, state_shardings, mesh, rule_table):
    """A LoRA run's base on resume: reloaded from model.hf_dir or re-initialised from the seed."""
    if config.model.hf_dir:
        return load_base(config.model.hf_dir, model_config, state_shardings, mesh, rule_table)
    return jax.jit(lambda rng: init_state(rng).frozen, out_shardings=state_shardings.frozen)(jax.random.key(config.seed))


def frozen_base_on_host(config: ml_collections.ConfigDict, model_config):
    """A LoRA run's frozen base as its training saw it (quantised when QLoRA), outside a training
    mesh: from model.hf_dir, or the seed's init (export)."""
    if config.model.hf_dir:
        _, base = models.from_pretrained(config.model.hf_dir, dtype=model_config.param_dtype)
    else:
        plain = base_model(models.build(model_config))
        init = jax.jit(lambda rng: sharding.unbox(plain.init(rng, jnp.zeros((1, 1), jnp.int32))["params"]))
        base = init(jax.random.key(config.seed))
    return jax.jit(functools.partial(prepare_base, spec=model_config.peft))(base)


_REFERENCE_NAMES = {
    "none": "none (reference-free loss)", "copy": "frozen copy of the initial weights",
    "base": "the base model without its adapters (no extra weights)", "precomputed": f"precomputed ({reference.STORE_DIR}/)",
}


def _preference_dataset(config, data: datasets.PreferenceData, local_batch: int):
    """Pair batches (padded [B, 2, T], or packed rows with data.packing) and their PairStats."""
    return datasets.preference_train_dataset(
        data, config.data, batch_size=local_batch, seed=config.seed, unpaired=config.objective.type == "kto",
        process_index=jax.process_index(), process_count=jax.process_count(),
        precomputed_reference=config_lib.resolved_reference(config) == "precomputed")


def pair_losses_fn(objective) -> Callable:
    """pair_losses(logps [N, 2], lengths [N, 2], ref [N, 2], per-pair batch) -> (losses [N], metrics) for
    config.objective (held-out pair evaluation)."""

    def pair_losses(logps, lengths, ref, batch):
        if objective.type == "kto":
            return kto_loss(logps[:, 0], ref[:, 0], batch[preference.LABEL_KEY], logps[:, 1], ref[:, 1],
                            beta=objective.beta, desirable_weight=objective.desirable_weight,
                            undesirable_weight=objective.undesirable_weight)
        return preference_loss(
            objective.loss_type, logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], chosen_lengths=lengths[:, 0],
            rejected_lengths=lengths[:, 1], beta=objective.beta, label_smoothing=objective.label_smoothing,
            gamma=objective.gamma, desirable_weight=objective.desirable_weight,
            undesirable_weight=objective.undesirable_weight, sft_weight=objective.sft_weight)

    return pair_losses


def _pair_evaluator(config, model, pair_sets, reference_kind: str, start_params, ref_params) -> Callable:
    """state -> held-out pair metrics (objectives/pair_eval.py). The reference's log-probs are computed
    once, from the run's start weights (copy, precomputed; a PEFT base: its frozen weights)."""
    if not pair_sets:
        return lambda state: {}
    kw = dict(batch_size=config.eval.batch_size, logits_chunk=config.train.logits_chunk)
    reference: dict[int, np.ndarray] = {}

    def reference_logps(state, s):
        if id(s) not in reference:
            if reference_kind == "none":
                reference[id(s)] = np.zeros((len(s.arrays["inputs"]), 2), np.float32)
            else:
                weights = state.frozen if reference_kind == "base" else (ref_params if ref_params is not None
                                                                         else start_params())
                reference[id(s)] = evaluate.pair_sequence_scores(model, {"params": weights}, s.arrays, **kw)[0]
        return reference[id(s)]

    def scores(state):
        from jaxtune.objectives import pair_eval

        return pair_eval.evaluate_pair_sets(
            pair_sets, lambda arrays: evaluate.pair_sequence_scores(model, model_variables(state), arrays, **kw),
            lambda s: reference_logps(state, s), pair_losses_fn(config.objective))

    return scores


def _padded(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with data.packing off (the layout of the precomputed reference pass)."""
    padded = ml_collections.ConfigDict(config.to_dict())
    padded.data.packing = False
    return padded


def _reference_fingerprint(config, model_config, num_records: int) -> dict:
    """What precomputed reference log-probs depend on; a stored table made for other values is refused."""
    return {
        "records": num_records, "train_path": config.data.train_path,
        "templates": config_lib.to_json_dict(config.data)["templates"], "chat_template": config.data.chat_template,
        "seq_len": config.data.seq_len,
        "truncation": config.data.truncation, "seed": config.seed, "tokenizer": config.data.tokenizer,
        "model": repr(model_config), "hf_dir": config.model.hf_dir, "init_from": config.model.init_from,
        "objective": config.objective.type,
        **({"tasks": config_lib.to_json_dict(config.data)["tasks"]} if config.data.tasks else {}),
    }


def _print_fn(progress):
    return progress.write if progress is not None else (lambda text: print(text, flush=True))


def _headline(scores: dict[str, float]) -> tuple[str, str]:
    """The eval number a person looks at first: exact match, else MC accuracy, else loss."""
    if "exact_match" in scores:
        return "exact match", f"{scores['exact_match']:.1%}"
    if "mc/accuracy" in scores:
        return "multiple-choice accuracy", f"{scores['mc/accuracy']:.1%}"
    if "rewards/accuracies" in scores:  # held-out preference pairs (data.eval_path)
        return "reward accuracy", f"{scores['rewards/accuracies']:.1%}"
    named = sorted(k for k in scores if k.count("/") == 1 and k.endswith(("/exact_match", "/accuracy")))
    if named:  # eval.tasks only: the first task's
        return named[0], f"{scores[named[0]]:.1%}"
    return "loss", f"{scores.get('loss', float('nan')):.3f}"
