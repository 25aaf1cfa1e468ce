"""The training loop: one loop for every objective, with hooks for logging, evaluation,
checkpoints and stopping.

Order of a run: objective + data (tokenizer, records) -> setup (mesh, model, jitted step) ->
objective.start (e.g. a precomputed reference) -> state (state.build_state: resume > HF dir >
init_from > seed) -> per step: objective.next_batch -> train_step -> hooks (log, eval,
checkpoint, stop) -> final checkpoint and evaluation. Nothing here names an objective.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxtune import checkpoint as checkpoint_lib
from jaxtune import config as config_lib
from jaxtune import distributed, evaluate, hf_check, loading, metrics as metrics_lib, nonfinite, objectives, paths
from jaxtune import workdir as workdir_lib
from jaxtune.errors import UserError
from jaxtune.trainer import setup as setup_lib
from jaxtune.trainer import state as state_lib

log = logging.getLogger(__name__)


class StopSignal:
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
class Loop:
    """The running job as the hooks see it (the state changes every step)."""

    config: ml_collections.ConfigDict
    workdir: Path
    setup: setup_lib.TrainSetup
    state: Any
    start_step: int
    progress: Any = None
    wall_start: float = 0.0
    step_started: float = 0.0  # time.time() when the current step was dispatched

    def print(self, text: str) -> None:
        if self.progress is not None:
            self.progress.write(text)
        else:
            print(text, flush=True)


class Hook:
    """Runs after every step (log, eval, checkpoint: in that order); `after_step` may return why
    the run stops now ("signal" or "budget"). `end` runs once after the loop with that reason (None:
    every step ran), checkpoint first and evaluation last."""

    def after_step(self, loop: Loop, done: int, metrics: dict, batch: dict) -> str | None:
        return None

    def end(self, loop: Loop, done: int, stopped: str | None) -> None:
        pass


class LogHook(Hook):
    """Every train.log_every steps: metrics (+ tokens/s and MFU, compile and eval time excluded)
    to metrics.jsonl / TensorBoard / the progress bar."""

    def __init__(self, config, writer, flops_per_token: float, peak: float | None, num_devices: int):
        self.config, self.writer = config, writer
        self.flops_per_token, self.peak, self.num_devices = flops_per_token, peak, num_devices
        self.window_tokens, self.window_start = 0, None
        self.train_time = 0.0
        self.last_row: dict[str, float] = {}
        self.skipped = 0

    def restart_window(self) -> None:
        self.window_tokens, self.window_start = 0, time.time()

    def after_step(self, loop, done, metrics, batch):
        if self.window_start is None:  # the first step includes compilation: keep it out of tokens/s
            jax.block_until_ready(metrics)
            log.info("first step (with compile) took %.1fs", time.time() - loop.step_started)
            self.train_time += time.time() - loop.step_started
            self.window_start = time.time()
        else:
            self.window_tokens += batch_tokens(batch)
        if done % self.config.train.log_every and done != self.config.train.steps:
            return None
        row = {k: float(v) for k, v in jax.device_get(metrics).items() if k not in (nonfinite.GROUPS_KEY, nonfinite.FLAG)}
        if self.skipped:
            row["skipped_steps"] = self.skipped
        now = time.time()
        if self.window_tokens:
            row["tokens_per_s"] = self.window_tokens / (now - self.window_start)
            if self.peak:
                row["mfu"] = row["tokens_per_s"] * self.flops_per_token / (self.peak * self.num_devices)
        self.train_time += now - self.window_start
        self.last_row = self.writer.write(done, row)
        loop.progress.update(done, row)
        self.window_tokens, self.window_start = 0, now
        return None

    def end(self, loop, done, stopped):
        loop.progress.close()


class EvalHook(Hook):
    """Held-out evaluation (the objective's) before training, every train.eval_every steps and after."""

    def __init__(self, config, objective, eval_set, tokenizer, writer, workdir, log_hook: LogHook):
        self.config, self.objective, self.eval_set, self.tokenizer = config, objective, eval_set, tokenizer
        self.writer, self.workdir, self.log_hook = writer, workdir, log_hook
        self.before = self.after = None

    def run(self, loop: Loop, step: int, show: int = 0) -> dict[str, float]:
        # Separately jitted, bucketed eval functions: the train step's compile cache is untouched.
        if not self.eval_set:
            return {}
        scores = self.objective.evaluate(loop.setup.model, state_lib.model_variables(loop.state), self.tokenizer,
                                         self.eval_set, show=show, printer=loop.print)
        self.writer.write(step, {f"eval/{k}": v for k, v in scores.items()})
        if jax.process_index() == 0:
            evaluate.write_results(self.workdir / workdir_lib.EVAL / f"step_{step}.json", scores, step=step)
        return scores

    def begin(self, loop: Loop) -> None:
        if loop.start_step == 0 and self.eval_set:
            self.before = self.run(loop, 0)
            name, value = headline(self.before)
            print(f"jaxtune: held-out {name} before training: {value}", flush=True)

    def after_step(self, loop, done, metrics, batch):
        every = self.config.train.eval_every
        if every and done % every == 0 and done != self.config.train.steps:
            scores = self.run(loop, done)
            if scores:
                loop.print("step {}: held-out {} {}".format(done, *headline(scores)))
            self.log_hook.restart_window()  # keep eval time out of tokens/s
        return None

    def end(self, loop, done, stopped):
        if not self.eval_set or stopped == "signal" or loop.start_step >= done:
            return
        self.after = self.run(loop, done, show=self.config.eval.show_examples)
        name, value = headline(self.after)
        if self.before is not None:
            print(f"jaxtune: held-out {name} {headline(self.before)[1]} before -> {value} after training", flush=True)
        else:
            print(f"jaxtune: held-out {name} after training: {value}", flush=True)


class CheckpointHook(Hook):
    """A checkpoint every train.checkpoint_every steps (the Checkpointer decides), then the stopping
    rules: a signal or train.max_seconds saves now and ends the run; the last step always saves."""

    def __init__(self, config, checkpointer, data_iter, config_json, stop: StopSignal, objective):
        self.config, self.checkpointer, self.data_iter, self.config_json = config, checkpointer, data_iter, config_json
        self.stop, self.objective = stop, objective

    def _save(self, loop, done, *, force=False):
        self.checkpointer.save(done, loop.state, self.data_iter, self.config_json, force=force,
                               objective_state=self.objective.checkpoint_state())

    def after_step(self, loop, done, metrics, batch):
        self._save(loop, done)
        budget = self.config.train.max_seconds
        out_of_time = budget and time.time() - loop.wall_start > budget
        if not (self.stop.requested or out_of_time):
            return None
        self._save(loop, done, force=True)
        reason = "signal" if self.stop.requested else f"train.max_seconds={budget:g} reached"
        loop.print(f"jaxtune: stopping at step {done} ({reason}); checkpoint saved, rerun to resume")
        return "signal" if self.stop.requested else "budget"

    def end(self, loop, done, stopped):
        if not stopped and loop.start_step < self.config.train.steps:
            self._save(loop, done, force=True)


def global_batch(batch: dict, shardings: dict) -> dict[str, jax.Array]:
    """The step's global batch from `next_batch`'s: process-local host arrays (each process its rows)
    are assembled across processes; jax.Arrays (e.g. rollouts sampled on the devices) are global
    already and only placed in the step's shardings."""
    return {k: jax.device_put(batch[k], s) if isinstance(batch[k], jax.Array)
            else jax.make_array_from_process_local_data(s, np.asarray(batch[k])) for k, s in shardings.items()}


def batch_tokens(batch: dict) -> int:
    """Non-padding tokens of the global batch (tokens/s): a host batch holds this process's share."""
    segments = batch["segment_ids"]
    if isinstance(segments, jax.Array):
        return int(jnp.count_nonzero(segments))
    return int(np.count_nonzero(segments)) * jax.process_count()


def _check_vocab(config, tokenizer, model_config) -> None:
    if tokenizer.vocab_size > model_config.vocab_size:
        raise UserError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {model_config.vocab_size} "
            f"({'config.json of model.hf_dir' if config.model.hf_dir else 'model.vocab_size'}); "
            "use a tokenizer that fits the embedding or a larger vocab_size"
        )


def train(config: ml_collections.ConfigDict, workdir: str | Path, *, devices: Sequence[jax.Device] | None = None,
          on_metrics: Callable[[dict], None] | None = None) -> RunSummary:
    """Runs (or resumes) the job described by `config` in `workdir`, on `devices` (default: all).

    `on_metrics(row)` is called with every row written to metrics.jsonl (train and eval rows)."""
    wall_start = time.time()
    workdir = paths.path(workdir)  # local or gs://...
    workdir.mkdir(parents=True, exist_ok=True)
    # Hub ids: downloaded before any device is used, at the commits a resumed run recorded.
    loading.pin_hub_ids(config, workdir)
    if config.model.hf_dir:  # a damaged download fails here, naming the file, before anything is written
        hf_check.validate_hf_dir(loading.hf_dir(config), tokenizer=not config.data.tokenizer)
    process_count = jax.process_count()
    devices = list(devices) if devices is not None else jax.devices()
    config_json = config_lib.to_json_dict(config)
    distributed.agree(config_json, "config")  # every process runs the same command

    objective = objectives.build(config)
    data = objective.load_data(workdir)
    tokenizer = data.tokenizer
    setup = setup_lib.build_setup(config, devices, vocab_size=tokenizer.vocab_size, process_count=process_count,
                                  objective=objective)  # the one instance: what load_data kept stays with it
    model_config, num_params, mesh = setup.model_config, setup.num_params, setup.mesh
    _check_vocab(config, tokenizer, model_config)
    batch_sharding = setup.batch_sharding

    dataset, data_stats = objective.train_dataset(data, batch_size=config.train.global_batch_size // process_count,
                                                  process_index=jax.process_index(), process_count=process_count)
    checkpointer = checkpoint_lib.Checkpointer(
        workdir, every=config.train.checkpoint_every, keep=config.train.keep_checkpoints,
        use_async=config.train.async_checkpoints,
    )
    if loading.peft_base_pointer(config):
        config_json["peft_base"] = loading.peft_base_pointer(config)
    writer = None
    with jax.set_mesh(mesh), nn.logical_axis_rules(setup.rule_table):

        def put(local):
            return global_batch(local, batch_sharding)

        def device_put(batch):
            return {k: jax.device_put(v, batch_sharding[k]) for k, v in batch.items()}

        objective.start(objectives.RunContext(
            config=config, workdir=workdir, setup=setup, data=data, data_stats=data_stats,
            start_params=lambda: loading.start_weights(config, setup), put=put, device_put=device_put,
            model_variables=state_lib.model_variables))
        data_iter = iter(dataset)
        start = state_lib.build_state(config, setup, checkpointer=checkpointer, data_iter=data_iter)
        if start.step:
            if jax.process_index() == 0 and start.saved_config:
                for warning in checkpoint_lib.resume_warnings(start.saved_config, config_json):
                    log.warning("%s", warning)
            saved_objective = checkpointer.objective_state(start.step)
            if saved_objective is not None:
                objective.restore_checkpoint_state(saved_objective)
            print(f"jaxtune: resuming from step {start.step} in {workdir}", flush=True)
        # The frozen reference: never updated, no optimizer state, rebuilt from the start weights on resume.
        ref_params = loading.start_weights(config, setup) if setup.reference_kind == "copy" else None
        state = start.state
        param_bytes = sum(x.nbytes for x in jax.tree.leaves((state.params, state.frozen, ref_params)))
        if objective.describe():
            print(f"jaxtune: {objective.describe()}", flush=True)
        if config.peft.method != "none":
            adapters = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(setup.abstract_state.params))
            print(f"jaxtune: {config.peft.method} adapters {adapters / 1e6:.3f}M trainable params "
                  f"({adapters / num_params:.2%} of the base)", flush=True)
        seq = config.data.seq_len
        if hasattr(model_config, "train_flops"):  # an encoder-decoder: per encoder token of a full row pair
            flops_per_token = model_config.train_flops(seq, seq, seq, seq) / seq
        else:
            flops_per_token = metrics_lib.train_flops_per_token(num_params, model_config.num_layers,
                                                                model_config.hidden_size, seq)
        print(
            f"jaxtune: model {config.model.family}/{config.model.variant} {num_params / 1e6:.2f}M params, "
            f"mesh {setup.mesh_shape} ({config.mesh.rules}), {len(devices)} {devices[0].platform} device(s)",
            flush=True,
        )
        loop = Loop(config, workdir, setup, state, start.step, wall_start=wall_start)
        writer = metrics_lib.MetricsWriter(workdir, resume_step=start.step, on_write=on_metrics)
        logger = LogHook(config, writer, flops_per_token, metrics_lib.peak_flops_per_device(config.eval.peak_tflops),
                         len(devices))
        evaluator = EvalHook(config, objective, objective.eval_set(data), tokenizer, writer, workdir, logger)
        evaluator.begin(loop)
        loop.progress = metrics_lib.Progress(config.train.steps, start.step, enabled=config.train.progress_bar)
        with StopSignal() as stop:
            saver = CheckpointHook(config, checkpointer, data_iter, config_json, stop, objective)
            done, stopped = _run_steps(loop, objective, data_iter, put, ref_params, logger,
                                       (logger, evaluator, saver), checkpointer)
            for hook in (saver, logger, evaluator):  # the final checkpoint first, the final evaluation last
                hook.end(loop, done, stopped)
    for line in objective.data_report(data_stats):
        print(f"jaxtune: {line}", flush=True)
    checkpointer.close()
    writer.close()
    summary = RunSummary(
        steps=done, wall_s=time.time() - wall_start, train_s=logger.train_time,
        tokens_per_s=logger.last_row.get("tokens_per_s", 0.0), stopped_early=stopped == "signal",
        metrics=logger.last_row, eval_before=evaluator.before, eval_after=evaluator.after, param_bytes=param_bytes,
    )
    if jax.process_index() == 0:
        print(f"jaxtune: done: {done} steps in {summary.wall_s:.0f}s; outputs in {workdir}", flush=True)
    return summary


def _run_steps(loop: Loop, objective, data_iter, put, ref_params, logger: LogHook, hooks, checkpointer):
    """Steps start_step..train.steps; returns (last step done, the stop reason or None)."""
    config, setup = loop.config, loop.setup
    group_names = nonfinite.group_names(setup.abstract_state.params)
    batch_key = jax.random.fold_in(jax.random.key(config.seed), 0xBA7C)
    for step in range(loop.start_step, config.train.steps):
        local = objective.next_batch(loop.state, data_iter, jax.random.fold_in(batch_key, step))
        batch = put(local)
        loop.step_started = time.time()
        loop.state, step_metrics = setup.train_step(loop.state, batch, ref_params)
        done = step + 1
        if step_metrics[nonfinite.FLAG] > 0:  # one scalar read per step
            _nonfinite(loop, done, step_metrics, local, group_names, logger, checkpointer)
        reasons = [hook.after_step(loop, done, step_metrics, local) for hook in hooks]
        stop = next((r for r in reasons if r), None)
        if stop:
            return done, stop
    return config.train.steps, None


def _nonfinite(loop, done, step_metrics, local, group_names, logger, checkpointer) -> None:
    """A step whose loss or gradients were not finite (its update was not applied): halt or skip."""
    report = nonfinite.describe(done, jax.device_get(step_metrics), group_names)
    if loop.config.train.nonfinite == "halt":
        checkpointer.wait()  # the last good checkpoint is complete
        path = nonfinite.save_diagnostics(loop.workdir, done, loop.state, local, report)
        raise nonfinite.NonFiniteError(
            f"non-finite loss or gradients at {report}. The update was not applied; the state "
            f"before it and the batch are in {path}. Set train.nonfinite='skip' to skip such steps, "
            "or lower optim.lr")
    logger.skipped += 1
    loop.print(f"jaxtune: {report}; update skipped (train.nonfinite='skip', {logger.skipped} so far)")


def headline(scores: dict[str, float]) -> tuple[str, str]:
    """The eval number a person looks at first: exact match, else MC accuracy, else loss."""
    if "exact_match" in scores:
        return "exact match", f"{scores['exact_match']:.1%}"
    if "mc/accuracy" in scores:
        return "multiple-choice accuracy", f"{scores['mc/accuracy']:.1%}"
    if "rewards/accuracies" in scores:  # held-out preference pairs (data.eval_path)
        return "reward accuracy", f"{scores['rewards/accuracies']:.1%}"
    named = sorted(k for k in scores if k.count("/") == 1
                   and k.endswith(("/exact_match", "/accuracy", "/prompt_level_strict_acc")))
    if named:  # eval.tasks only: the first task's
        return named[0], f"{scores[named[0]]:.1%}"
    return "loss", f"{scores.get('loss', float('nan')):.3f}"
