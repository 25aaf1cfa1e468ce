"""What the pair-shaped objectives (dpo, kto) share: [B, 2, T] batches, one forward pass for both
rows, the reference model (copy, base, precomputed or none), validation of those settings.

Batches carry the pipeline keys with a pair axis (0 = chosen / the completion, 1 = rejected /
KTO's mismatched completion) plus the per-pair source index, reshaped to [2B, T] for the forward
pass so a pair stays on one device. The weight is the number of pairs. Subclasses give the loss
on per-sequence log-probs (`pair_losses`) and their own config keys.
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
import ml_collections

from jaxtune.errors import UserError
from jaxtune.objectives import base
from jaxtune.objectives.logprobs import masked_sequence_sums

REFERENCE_CHOICES = ("auto", "copy", "precomputed", "none")
REFERENCE_NAMES = {
    "none": "none (reference-free loss)", "copy": "frozen copy of the initial weights",
    "base": "the base model without its adapters (no extra weights)", "precomputed": "precomputed ({store}/)",
}


def pair_scores(model: base.ModelFns, params, batch: dict[str, jax.Array], frozen=None, rngs=None):
    """Summed log-probs and lengths [B, 2] of a [B, 2, T] preference batch, in one [2B, T] forward pass.

    The pair axis is folded into the batch axis next to its pair, so sharding B keeps a pair on one device.
    """
    from jaxtune.data import pipeline

    rows = {k: batch[k].reshape(-1, batch[k].shape[-1]) for k in pipeline.BATCH_KEYS}
    stats = model.token_stats(params, rows, frozen=frozen, rngs=rngs)
    logps, lengths = masked_sequence_sums(stats.logp, rows["loss_mask"])
    return logps.reshape(-1, 2), lengths.reshape(-1, 2)


class PairObjective(base.Objective):
    """Base of the objectives on [B, 2, T] batches with a reference model."""

    unpaired: ClassVar[bool] = False  # KTO's (prompt, completion, label) records

    @classmethod
    def config_section(cls):
        c = ml_collections.ConfigDict()
        c.beta = ml_collections.FieldReference(None, field_type=float)  # None: the loss's paper default
        # auto: none for reference-free losses, the base model with LoRA, else a frozen copy of the
        # initial params | copy | precomputed (one pass over the data before training) | none
        c.reference = "auto"
        return c

    @classmethod
    def reference_free(cls, section: ml_collections.ConfigDict) -> bool:
        """Whether the configured loss needs no reference model at all."""
        return False

    @classmethod
    def validate(cls, config):
        o = config.objective
        if o.reference not in REFERENCE_CHOICES:
            raise UserError(f"config key 'objective.reference' is {o.reference!r}; expected one of "
                            f"{', '.join(REFERENCE_CHOICES)}")
        if config.data.chat_template:
            from jaxtune.data import chat  # resolves names, files and jinja strings

            try:
                chat.resolve_template(config.data.chat_template)
            except UserError as e:
                raise UserError(f"config key 'data.chat_template': {e}") from None
        if config.data.source != "jsonl":
            raise UserError(f"config key 'objective.type' is {o.type!r}: preference data comes from JSONL "
                            "(data.source='jsonl')")
        if o.beta is not None and not o.beta > 0:
            raise UserError(f"config key 'objective.beta' must be > 0, got {o.beta}")
        reference_free = cls.reference_free(o)
        if reference_free and o.reference not in ("auto", "none"):
            raise UserError(f"config key 'objective.reference' is {o.reference!r}, but loss_type {o.loss_type!r} is "
                            "reference-free; use 'auto' or 'none'")
        lora = config.peft.method != "none"
        if lora and o.reference == "copy":
            raise UserError("config key 'objective.reference' is 'copy', but with LoRA the reference is the base model "
                            "without its adapters (no extra weights): use 'auto' (or 'precomputed')")
        if not reference_free and o.reference == "none":
            raise UserError(f"config key 'objective.reference' is 'none', but {cls._needs_reference_name(o)} needs a "
                            "reference model; use auto, copy or precomputed")

    @classmethod
    def _needs_reference_name(cls, section) -> str:
        return cls.name

    def reference_kind(self):
        o = self.section
        if self.reference_free(o):
            return "none"
        if o.reference == "auto":
            return "base" if self.config.peft.method != "none" else "copy"
        return o.reference

    # ---- data --------------------------------------------------------------------------------

    def load_data(self, workdir):
        from jaxtune import config as config_lib
        from jaxtune.data import datasets

        return datasets.load_preference_data(config_lib.data_config(self.config), workdir, unpaired=self.unpaired)

    def train_dataset(self, data, *, batch_size, process_index, process_count):
        """Padded [B, 2, T] pair batches, and the transform (which counts truncated/dropped pairs)."""
        from jaxtune.data import preference

        c = self.config
        transform = preference.PreferenceTransform(
            data.train_source, data.train_templates, data.tokenizer, seq_len=c.data.seq_len,
            truncation=c.data.truncation, seed=c.seed, unpaired=self.unpaired, chat_template=data.chat_template,
        )
        dataset = preference.preference_dataset(
            data.train_source, transform, batch_size=batch_size, seed=c.seed, shuffle=c.data.shuffle,
            process_index=process_index, process_count=process_count, read_threads=c.data.read_threads,
            prefetch=c.data.prefetch,
        )
        return dataset, transform

    def batch_shapes(self, batch_size):
        from jaxtune.data import pipeline, preference

        seq_len = self.config.data.seq_len
        shapes = {k: jax.ShapeDtypeStruct((batch_size, 2, seq_len), jnp.int32) for k in pipeline.BATCH_KEYS}
        shapes[preference.INDEX_KEY] = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
        if self.unpaired:
            shapes[preference.LABEL_KEY] = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
        if self.reference_kind() == "precomputed":
            shapes.update({k: jax.ShapeDtypeStruct((batch_size,), jnp.float32) for k in preference.REF_KEYS})
        return shapes

    # ---- the loss ----------------------------------------------------------------------------

    def weight(self, batch):
        return jnp.asarray(batch["inputs"].shape[0], jnp.float32)  # pairs (KTO: examples)

    def reference_logps(self, model, batch, frozen, ref_params):
        """[B, 2] reference log-probs: the frozen copy, the adapter-free base, the batch, or zeros."""
        from jaxtune.data import preference

        kind = self.reference_kind()
        if kind == "copy":
            return jax.lax.stop_gradient(pair_scores(model, ref_params, batch)[0])
        if kind == "base":
            return jax.lax.stop_gradient(pair_scores(model, frozen, batch)[0])
        if kind == "precomputed":
            return jnp.stack([batch[k] for k in preference.REF_KEYS], axis=-1)
        return jnp.zeros(batch[preference.INDEX_KEY].shape + (2,), jnp.float32)  # reference-free losses

    def pair_losses(self, logps, lengths, ref, batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(per-pair loss [B], metrics as means over the B pairs) from [B, 2] log-probs/lengths."""
        raise NotImplementedError

    def loss(self, model, params, batch, *, frozen=None, rng=None, ref_params=None):
        rngs = None if rng is None else {"dropout": rng}
        logps, lengths = pair_scores(model, params, batch, frozen=frozen, rngs=rngs)
        ref = self.reference_logps(model, batch, frozen, ref_params)
        losses, means = self.pair_losses(logps, lengths, ref, batch)
        n = losses.shape[0]
        total = jnp.sum(losses)
        return total, dict({k: v * n for k, v in means.items()}, loss=total)

    # ---- hooks -------------------------------------------------------------------------------

    def start(self, run):
        """objective.reference='precomputed': score every training pair once with the start weights
        (stored in the workdir, resumable) and attach the numbers to the batches."""
        from jaxtune import reference, sharding
        from jaxtune.data import preference

        transform = run.data_stats
        if self.reference_kind() == "precomputed":
            model = run.setup.apply_fn
            transform.ref_logps = reference.precompute(
                jax.jit(lambda p, b: pair_scores(model, p, b)[0], out_shardings=sharding.replicated(run.setup.mesh)),
                run.start_params, run.data.train_source, transform, run.workdir,
                batch_size=self.config.train.global_batch_size, put=run.device_put,
                fingerprint=self.reference_fingerprint(run.setup.model_config, len(run.data.train_source)),
            )
        if preference.batch_keys(transform) != tuple(self.batch_shapes(1)):  # the shapes the step was built for
            raise AssertionError(f"preference batches carry {preference.batch_keys(transform)}, "
                                 f"expected {tuple(self.batch_shapes(1))}")

    def reference_fingerprint(self, model_config, num_records: int) -> dict:
        """What precomputed reference log-probs depend on; a stored table made for other values is refused."""
        from jaxtune import config as config_lib

        c = self.config
        return {
            "records": num_records, "train_path": c.data.train_path,
            "templates": config_lib.to_json_dict(c.data)["templates"], "chat_template": c.data.chat_template,
            "seq_len": c.data.seq_len,
            "truncation": c.data.truncation, "seed": c.seed, "tokenizer": c.data.tokenizer,
            "model": repr(model_config), "hf_dir": c.model.hf_dir, "init_from": c.model.init_from,
            # The names tables were stored under before `dpo` (so they stay valid under either spelling).
            "objective": "kto" if self.unpaired else "preference",
        }

    def eval_set(self, data):
        from jaxtune.objectives.sft import lm_eval_set

        return lm_eval_set(self.config)  # eval.mc_path / eval.tasks; held-out pairs: not yet

    def evaluate(self, model, variables, tokenizer, eval_set, *, show=0, printer=print):
        from jaxtune.objectives.sft import lm_evaluate

        return lm_evaluate(self.config, model, variables, tokenizer, eval_set, show=show, printer=printer)

    def describe(self):
        from jaxtune import reference

        where = REFERENCE_NAMES[self.reference_kind()].format(store=reference.STORE_DIR)
        return f"{self.name} objective ({self.loss_name()}), reference: {where}"

    def loss_name(self) -> str:
        return self.name

    def data_report(self, stats):
        if not stats.stats.dropped:
            return []
        return [f"data: {stats.stats.dropped} of {stats.stats.examples} preference pairs dropped (could not fit "
                "data.seq_len with a preference left, or data.truncation='drop')"]
