"""What the pair-shaped objectives (dpo, kto) share: pair batches (padded or packed), one forward
pass for both rows, the reference model (copy, base, precomputed or none), held-out pair
evaluation, validation of those settings.

Padded batches carry the pipeline keys with a pair axis (0 = chosen / the completion, 1 =
rejected / KTO's mismatched completion) plus the per-pair source index, reshaped to [2B, T] for
the forward pass so a pair stays on one device. Packed batches (data.packing) are [R, 2T] rows
holding whole pairs as segments, with [R, max_pairs] pair slots (data/pair_packing.py); log-probs
are summed per segment (objectives/segments.py). The weight is the number of real pairs. Subclasses
give the loss on per-sequence log-probs (`pair_losses`, with a `valid` mask for empty pair slots)
and their own config keys.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxtune import batch as batch_lib, config as config_lib, evaluate as evaluate_lib, loading, reference, sharding
from jaxtune.data import chat, datasets, pair_packing, preference
from jaxtune.errors import UserError
from jaxtune.objectives import base, pair_eval, segments, step_shapes
from jaxtune.objectives.sft import lm_eval_set, lm_evaluate

REFERENCE_CHOICES = ("auto", "copy", "precomputed", "none")
REFERENCE_NAMES = {
    "none": "none (reference-free loss)", "copy": "frozen copy of the initial weights",
    "base": "the base model without its adapters (no extra weights)", "precomputed": "precomputed ({store}/)",
}


def pair_scores(model: base.ModelFns, params, batch: dict[str, jax.Array], frozen=None, rngs=None):
    """Summed log-probs and lengths [P, 2] of a pair batch, in one forward pass over all its rows.

    Padded [B, 2, T]: the pair axis is folded into the batch axis next to its pair (P = B), so
    sharding B keeps a pair on one device. Packed [R, 2T]: sums per segment (P = R * max_pairs;
    empty slots are 0, see `pair_mask`).
    """
    logps, lengths, _ = segments.pair_logps(lambda rows: model.token_stats(params, rows, frozen=frozen, rngs=rngs),
                                            batch, batch_lib.row_keys(batch))
    return logps, lengths


def pair_mask(batch) -> jax.Array | None:
    """[P] bool, the real pairs of a packed batch (None for padded batches: every pair is real)."""
    return batch[batch_lib.PAIR_MASK_KEY].reshape(-1) > 0 if batch_lib.is_packed_pairs(batch) else None


per_pair = segments.per_pair  # a per-pair batch key as a flat [P] array aligned with pair_scores


@dataclasses.dataclass
class HeldOut:
    """A pair run's held-out sets: LM evaluations (eval.mc_path, generative/multiple-choice eval.tasks)
    and held-out pairs (data.eval_path, eval.tasks with metric='preference')."""

    lm: Any
    pairs: list

    def __bool__(self) -> bool:
        return bool(self.lm) or bool(self.pairs)


def check_seq2seq_packing(config: ml_collections.ConfigDict, *, resolve_hub: bool = True) -> None:
    """Encoder-decoder pairs are padded [B, 2, T] rows of both streams: packed pairs are decoder-only so far."""
    where = loading.encoder_decoder_family(config, resolve_hub=resolve_hub) if config.data.packing else None
    if where is not None:
        raise UserError(f"config key 'data.packing' is True, but {where} is an encoder-decoder model, whose preference "
                        f"pairs are padded (packing pairs is decoder-only so far); set data.packing=False")


class PairObjective(base.Objective):
    """Base of the objectives on [B, 2, T] batches with a reference model."""

    unpaired: ClassVar[bool] = False  # KTO's (prompt, completion, label) records
    row_multiple: int = 1  # packed steps: a process's rows are a multiple of this (set in `start`)

    @classmethod
    def config_section(cls):
        c = ml_collections.ConfigDict()
        # auto: none for reference-free losses, the base model with LoRA, else a frozen copy of the
        # initial params | copy | precomputed (one pass over the data before training) | none
        c.reference = "auto"
        return c

    @staticmethod
    def add_beta(section: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        """`beta` for the objectives whose loss has one (DPO family, KTO); not the reward model's."""
        section.beta = ml_collections.FieldReference(None, field_type=float)  # None: the loss's paper default
        return section

    @classmethod
    def reference_free(cls, section: ml_collections.ConfigDict) -> bool:
        """Whether the configured loss needs no reference model at all."""
        return False

    @classmethod
    def validate(cls, config):
        o = cls.section_of(config)
        if o.reference not in REFERENCE_CHOICES:
            raise UserError(f"config key '{cls.key('reference')}' is {o.reference!r}; expected one of "
                            f"{', '.join(REFERENCE_CHOICES)}")
        if config.data.chat_template:
            try:
                chat.resolve_template(config.data.chat_template)
            except UserError as e:
                raise UserError(f"config key 'data.chat_template': {e}") from None
        if config.data.builtin:
            raise UserError(f"config key 'objective.type' is {config.objective.type!r}: preference data comes from "
                            f"JSONL files (data.train_path or data.tasks), not data.builtin={config.data.builtin!r}")
        if o.get("beta") is not None and not o.beta > 0:
            raise UserError(f"config key '{cls.key('beta')}' must be > 0, got {o.beta}")
        reference_free = cls.reference_free(o)
        if reference_free and o.reference not in ("auto", "none"):
            raise UserError(f"config key '{cls.key('reference')}' is {o.reference!r}, but {cls._needs_reference_name(o)} "
                            "is reference-free; use 'auto' or 'none'")
        lora = config.peft.method != "none"
        if lora and o.reference == "copy":
            raise UserError(f"config key '{cls.key('reference')}' is 'copy', but with LoRA the reference is the base "
                            "model without its adapters (no extra weights): use 'auto' (or 'precomputed')")
        if not reference_free and o.reference == "none":
            raise UserError(f"config key '{cls.key('reference')}' is 'none', but {cls._needs_reference_name(o)} needs a "
                            "reference model; use auto, copy or precomputed")
        check_seq2seq_packing(config, resolve_hub=False)
        if o.reference == "precomputed" and len(config.data.tasks) > 1:
            raise UserError(f"config key '{cls.key('reference')}' is 'precomputed', which scores one pair source "
                            "(data.train_path or a single data.tasks entry); with several data.tasks use 'auto' or "
                            "'copy'")

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
        return datasets.load_preference_data(loading.data_settings(self.config, workdir), workdir,
                                             unpaired=self.unpaired, eval_cfg=self.config.eval,
                                             screen=base.data_screen(self.config))

    def train_dataset(self, data, *, batch_size, process_index, process_count):
        """Pair batches on the shared pipeline (data.tasks mixed; padded, or packed with data.packing),
        and their datasets.PairStats (per-task counts; the transforms precomputed log-probs attach to)."""
        c = self.config
        if data.seq2seq:
            check_seq2seq_packing(c)
        it, stats = datasets.preference_train_dataset(
            data, c.data, batch_size=batch_size, seed=c.seed, unpaired=self.unpaired, process_index=process_index,
            process_count=process_count, precomputed_reference=self.reference_kind() == "precomputed")
        self.pipeline_stats = stats.pipeline  # packed steps: the row ladder (step_rows), padding counted
        return it, stats

    def batch_shapes(self, batch_size, *, packed: bool | None = None):
        """Padded: rows [B, 2, T], per-pair keys [B]. Packed (data.packing): rows [B, 2T], per-pair keys
        and `pair_mask` [B, data.max_pairs_per_row]; with data.pair_batching='pairs' (B pairs per step)
        that is the largest bucket (one pair per row), and a step usually takes fewer rows."""
        d = self.config.data
        packed = d.packing if packed is None else packed
        rows = (batch_size, pair_packing.row_length(d.seq_len)) if packed else (batch_size, 2, d.seq_len)
        pair = (batch_size, d.max_pairs_per_row) if packed else (batch_size,)
        row_keys = batch_lib.SEQ2SEQ_BATCH_KEYS if loading.is_encoder_decoder(self.config) else batch_lib.BATCH_KEYS
        shapes = {k: jax.ShapeDtypeStruct(rows, jnp.int32) for k in row_keys}
        if packed:
            shapes[batch_lib.PAIR_MASK_KEY] = jax.ShapeDtypeStruct(pair, jnp.int32)
        shapes[preference.INDEX_KEY] = jax.ShapeDtypeStruct(pair, jnp.int32)
        if self.unpaired:
            shapes[preference.LABEL_KEY] = jax.ShapeDtypeStruct(pair, jnp.int32)
        if self.reference_kind() == "precomputed":
            shapes.update({k: jax.ShapeDtypeStruct(pair, jnp.float32) for k in preference.REF_KEYS})
        return shapes

    # ---- the loss ----------------------------------------------------------------------------

    def weight(self, batch):
        return segments.pair_count(batch)  # real pairs (KTO: examples)

    def reference_logps(self, model, batch, frozen, ref_params):
        """[B, 2] reference log-probs: the frozen copy, the adapter-free base, the batch, or zeros."""
        kind = self.reference_kind()
        if kind == "copy":
            return jax.lax.stop_gradient(pair_scores(model, ref_params, batch)[0])
        if kind == "base":
            return jax.lax.stop_gradient(pair_scores(model, frozen, batch)[0])
        if kind == "precomputed":
            return jnp.stack([per_pair(batch, k) for k in preference.REF_KEYS], axis=-1)
        return jnp.zeros(per_pair(batch, preference.INDEX_KEY).shape + (2,), jnp.float32)  # reference-free losses

    def pair_losses(self, logps, lengths, ref, batch, valid=None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(per-pair loss [P], metrics as means over the real pairs) from [P, 2] log-probs/lengths;
        `valid` ([P] bool or None) marks the real pairs of a packed batch (empty slots lose 0)."""
        raise NotImplementedError

    def loss(self, model, params, batch, *, frozen=None, rng=None, ref_params=None):
        rngs = None if rng is None else {"dropout": rng}
        logps, lengths = pair_scores(model, params, batch, frozen=frozen, rngs=rngs)
        ref = self.reference_logps(model, batch, frozen, ref_params)
        losses, means = self.pair_losses(logps, lengths, ref, batch, valid=pair_mask(batch))
        n = segments.pair_count(batch)
        total = jnp.sum(losses)
        return total, dict({k: v * n for k, v in means.items()}, loss=total)

    # ---- hooks -------------------------------------------------------------------------------

    def packs_steps(self) -> bool:
        """Packed pairs with train.global_batch_size pairs per step (data.pair_batching='pairs')."""
        return bool(self.config.data.packing) and self.config.data.pair_batching == "pairs"

    def next_batch(self, state, data_iter, rng):
        """Packed steps: the rows the step's pairs need, padded with empty rows to the bucket that
        every process agrees on (objectives/step_shapes.py; data/pair_packing.StepRows)."""
        batch = next(data_iter)
        if not self.packs_steps():
            return batch
        need = step_shapes.agreed_max(len(batch["inputs"]), "pair_rows")
        rows = self.pipeline_stats.step_rows.bucket(need, self.row_multiple)
        self.pipeline_stats.slots += (rows - len(batch["inputs"])) * batch["inputs"].shape[1]  # padding rows
        return step_shapes.pad_rows(batch, rows)

    def keep_rows_whole(self, run) -> None:
        """Packed steps: the rows per process that give every device (and micro-batch) whole rows."""
        mesh_shape = run.setup.mesh_shape
        self.row_multiple = step_shapes.row_multiple(mesh_shape["data"] * mesh_shape["fsdp"],
                                                     self.config.train.grad_accum_steps, jax.process_count())

    def start(self, run):
        """reference='precomputed': score every training pair once with the start weights
        (stored in the workdir, resumable) and attach the numbers to the batches."""
        self.keep_rows_whole(run)
        transform = run.data_stats.transform
        self.start_params = run.start_params  # the reference of held-out pair evaluation (copy/precomputed)
        if self.reference_kind() == "precomputed":  # scored as padded pairs, whatever the training layout
            model, mesh = run.setup.apply_fn, run.setup.mesh
            transform.ref_logps = reference.precompute(
                jax.jit(lambda p, b: pair_scores(model, p, b)[0], out_shardings=sharding.replicated(mesh)),
                run.start_params, run.data.train_source, transform, run.workdir,
                batch_size=self.config.train.global_batch_size,
                put=lambda b: {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in b.items()},
                fingerprint=self.reference_fingerprint(run.setup.model_config, len(run.data.train_source)),
            )
        keys = preference.batch_keys(transform)
        if self.config.data.packing:
            keys = pair_packing.packed_keys(keys[len(batch_lib.BATCH_KEYS):])
        if set(keys) != set(self.batch_shapes(1)):  # the shapes the step was built for
            raise AssertionError(f"preference batches carry {keys}, expected {tuple(self.batch_shapes(1))}")

    def reference_fingerprint(self, model_config, num_records: int) -> dict:
        """What precomputed reference log-probs depend on; a stored table made for other values is refused."""
        c = self.config
        return {
            "records": num_records, "train_path": c.data.train_path,
            "templates": config_lib.to_json_dict(c.data)["templates"], "chat_template": c.data.chat_template,
            "seq_len": c.data.seq_len,
            "truncation": c.data.truncation, "seed": c.seed, "tokenizer": c.data.tokenizer,
            "model": repr(model_config), "hf_dir": c.model.hf_dir, "init_from": c.model.init_from,
            # The names tables were stored under before `dpo` (so they stay valid under either spelling).
            "objective": "kto" if self.unpaired else "preference",
            **({"tasks": config_lib.to_json_dict(c.data)["tasks"]} if c.data.tasks else {}),
        }

    def eval_set(self, data):
        """eval.mc_path / generative and multiple-choice eval.tasks, and the held-out pairs."""
        pairs = datasets.preference_eval_sets(data, self.config.data, self.config.eval, seed=self.config.seed,
                                              unpaired=self.unpaired)
        return HeldOut(lm_eval_set(self.config), pairs)

    def evaluate(self, model, variables, tokenizer, eval_set, *, show=0, printer=print):
        """LM metrics, and for held-out pairs the training loss and rewards (objectives/pair_eval.py)."""
        lm, pair_sets = (eval_set.lm, eval_set.pairs) if isinstance(eval_set, HeldOut) else (eval_set, [])
        scores = lm_evaluate(self.config, model, variables, tokenizer, lm, show=show, printer=printer) if lm else {}
        if pair_sets:
            kw = dict(batch_size=self.config.eval.batch_size, logits_chunk=self.config.train.logits_chunk)
            scores.update(pair_eval.evaluate_pair_sets(
                pair_sets, lambda arrays: evaluate_lib.pair_sequence_scores(model, variables, arrays, **kw),
                lambda s: self._eval_reference(model, variables, s, kw), self.pair_losses))
        return scores

    def _eval_reference(self, model, variables, eval_set, kw) -> np.ndarray:
        """[N, 2] reference log-probs of a held-out pair set, computed once: zeros (reference-free), the
        PEFT base (the adapters left out), or the run's start weights (copy, precomputed)."""
        cache = self.__dict__.setdefault("_eval_reference_cache", {})
        if id(eval_set) not in cache:
            kind = self.reference_kind()
            if kind == "none":
                cache[id(eval_set)] = np.zeros((len(eval_set.arrays["inputs"]), 2), np.float32)
            else:
                has_base = isinstance(variables, dict) and "params" in variables and len(variables) > 1
                weights = {"params": variables["params"]} if has_base else {"params": self._start_weights(model)}
                cache[id(eval_set)] = evaluate_lib.pair_sequence_scores(model, weights, eval_set.arrays, **kw)[0]
        return cache[id(eval_set)]

    def _start_weights(self, model):
        """The run's start weights (model.hf_dir > model.init_from > seed): `start_params`, which the
        trainer sets in `start` and `jaxtune eval` before evaluating."""
        if self.start_params is None:
            raise RuntimeError(f"{self.name}: a held-out pair set needs the run's start weights (start_params), "
                               "which the trainer or `jaxtune eval` provides")
        return self.start_params()

    def describe(self):
        where = REFERENCE_NAMES[self.reference_kind()].format(store=reference.STORE_DIR)
        return f"{self.name} objective ({self.loss_name()}), reference: {where}"

    def loss_name(self) -> str:
        return self.name

    def data_report(self, stats):
        counts = stats.pipeline.tasks.values()
        dropped = sum(s.dropped for s in counts)
        lines = []
        if dropped:
            lines.append(f"data: {dropped} of {dropped + sum(s.examples for s in counts)} preference pairs dropped "
                         "(could not fit data.seq_len with a preference left, or data.truncation='drop')")
        if jax.process_index() == 0 and stats.pipeline.slots:
            lines.append("data (this process):\n  " + "\n  ".join(stats.report()))
        return lines
