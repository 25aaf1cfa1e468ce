"""The training loop: one loop for every objective, and the only module that wires the others.

Order of a run: validate config -> data (tokenizer, records) -> model -> mesh + sharded init or
exact resume -> jitted train step (sharded in/out, donated state) -> log / eval / checkpoint.
"""

from __future__ import annotations

import dataclasses
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
from jaxtune import evaluate, metrics as metrics_lib, models, optim, sharding
from jaxtune.data import datasets, pipeline
from jaxtune.errors import UserError
from jaxtune.objectives import sft_loss

log = logging.getLogger(__name__)

_MODEL_OVERRIDE_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
    "head_dim", "max_position_embeddings", "rope_theta", "tie_word_embeddings",
)


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def model_config_from(config: ml_collections.ConfigDict, vocab_size: int | None = None):
    """The model config: named variant + non-None overrides; a from-scratch vocab comes from the tokenizer."""
    m = config.model
    if m.hf_dir:
        return models.config_from_pretrained(m.hf_dir, dtype=m.dtype, param_dtype=m.param_dtype, remat_policy=m.remat_policy)
    overrides = {k: m[k] for k in _MODEL_OVERRIDE_KEYS if m[k] is not None}
    if "vocab_size" not in overrides and vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    overrides.update(dtype=m.dtype, param_dtype=m.param_dtype, remat_policy=m.remat_policy)
    return models.get_config(m.family, m.variant, **overrides)


def plan_state(model: nn.Module, tx: optax.GradientTransformation, mesh, rule_table, *, seq_len: int):
    """Shapes and shardings of the train state, and a jitted init that creates it already sharded.

    eval_shape gives the boxed (logically annotated) structure without allocating; the rules turn
    it into shardings; jit(init, out_shardings) then materialises every array directly in its
    shards, so no device ever holds a full replica it doesn't need. Call inside the mesh and
    logical-rules context.
    """

    def init_boxed(rng):
        params = model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    abstract_boxed = jax.eval_shape(init_boxed, jax.random.key(0))
    shardings = sharding.logical_shardings(abstract_boxed, mesh, rule_table)
    init = jax.jit(lambda rng: sharding.unbox(init_boxed(rng)), out_shardings=shardings)
    return sharding.unbox(abstract_boxed), shardings, init


def init_from_pretrained(hf_dir: str, model_config, tx: optax.GradientTransformation, state_shardings) -> TrainState:
    """A step-0 train state whose params are read from an HF checkpoint straight into their shards."""
    params = models.load_params(hf_dir, model_config, state_shardings.params)
    opt_state = jax.jit(tx.init, out_shardings=state_shardings.opt_state)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), state_shardings.step)
    return TrainState(step=step, params=params, opt_state=opt_state)


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


def make_train_step(
    apply_fn: Callable, tx: optax.GradientTransformation, lr_schedule: optax.Schedule, *, accum: int,
    z_loss: float, microbatch_sharding: NamedSharding | None = None,
) -> Callable:
    """train_step(state, batch) -> (state, metrics); one optimizer step per call."""

    def loss_fn(params, batch, normalizer):
        logits = apply_fn(params, batch["inputs"], batch["positions"], batch["segment_ids"])
        return sft_loss(logits, batch, normalizer=normalizer, z_loss=z_loss)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        # Normalise by the trained tokens of the whole global batch, so accumulation is exact.
        normalizer = jnp.sum(batch["loss_mask"].astype(jnp.float32))
        if accum == 1:
            (_, metrics), grads = grad_fn(state.params, batch, normalizer)
        else:
            micro = jax.tree.map(lambda x: split_microbatches(x, accum), batch)
            if microbatch_sharding is not None:
                micro = jax.lax.with_sharding_constraint(micro, microbatch_sharding)
            first = jax.tree.map(lambda x: x[0], micro)
            shapes = jax.eval_shape(grad_fn, state.params, first, normalizer)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (shapes[1], shapes[0][1]))

            def body(carry, mb):
                (_, m), g = grad_fn(state.params, mb, normalizer)
                return jax.tree.map(jnp.add, carry, (g, m)), None

            (grads, metrics), _ = jax.lax.scan(body, zeros, micro)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, grad_norm=grad_norm, lr=lr_schedule(state.step))
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

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


def train(config: ml_collections.ConfigDict, workdir: str | Path, *, devices: Sequence[jax.Device] | None = None) -> RunSummary:
    """Runs (or resumes) the SFT job described by `config` in `workdir`, on `devices` (default: all)."""
    wall_start = time.time()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    process_count = jax.process_count()
    devices = list(devices) if devices is not None else jax.devices()
    mesh_shape = config_lib.resolve_mesh_shape(config, len(devices))
    config_lib.validate_for_devices(config, mesh_shape, process_count)

    data = datasets.load_sft_data(data_config(config), workdir, seed=config.seed)
    tokenizer = data.tokenizer
    model_config = model_config_from(config, vocab_size=tokenizer.vocab_size)
    if config.model.hf_dir and tokenizer.vocab_size > model_config.vocab_size:
        raise UserError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {model_config.vocab_size}"
        )
    config_lib.validate_for_model(config, model_config.max_position_embeddings)
    model = models.build(model_config)

    mesh = sharding.build_mesh(mesh_shape, devices)
    rule_table = sharding.rules(config.mesh.rules)
    tx, lr_schedule = optim.build(config.optim, config.train.steps)
    seq_len = config.data.seq_len
    batch_sharding = sharding.batch_sharding(mesh)
    replicated = sharding.replicated(mesh)

    def apply_fn(params, tokens, positions, segment_ids):
        return model.apply({"params": params}, tokens, positions=positions, segment_ids=segment_ids)

    local_batch = config.train.global_batch_size // process_count
    dataset, tokenize_stats = pipeline.train_dataset(
        data.train_source, data.train_templates, tokenizer,
        seq_len=seq_len, batch_size=local_batch, seed=config.seed, packing=config.data.packing,
        shuffle=config.data.shuffle, truncation=config.data.truncation, word_dropout=config.data.word_dropout,
        process_index=jax.process_index(), process_count=process_count, worker_count=config.data.worker_count,
        read_threads=config.data.read_threads, prefetch=config.data.prefetch,
    )
    data_iter = iter(dataset)
    checkpointer = checkpoint_lib.Checkpointer(
        workdir, every=config.train.checkpoint_every, keep=config.train.keep_checkpoints,
        use_async=config.train.async_checkpoints,
    )
    config_json = config_lib.to_json_dict(config)
    progress = None
    writer = None
    with jax.set_mesh(mesh), nn.logical_axis_rules(rule_table):
        abstract_state, state_shardings, init_state = plan_state(model, tx, mesh, rule_table, seq_len=seq_len)

        latest = checkpointer.latest_step()
        if latest is not None:
            saved = checkpointer.saved_config(latest)
            changed = checkpoint_lib.config_differences(saved, config_json) if saved else []
            if changed:
                log.warning("resuming with a config that differs from the checkpoint's: %s", "; ".join(changed))
            state = checkpointer.restore(
                latest, checkpoint_lib.abstract_with_shardings(abstract_state, state_shardings), data_iter
            )
            start_step = int(latest)
            print(f"jaxtune: resuming from step {start_step} in {workdir}", flush=True)
        else:
            if config.model.hf_dir:
                state = init_from_pretrained(config.model.hf_dir, model_config, tx, state_shardings)
            else:
                state = init_state(jax.random.key(config.seed))
            start_step = 0

        num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_state.params))
        flops_per_token = metrics_lib.train_flops_per_token(
            num_params, model_config.num_layers, model_config.hidden_size, seq_len
        )
        peak = metrics_lib.peak_flops_per_device(config.eval.peak_tflops)
        print(
            f"jaxtune: model {config.model.family}/{config.model.variant} {num_params / 1e6:.2f}M params, "
            f"mesh {mesh_shape} ({config.mesh.rules}), {len(devices)} {devices[0].platform} device(s)",
            flush=True,
        )

        accum = config.train.grad_accum_steps
        micro_sharding = NamedSharding(mesh, PartitionSpec(None, sharding.BATCH_AXES))
        step_fn = make_train_step(apply_fn, tx, lr_schedule, accum=accum, z_loss=config.train.z_loss,
                                  microbatch_sharding=micro_sharding)
        train_step = jax.jit(
            step_fn, in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, replicated),
            donate_argnums=(0,),
        )

        eval_set = evaluate.build_eval_set(data.eval_records, data.eval_templates, config.eval, seed=config.seed)

        def run_eval(step: int, show: int = 0) -> dict[str, float]:
            # Separately jitted, bucketed eval functions: the train step's compile cache is untouched.
            if not eval_set:
                return {}
            scores = evaluate.run(model, state.params, tokenizer, eval_set, config.eval, seq_len=seq_len,
                                  seed=config.seed, show=show, printer=_print_fn(progress))
            writer.write(step, {f"eval/{k}": v for k, v in scores.items()})
            if jax.process_index() == 0:
                evaluate.write_results(workdir / "eval" / f"step_{step}.json", scores, step=step)
            return scores

        writer = metrics_lib.MetricsWriter(workdir, resume_step=start_step)
        eval_before = None
        if start_step == 0 and eval_set:
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
                batch = {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(local[k])) for k in pipeline.BATCH_KEYS}
                t0 = time.time()
                state, step_metrics = train_step(state, batch)
                done = step + 1
                if window_start is None:  # the first step includes compilation: keep it out of tokens/s
                    jax.block_until_ready(step_metrics)
                    log.info("first step (with compile) took %.1fs", time.time() - t0)
                    train_time += time.time() - t0
                    window_start = time.time()
                else:
                    window_tokens += int(np.count_nonzero(local["segment_ids"])) * process_count
                if done % config.train.log_every == 0 or done == config.train.steps:
                    row = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
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
        if eval_set and not stopped_early and start_step < done:
            eval_after = run_eval(done, show=config.eval.show_examples)
            name, value = _headline(eval_after)
            if eval_before is not None:
                print(f"jaxtune: held-out {name} {_headline(eval_before)[1]} before -> {value} after training", flush=True)
            else:
                print(f"jaxtune: held-out {name} after training: {value}", flush=True)
    stats = tokenize_stats.stats
    if stats.truncated or stats.dropped:
        print(f"jaxtune: data: {stats.examples} examples, {stats.truncated} truncated, {stats.dropped} dropped", flush=True)
    checkpointer.close()
    writer.close()
    summary = RunSummary(
        steps=done, wall_s=time.time() - wall_start, train_s=train_time,
        tokens_per_s=last_row.get("tokens_per_s", 0.0), stopped_early=stopped_early, metrics=last_row,
        eval_before=eval_before, eval_after=eval_after,
    )
    if jax.process_index() == 0:
        print(f"jaxtune: done: {done} steps in {summary.wall_s:.0f}s; outputs in {workdir}", flush=True)
    return summary


def _print_fn(progress):
    return progress.write if progress is not None else (lambda text: print(text, flush=True))


def _headline(scores: dict[str, float]) -> tuple[str, str]:
    """The eval number a person looks at first: exact match, else MC accuracy, else loss."""
    if "exact_match" in scores:
        return "exact match", f"{scores['exact_match']:.1%}"
    if "mc/accuracy" in scores:
        return "multiple-choice accuracy", f"{scores['mc/accuracy']:.1%}"
    return "loss", f"{scores.get('loss', float('nan')):.3f}"
