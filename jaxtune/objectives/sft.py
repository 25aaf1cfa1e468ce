"""Supervised fine-tuning: next-token cross-entropy over the trained (loss-masked) tokens.

The `sft` objective: [B, T] rows from the shared SFT pipeline (tasks, mixtures, packing), the
global batch's trained tokens as the weight, held-out loss / generative / multiple-choice
evaluation (evaluate.py). Its loss math is `sft_sums` (sums) / `sft_loss_from_stats` (normalised).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from jaxtune import batch as batch_lib, evaluate, loading
from jaxtune.data import datasets
from jaxtune.logprobs import token_stats, TokenStats
from jaxtune.objectives import base


def sft_loss(
    logits: jax.Array,
    batch: dict[str, jax.Array],
    *,
    normalizer: jax.Array | float,
    z_loss: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`sft_loss_from_stats` on full logits [B, T, V]."""
    return sft_loss_from_stats(token_stats(logits, batch["targets"]), batch, normalizer=normalizer, z_loss=z_loss)


def sft_sums(stats: TokenStats, loss_mask: jax.Array, *, z_loss: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics) summed over the trained tokens (`loss_mask`) of per-token stats.

    The optional z-loss (PaLM) penalises log(Z)^2 to keep the softmax normaliser near 1.
    `trained_tokens` is a count (SFT.summed_metrics), the rest are sums to be divided by it.
    """
    mask = loss_mask.astype(jnp.float32)
    nll = -jnp.sum(stats.logp * mask)
    metrics = {"loss": nll, "accuracy": jnp.sum(stats.correct * mask), "trained_tokens": jnp.sum(mask)}
    loss = nll
    if z_loss:
        z_term = jnp.sum(jnp.square(stats.log_z) * mask)
        loss = loss + z_loss * z_term
        metrics["z_loss"] = z_term
    return loss, metrics


def sft_loss_from_stats(
    stats: TokenStats,
    batch: dict[str, jax.Array],
    *,
    normalizer: jax.Array | float,
    z_loss: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Cross-entropy summed over `loss_mask` and divided by `normalizer`, from per-token stats
    (full or chunked LM head, jaxtune/logprobs.py).

    `normalizer` is the number of trained tokens in the whole *global* batch (all micro-batches),
    so packing, padding and gradient accumulation leave the loss unchanged: summing this loss over
    micro-batches gives the token-mean over the global batch. Every metric is additive in the same
    way (`trained_tokens` is this batch's count).
    """
    loss, sums = sft_sums(stats, batch["loss_mask"], z_loss=z_loss)
    return base.normalise(loss, sums, normalizer, SFT.summed_metrics)


def lm_eval_set(config: ml_collections.ConfigDict, records=(), templates=None):
    """Held-out LM evaluation of a run: `records` rendered with `templates` (loss, generative exact
    match), plus eval.mc_path and eval.tasks (every objective's model is a causal LM)."""
    return evaluate.build_eval_set(records, templates or {}, config.eval, seed=config.seed)


def lm_evaluate(config: ml_collections.ConfigDict, model, variables, tokenizer, eval_set, *, show=0, printer=print):
    return evaluate.run(model, variables, tokenizer, eval_set, config.eval, seq_len=config.data.seq_len,
                        seed=config.seed, show=show, printer=printer, logits_chunk=config.train.logits_chunk)


@base.register("sft")
class SFT(base.Objective):
    """Next-token cross-entropy on [B, T] rows (packed or padded), mean over the trained tokens;
    `train.z_loss` adds the z-loss. An encoder-decoder's rows carry both streams
    (batch.SEQ2SEQ_BATCH_KEYS): the loss is on the decoder targets given the encoder input."""

    summed_metrics = ("trained_tokens",)
    encoder_decoder = True  # T5: prompt -> encoder, target -> decoder (trainer.step.Seq2SeqApply)

    def load_data(self, workdir):
        return datasets.load_sft_data(loading.data_settings(self.config, workdir), workdir, seed=self.config.seed,
                                      screen=base.data_screen(self.config))

    def train_dataset(self, data, *, batch_size, process_index, process_count):
        if len(data.tasks) > 1 and process_index == 0:
            print(f"jaxtune: data mixture ({data.mixture.mode}):\n{data.mixture.describe()}", flush=True)
        return datasets.train_dataset(data, self.config.data, batch_size=batch_size, seed=self.config.seed,
                                      process_index=process_index, process_count=process_count)

    def batch_shapes(self, batch_size):
        keys = batch_lib.SEQ2SEQ_BATCH_KEYS if loading.is_encoder_decoder(self.config) else batch_lib.BATCH_KEYS
        return {k: jax.ShapeDtypeStruct((batch_size, self.config.data.seq_len), jnp.int32) for k in keys}

    def weight(self, batch):
        return jnp.sum(batch["loss_mask"].astype(jnp.float32))

    def loss(self, model, params, batch, *, frozen=None, rng=None, ref_params=None):
        rngs = None if rng is None else {"dropout": rng}
        stats = model.token_stats(params, batch, frozen=frozen, rngs=rngs)
        return sft_sums(stats, batch["loss_mask"], z_loss=self.config.train.z_loss)

    def eval_set(self, data):
        if not data.eval_records:
            return lm_eval_set(self.config)
        return lm_eval_set(self.config, data.eval_records, data.eval_templates)

    def evaluate(self, model, variables, tokenizer, eval_set, *, show=0, printer=print):
        return lm_evaluate(self.config, model, variables, tokenizer, eval_set, show=show, printer=printer)

    def data_report(self, stats):
        if jax.process_index() != 0 or not stats.slots:
            return []
        return ["data (this process):\n  " + "\n  ".join(stats.report())]
