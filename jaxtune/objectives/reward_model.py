"""Reward models (`objective.type='reward'`): a scalar head trained on preference pairs with the
Bradley-Terry loss.

The model is the policy's family with a `score` head instead of the LM head (`num_labels=1`,
models/layers.ScoreHead; exported as Hugging Face `*ForSequenceClassification`). A sequence's
reward ``r`` is the head's output at its last non-padding token over the whole text
prompt + completion + EOS, the token transformers pools (the rightmost one that is not the
tokenizer's pad id; layers.last_token_index). Per pair, with ``r_c``/``r_r`` the chosen/rejected
rewards, ``m`` the record's optional ``margin`` field (0 when absent) and ``c`` =
objective.reward.center_rewards_coefficient::

    loss = -log sigmoid(r_c - r_r - m) + c * (r_c + r_r)^2

TRL's RewardTrainer (its centering term, Eisenstein et al. 2023, is ``c * mean((r_c + r_r)^2)``
over the batch). Metrics: ``accuracy`` (r_c > r_r), ``margin`` (r_c - r_r), the mean chosen and
rejected rewards. Every value is summed per pair; the step divides by the global batch's pairs,
so gradient accumulation is exact. With LoRA the head is trained in full (peft's
modules_to_save); the data is the DPO pipeline's (JSONL pairs, templates, chat records), each step
holding train.global_batch_size pairs. Padded (data.packing=false, configs/reward.py): one sequence
per row, rows cut to the batch's longest sequence rounded up to a length bucket (16, 24, 32, 48,
64, 96, ... data.seq_len; the same on every process), as TRL pads to the batch's longest: the step
compiles once per bucket, and the padding cut changes no reward. Packed (data.packing=true, by
step: data.pair_batching='pairs'): the step's pairs share rows as DPO's do, and each reward is read
at its sequence's last token, `score_index` [R, max_pairs, 2] positions in the row.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune import batch as batch_lib, loading, scoring
from jaxtune.data import datasets, pair_packing, preference
from jaxtune.errors import UserError
from jaxtune.models.layers import last_token_index
from jaxtune.objectives import base, pairs, step_shapes

MARGIN_KEY = "margin"  # a record's optional per-pair margin, and its batch key [B] float32
SCORE_INDEX_KEY = "score_index"  # [B, 2]: the position each sequence's reward is read at
ROW_KEYS = ("inputs", "positions", "segment_ids")  # what the forward pass reads ([B, 2, T])


def bradley_terry_loss(chosen: jax.Array, rejected: jax.Array, margin: jax.Array | None = None, *,
                       center_rewards_coefficient: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(per-pair loss [B], per-pair metrics [B]) from chosen/rejected rewards [B], in float32."""
    chosen, rejected = chosen.astype(jnp.float32), rejected.astype(jnp.float32)
    diff = chosen - rejected
    logits = diff if margin is None else diff - margin.astype(jnp.float32)
    losses = -jax.nn.log_sigmoid(logits)
    if center_rewards_coefficient:
        losses = losses + center_rewards_coefficient * jnp.square(chosen + rejected)
    metrics = {"accuracy": (chosen > rejected).astype(jnp.float32), "margin": diff,
               "rewards/chosen": chosen, "rewards/rejected": rejected}
    return losses, metrics


def whole_sequences(rows: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Right-padded next-token rows [..., T] -> the whole token sequences (inputs, positions, segment_ids).

    A reward model reads every token of prompt + completion + EOS, while pipeline rows hold n
    inputs and their n shifted targets: the last target (the EOS) is appended where there is room.
    A row that fills all T inputs keeps them (the sequence was cut at data.seq_len anyway).
    """
    inputs, positions, segment_ids = (np.array(rows[k]) for k in ROW_KEYS)
    n = np.sum(rows["segment_ids"] > 0, axis=-1)
    for row in zip(*np.nonzero((n > 0) & (n < inputs.shape[-1]))):
        i = n[row]
        inputs[row + (i,)] = rows["targets"][row + (i - 1,)]
        positions[row + (i,)], segment_ids[row + (i,)] = i, 1
    return {"inputs": inputs, "positions": positions, "segment_ids": segment_ids}


def record_margin(record: Mapping[str, Any], where: str) -> float:
    """A record's `margin` field (0 when absent), checked to be a finite number."""
    value = record.get(MARGIN_KEY, 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise UserError(f"{where}: field {MARGIN_KEY!r} is {value!r}; expected a finite number (the reward "
                        "difference the chosen completion should win by)")
    return float(value)


class RewardRows:
    """Grain map around the preference transform: (index, record) -> a reward pair (or None).

    The pair's rows become whole sequences, `score_index` [2] marks the token each reward is read
    at (transformers' rule with the tokenizer's pad id, so an exported model scores the same token),
    and `margin` is the record's. `stats` are the inner transform's (truncated / dropped pairs).
    """

    def __init__(self, transform, pad_id: int, path: str = ""):
        self.transform, self.pad_id, self.path = transform, pad_id, path
        self.stats, self.source, self.seq_len = transform.stats, transform.source, transform.seq_len
        self.batch_keys = ROW_KEYS + (preference.INDEX_KEY, SCORE_INDEX_KEY, MARGIN_KEY)  # what __call__ yields
        self.position_keys = (SCORE_INDEX_KEY,)  # token positions: packing moves them with their sequences

    def __call__(self, index: int, record: dict) -> dict[str, np.ndarray] | None:
        rows = self.transform(index, record)
        if rows is None:
            return None
        out = whole_sequences(rows)
        out[preference.INDEX_KEY] = rows[preference.INDEX_KEY]
        out[SCORE_INDEX_KEY] = last_token_index(out["inputs"], out["segment_ids"], self.pad_id).astype(np.int32)
        where = record.get("_where") or f"{self.path or 'preference data'}: record {int(rows[preference.INDEX_KEY])}"
        out[MARGIN_KEY] = np.float32(record_margin(record, where))
        return out


def pair_rewards(model: base.ModelFns, params, batch: Mapping[str, jax.Array], frozen=None, rngs=None) -> jax.Array:
    """Rewards [P, 2] of a reward batch in one forward pass: padded [B, 2, T] pairs as [2B, T] rows
    (P = B), or packed [R, L] rows read at their [R, max_pairs, 2] score positions (P = R * max_pairs)."""
    rows = {k: batch[k].reshape(-1, batch[k].shape[-1]) for k in ROW_KEYS}
    scores = model(params, rows["inputs"], rows["positions"], rows["segment_ids"], frozen=frozen, rngs=rngs)
    index = batch[SCORE_INDEX_KEY].reshape(len(rows["inputs"]), -1)  # per row: one (padded) or 2 * max_pairs
    return jnp.take_along_axis(scores[..., 0], index, axis=1).astype(jnp.float32).reshape(-1, 2)


@base.register(scoring.REWARD_OBJECTIVE)
class RewardModel(pairs.PairObjective):
    """Bradley-Terry reward model on preference pairs (see the module docstring)."""

    @classmethod
    def config_section(cls):
        c = super().config_section()  # reference: auto or none (a reward model needs none)
        c.center_rewards_coefficient = 0.0  # TRL's reward centering (0: off; Eisenstein et al. suggest 0.01)
        return c

    @classmethod
    def reference_free(cls, section):
        return True

    @classmethod
    def validate(cls, config):
        super().validate(config)
        o = cls.section_of(config)
        if not o.center_rewards_coefficient >= 0:
            raise UserError(f"config key '{cls.key('center_rewards_coefficient')}' must be >= 0, got "
                            f"{o.center_rewards_coefficient}")
        if config.data.packing and config.data.pair_batching != "pairs":
            raise UserError(f"config key 'data.pair_batching' is {config.data.pair_batching!r}: a packed reward model "
                            "holds train.global_batch_size pairs per step; use 'pairs' (or data.packing=false)")
        if config.peft.method == "prefix":
            raise UserError("config key 'peft.method' is 'prefix': a reward model trains with lora, dora or full "
                            "fine-tuning (its score head is trained in full)")

    def adapt_model_config(self, model_config):
        return scoring.reward_head(model_config)

    def describe(self):
        c = self.section.center_rewards_coefficient
        return f"reward objective (Bradley-Terry{f', reward centering {c:g}' if c else ''}), reference: none"

    # ---- data --------------------------------------------------------------------------------

    def train_dataset(self, data, *, batch_size, process_index, process_count):
        """The pair tasks (data.tasks mixed, or data.train_path) as whole-sequence reward rows, padded:
        a reward is read at a row's last token, so data.packing does not apply."""
        c = self.config
        it, stats = datasets.preference_train_dataset(
            data, c.data, batch_size=batch_size, seed=c.seed, unpaired=False, process_index=process_index,
            process_count=process_count,
            wrap=lambda transform, task: RewardRows(transform, data.tokenizer.pad_id, c.data.train_path or task.name))
        self.pipeline_stats = stats.pipeline  # the padding `next_batch` cuts is taken off its count
        return it, stats

    def next_batch(self, state, data_iter, rng):
        """Packed: the step's rows padded to their bucket (as DPO's). Padded: the next pairs, their
        rows cut to the longest sequence of the step's length bucket."""
        if self.packs_steps():
            return super().next_batch(state, data_iter, rng)
        batch = next(data_iter)
        seq_len = batch["inputs"].shape[-1]
        longest = int(np.max(np.sum(batch["segment_ids"] > 0, axis=-1), initial=0))
        length = step_shapes.length_bucket(step_shapes.agreed_max(longest, "reward_length"), seq_len)
        stats = getattr(self, "pipeline_stats", None)
        if stats is not None:
            stats.slots -= batch["segment_ids"].size // seq_len * (seq_len - length)
        return step_shapes.cut_length(batch, ROW_KEYS, length)

    def batch_shapes(self, batch_size, *, packed: bool | None = None):
        """The largest batch a step takes: padded rows of data.seq_len (`next_batch` cuts most steps
        shorter), or packed rows of 2 * data.seq_len with one pair each (most steps take fewer rows)."""
        d = self.config.data
        packed = d.packing if packed is None else packed
        rows = (batch_size, pair_packing.row_length(d.seq_len)) if packed else (batch_size, 2, d.seq_len)
        pair = (batch_size, d.max_pairs_per_row) if packed else (batch_size,)
        shapes = {k: jax.ShapeDtypeStruct(rows, jnp.int32) for k in ROW_KEYS}
        if packed:
            shapes[batch_lib.PAIR_MASK_KEY] = jax.ShapeDtypeStruct(pair, jnp.int32)
        shapes[preference.INDEX_KEY] = jax.ShapeDtypeStruct(pair, jnp.int32)
        shapes[SCORE_INDEX_KEY] = jax.ShapeDtypeStruct(pair + (2,), jnp.int32)
        shapes[MARGIN_KEY] = jax.ShapeDtypeStruct(pair, jnp.float32)
        return shapes

    def start(self, run):
        """No reference to precompute; packed steps keep every device's rows whole."""
        self.keep_rows_whole(run)

    # ---- the loss ----------------------------------------------------------------------------

    def loss(self, model, params, batch, *, frozen=None, rng=None, ref_params=None):
        rngs = None if rng is None else {"dropout": rng}
        rewards = pair_rewards(model, params, batch, frozen=frozen, rngs=rngs)
        losses, metrics = bradley_terry_loss(rewards[:, 0], rewards[:, 1], batch[MARGIN_KEY].reshape(-1),
                                             center_rewards_coefficient=self.section.center_rewards_coefficient)
        valid = pairs.pair_mask(batch)  # packed: the real pairs (an empty slot adds nothing, no gradient)
        if valid is not None:
            losses = jnp.where(valid, losses, 0.0)
            metrics = {k: jnp.where(valid, v, 0.0) for k, v in metrics.items()}
        total = jnp.sum(losses)
        return total, dict({k: jnp.sum(v) for k, v in metrics.items()}, loss=total)

    # ---- held-out pairs ----------------------------------------------------------------------

    def eval_set(self, data):
        """Held-out pairs of data.eval_path, as reward rows (every pair, in file order)."""
        c = self.config
        if not c.data.eval_path:
            return None
        source = datasets.single_set(loading.data_settings(c), "eval")  # JSONL, or a 🤗 dataset split
        transform = RewardRows(preference.PreferenceTransform(
            source, data.train_templates, data.tokenizer, seq_len=c.data.seq_len, truncation="truncate", seed=c.seed,
            chat_template=data.chat_template), data.tokenizer.pad_id, c.data.eval_path)
        rows = [r for r in (transform(i, source[i]) for i in range(len(source))) if r is not None]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]} if rows else None

    def evaluate(self, model, variables, tokenizer, eval_set, *, show=0, printer=print):
        """Pairwise accuracy, mean margin and loss of the held-out pairs (bucketed batches of 16)."""
        del tokenizer, show, printer
        variables = variables if "params" in variables else {"params": variables}  # a bare params tree
        apply = jax.jit(lambda v, b: pair_rewards(
            lambda p, tokens, positions, segment_ids, frozen=None, rngs=None: model.apply(
                p, tokens, positions=positions, segment_ids=segment_ids), v, b))
        n = len(eval_set[MARGIN_KEY])
        size = 16
        rewards = []
        for start in range(0, n, size):
            chunk = {k: v[start:start + size] for k, v in eval_set.items()}
            pad = size - len(chunk[MARGIN_KEY])
            chunk = {k: np.concatenate([v, np.repeat(v[-1:], pad, axis=0)]) if pad else v for k, v in chunk.items()}
            rewards.append(np.asarray(apply(variables, {k: jnp.asarray(v) for k, v in chunk.items()}))[:size - pad])
        rewards = jnp.asarray(np.concatenate(rewards))
        losses, metrics = bradley_terry_loss(rewards[:, 0], rewards[:, 1], jnp.asarray(eval_set[MARGIN_KEY]),
                                             center_rewards_coefficient=self.section.center_rewards_coefficient)
        scores = {k: float(jnp.mean(v)) for k, v in metrics.items()}
        scores.update(loss=float(jnp.mean(losses)), pairs=float(n))
        return scores
