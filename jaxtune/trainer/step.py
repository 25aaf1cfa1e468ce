"""The jitted train step: one optimizer step of the run's objective, with gradient accumulation.

The step knows no objective by name. It computes the objective's `weight` of the global batch
once, splits the batch into `accum` strided micro-batches, adds up each micro-batch's gradients
of `loss_sum / weight` (and metrics, base.normalise), so the result is the global-batch mean
whatever the objective counts; then clips/updates through the optax chain.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from jaxtune.objectives import TokenStats, base, model_token_stats, token_stats
from jaxtune.logprobs import DEFAULT_CHUNK as DEFAULT_LOGITS_CHUNK
from jaxtune.logprobs import head_token_stats, with_temperature
from jaxtune.loading import variables_for
from jaxtune.trainer.state import TrainState


class ModelApply:
    """The objectives' view of a jaxtune model (objectives.base.ModelFns).

    Full fine-tuning: params are the weights. LoRA: params are the adapters and `frozen` the base;
    `apply_fn(state.frozen, ...)` (no adapters) is the base model, the free reference for DPO.
    `token_stats` is what the losses use: per-token log-probs with the LM head run `logits_chunk`
    sequence positions at a time (jaxtune/logprobs.py; 0 = full logits).
    """

    def __init__(self, model: nn.Module, logits_chunk: int = DEFAULT_LOGITS_CHUNK):
        self.model, self.logits_chunk = model, logits_chunk

    def __call__(self, params, tokens, positions, segment_ids, frozen=None, rngs=None):
        return self.model.apply(variables_for(params, frozen), tokens, positions=positions, segment_ids=segment_ids,
                                rngs=rngs)

    def token_stats(self, params, rows: dict[str, jax.Array], frozen=None, rngs=None, temperature=1.0) -> TokenStats:
        return model_token_stats(self.model, variables_for(params, frozen), rows["inputs"], rows["targets"],
                                 positions=rows["positions"], segment_ids=rows["segment_ids"], rngs=rngs,
                                 chunk=self.logits_chunk, temperature=temperature)

    def hidden_states(self, params, rows: dict[str, jax.Array], frozen=None, rngs=None) -> jax.Array:
        return self.model.apply(variables_for(params, frozen), rows["inputs"], positions=rows["positions"],
                                segment_ids=rows["segment_ids"], rngs=rngs, method="hidden_states")

    def token_stats_and_values(self, params, rows: dict[str, jax.Array], frozen=None, rngs=None,
                               temperature=1.0) -> tuple[TokenStats, jax.Array]:
        variables = variables_for(params, frozen)
        if getattr(self.model.config, "value_backbone", False):  # the value model's own backbone: two passes
            values = self.model.apply(variables, rows["inputs"], positions=rows["positions"],
                                      segment_ids=rows["segment_ids"], rngs=rngs, method="values")
            return self.token_stats(params, rows, frozen=frozen, rngs=rngs, temperature=temperature), values
        hidden = self.hidden_states(params, rows, frozen=frozen, rngs=rngs)  # one backbone pass for both heads
        head = with_temperature(lambda h: self.model.apply(variables, h, method="logits_from_hidden"), temperature)
        stats = head_token_stats(head, hidden, rows["targets"], chunk=self.logits_chunk)
        return stats, self.model.apply(variables, hidden, method="values_from_hidden")


class Seq2SeqApply(ModelApply):
    """ModelFns of an encoder-decoder (T5): rows carry the encoder stream (`inputs`, `segment_ids`,
    `positions`) and the decoder stream (`decoder_inputs`, `decoder_segment_ids`,
    `decoder_positions`); `targets` are the decoder's, so the statistics are those of the targets
    given the encoder input, the LM head chunked as for a decoder-only model."""

    def _hidden(self, variables, rows, rngs):
        return self.model.apply(variables, rows["inputs"], positions=rows["positions"], segment_ids=rows["segment_ids"],
                                decoder_inputs=rows["decoder_inputs"], decoder_positions=rows["decoder_positions"],
                                decoder_segment_ids=rows["decoder_segment_ids"], rngs=rngs, method="hidden_states")

    def __call__(self, params, tokens, positions, segment_ids, frozen=None, rngs=None):
        raise NotImplementedError("an encoder-decoder takes two token streams: use token_stats(params, rows)")

    def token_stats(self, params, rows: dict[str, jax.Array], frozen=None, rngs=None, temperature=1.0) -> TokenStats:
        variables = variables_for(params, frozen)
        head = with_temperature(lambda h: self.model.apply(variables, h, method="logits_from_hidden"), temperature)
        return head_token_stats(head, self._hidden(variables, rows, rngs), rows["targets"], chunk=self.logits_chunk)

    def hidden_states(self, params, rows: dict[str, jax.Array], frozen=None, rngs=None) -> jax.Array:
        return self._hidden(variables_for(params, frozen), rows, rngs)


class LogitsApply:
    """ModelFns around any `apply_fn(params, tokens, positions, segment_ids, frozen=None, rngs=None) -> logits`
    (tests, toy models): token stats from its full logits."""

    def __init__(self, apply_fn: Callable):
        self.apply_fn = apply_fn

    def __call__(self, params, tokens, positions, segment_ids, frozen=None, rngs=None):
        return self.apply_fn(params, tokens, positions, segment_ids, frozen=frozen, rngs=rngs)

    def token_stats(self, params, rows, frozen=None, rngs=None, temperature=1.0) -> TokenStats:
        head = with_temperature(lambda rows: self(params, rows["inputs"], rows["positions"], rows["segment_ids"],
                                                  frozen=frozen, rngs=rngs), temperature)
        return token_stats(head(rows), rows["targets"])

    def hidden_states(self, params, rows, frozen=None, rngs=None):
        raise NotImplementedError("a plain apply function has no hidden states; use ModelApply")

    def token_stats_and_values(self, params, rows, frozen=None, rngs=None, temperature=1.0):
        raise NotImplementedError("a plain apply function has no value head; use ModelApply")


def make_apply_fn(model: nn.Module, logits_chunk: int = DEFAULT_LOGITS_CHUNK) -> ModelApply:
    """The model's apply function (see ModelApply; Seq2SeqApply for an encoder-decoder)."""
    return (Seq2SeqApply if getattr(model, "is_encoder_decoder", False) else ModelApply)(model, logits_chunk)


def model_fns(apply_fn) -> base.ModelFns:
    """`apply_fn` as the objectives see it: a ModelApply as it is, any other callable via its logits."""
    return apply_fn if hasattr(apply_fn, "token_stats") else LogitsApply(apply_fn)


def split_microbatches(x: jax.Array, accum: int) -> jax.Array:
    """[B, ...] -> [accum, B/accum, ...] taking strided rows, so every micro-batch spans all devices."""
    x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:])
    return jnp.swapaxes(x, 0, 1)


def make_loss_fn(objective: base.Objective, apply_fn) -> Callable:
    """loss_fn(params, batch, weight, frozen=None, rng=None, ref_params=None) -> (loss, metrics): the
    objective's sums over `batch` divided by the global batch's `weight`, so the micro-batches'
    values add up to the global-batch mean."""
    model = model_fns(apply_fn)

    def loss_fn(params, batch, weight, frozen=None, rng=None, ref_params=None):
        loss_sum, sums = objective.loss(model, params, batch, frozen=frozen, rng=rng, ref_params=ref_params)
        return base.normalise(loss_sum, sums, weight, objective.summed_metrics)

    return loss_fn


def make_train_step(
    objective: base.Objective, apply_fn, tx: optax.GradientTransformation, lr_schedule: optax.Schedule, *,
    accum: int = 1, microbatch_sharding: NamedSharding | None = None, seed: int = 0,
    grad_check: Callable | None = None,
) -> Callable:
    """train_step(state, batch, ref_params=None) -> (state, metrics); one optimizer step per call.

    Gradients are taken w.r.t. state.params only (LoRA: the adapters); state.frozen is passed to
    the objective and returned untouched. Each (step, micro-batch) gets its own dropout rng.
    `ref_params` is the frozen reference copy (reference_kind 'copy'): never updated, no
    optimizer state. `grad_check(grads) -> dict` adds its entries to the metrics (nonfinite.grad_flags).
    """
    grad_fn = jax.value_and_grad(make_loss_fn(objective, apply_fn), has_aux=True)

    def train_step(state: TrainState, batch: dict[str, jax.Array], ref_params=None):
        weight = objective.weight(batch)  # of the whole global batch: accumulation is exact
        dropout_key = jax.random.fold_in(jax.random.key(seed), 0x1d0)  # traced: no eager array
        step_key = jax.random.fold_in(dropout_key, state.step)
        if accum == 1:
            (_, metrics), grads = grad_fn(state.params, batch, weight, state.frozen, step_key, ref_params)
        else:
            micro = jax.tree.map(lambda x: split_microbatches(x, accum), batch)
            if microbatch_sharding is not None:
                micro = jax.lax.with_sharding_constraint(micro, microbatch_sharding)
            first = jax.tree.map(lambda x: x[0], micro)
            shapes = jax.eval_shape(grad_fn, state.params, first, weight, state.frozen, step_key, ref_params)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (shapes[1], shapes[0][1]))

            def body(carry, xs):
                mb, i = xs
                (_, m), g = grad_fn(state.params, mb, weight, state.frozen, jax.random.fold_in(step_key, i),
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
