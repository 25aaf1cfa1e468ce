"""PPO with a value model (`objective.type='ppo'`): InstructGPT-style RLHF on rollouts of the current policy.

Settings are `objective.ppo.*`. Prompts, sampling and scoring are GRPO's (this class extends it):
the built-in verifiable problems or JSONL prompt records, completions sampled from the train
state's own variables (LoRA adapters over the frozen base included), scores from
`objective.ppo.rewards` (built-in verifiers, `module:function`, or a trained reward model as
`reward_model:<dir>`), summed with `reward_weights`. One completion per prompt.

The value model (`value_model`): 'shared' (default) is a scalar `value_head` on the policy's own
backbone (the model config's `value_head`, set here): one forward pass gives the log-probs and the
values; under LoRA the backbone's adapters serve both heads and the value head is trained in full
(as a reward model's score head), starting from the seed's init. 'separate' is InstructGPT's: a
value model on a backbone of its own (the model config's `value_backbone`; params["value_model"],
a reward model's shape) started from `value_init` (value_init.py): 'policy' copies the policy's
start backbone (the SFT model), a directory loads a reward model (a jaxtune reward run or an
exported *ForSequenceClassification). It costs a second backbone pass per step and a second
backbone in memory: its weights, gradients and optimizer state under full fine-tuning; under PEFT
a second frozen backbone in the base (also when copied from the policy: the copy is its own
buffer) and its own adapters (the interceptor keys them by module path).

The KL coefficient (`kl_controller`): 'fixed' (default) keeps `kl_coef`; 'adaptive' is Ziegler et
al.'s controller (TRL's AdaptiveKLController, ppo_loss.adaptive_kl_coef): after each rollout,
``kl_coef *= 1 + clip(KL / kl_target - 1, -0.2, 0.2) * n / kl_horizon`` with KL the mean summed
KL of the rollout's n completions over all processes. Its value is saved beside each checkpoint
(Objective.checkpoint_state), so a resumed run continues bitwise; `objective/kl_coef` logs it.

Every `num_ppo_epochs * num_mini_batches` steps `next_batch` samples `num_prompts` completions per
process, scores them (minus `missing_eos_penalty` for a completion without EOS), and computes
with the sampling policy's log-probs, the reference's and the values (one pass each) the targets
of ppo_loss.py (formula table there): the per-token KL (k1/k3; the coefficient above) folded into the
reward, the score one position after the last token (TRL's convention: each example carries
its last token as one more input, whose value is the finished sequence's), GAE(gamma, lam), and
advantages whitened over the completion tokens of every process (one process: TRL's whitening of
its batch; several: the moments gathered, so the result does not depend on the process count). The
rollout rows are then trained on for `num_ppo_epochs` epochs, each a fresh shuffle of the rows
(a pure function of the seed, the rollout's step and the epoch) in `num_mini_batches` optimizer
steps of `train.global_batch_size` rows. The loss is the clipped policy loss plus `vf_coef`
times the clipped value loss, token means over each mini-batch of every process.

The reference is the start weights (a copy, materialised once) or, under LoRA, the base without
adapters. Metrics are TRL's names (ppo_loss.METRIC_NAMES); `policy/entropy_avg` and
`objective/entropy` are the sampled tokens' negative log-probs (an entropy estimate).
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxtune import distributed, loading, sharding
from jaxtune.errors import UserError
from jaxtune.objectives import base, grpo, ppo_loss, value_init
from jaxtune.rewards import RewardSet
from jaxtune.rollouts import Rollout, build_rows, place_examples, rows_needed

# Rollout metrics carried in batch["rollout_stats"] (per-row shares of the rollout's values).
ROLLOUT_STATS = (
    "objective/kl_coef", "objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
    "objective/scores",
    "val/num_eos_tokens", "rollout/accuracy", "rollout/completion_len", "rollout/sampling_time_s",
    # the colocated step's time split (benchmarks/ppo_step.py): sampling_time_s includes the scoring;
    # value_time_s is the rollout's policy/value and reference passes and its targets; learner_time_s
    # the train steps on the previous rollout (0 at the first)
    "rollout/scoring_time_s", "rollout/value_time_s", "rollout/learner_time_s",
)
_SUMMED_OVER_PROCESSES = ("val/num_eos_tokens",)  # a count, not a mean
_LOSS_METRICS = ("loss/policy_avg", "loss/value_avg", "policy/clipfrac_avg", "val/clipfrac_avg",
                 "policy/approxkl_avg", "val/ratio", "val/ratio_sq", "policy/entropy_avg")
KL_CONTROLLERS = ("fixed", "adaptive")
VALUE_MODELS = ("shared", "separate")
_ROW_KEYS = ("old_logps", "advantages", "returns", "old_values", "value_mask")


@base.register("ppo")
class PPO(grpo.GRPO):
    """PPO with a value head on the policy's backbone (see the module docstring)."""

    def __init__(self, config):
        base.Objective.__init__(self, config)
        self.rewards = RewardSet.from_specs(list(self.section.rewards), list(self.section.reward_weights))
        self.stat_names = ROLLOUT_STATS
        self.summed_metrics = tuple(ROLLOUT_STATS)
        self.kl_coef = float(self.section.kl_coef)  # the adaptive controller's state (fixed: constant)

    @classmethod
    def config_section(cls):
        c = ml_collections.ConfigDict()
        c.reference = "auto"  # the KL's reference: auto (LoRA: base, else copy) | copy | base
        c.format = "fields"  # JSONL prompt records, as objective.grpo.format
        c.prompt_template = "{prompt}"
        c.rewards = ("math", "instructions")  # built-in names, 'module.path:function' or 'reward_model:<dir>'
        c.reward_weights = ()
        c.num_prompts = 8  # completions per rollout (per process), one per prompt
        c.max_completion_tokens = 32
        c.temperature = 1.0
        c.top_p = 1.0
        c.top_k = 0
        c.value_model = "shared"  # shared: a value head on the policy's backbone | separate: its own backbone
        c.value_init = "policy"  # separate: 'policy' (the start weights' backbone) | a reward model (run or HF dir)
        c.kl_coef = 0.05  # TRL's default; with kl_controller 'adaptive' the initial coefficient
        c.kl_controller = "fixed"  # fixed | adaptive (Ziegler et al.; TRL's AdaptiveKLController)
        c.kl_target = 6.0  # adaptive: the summed per-completion KL the coefficient steers towards
        c.kl_horizon = 10000.0  # adaptive: completions over which a 20% error changes the coefficient by 20%
        c.kl_estimator = "k1"  # k1 | k3 (ppo_loss.py)
        c.gamma = 1.0
        c.lam = 0.95
        c.whiten_rewards = False
        c.cliprange = 0.2
        c.cliprange_value = 0.2
        c.vf_coef = 0.1
        c.num_ppo_epochs = 4
        c.num_mini_batches = 1  # optimizer steps per epoch; a rollout has num_mini_batches * global_batch_size rows
        c.missing_eos_penalty = ml_collections.FieldReference(None, field_type=float)  # subtracted from the score
        c.sample_every = 0
        c.eval_samples = 4
        return c

    @classmethod
    def validate(cls, config):
        s = cls.section_of(config)
        checks = [
            (s.format in grpo.PROMPT_FORMATS, "format", f"one of {', '.join(grpo.PROMPT_FORMATS)}"),
            (s.num_prompts >= 1, "num_prompts", ">= 1"),
            (s.eval_samples >= 1, "eval_samples", ">= 1"),
            (s.max_completion_tokens >= 1, "max_completion_tokens", ">= 1"),
            (s.temperature > 0, "temperature", "> 0 (rollouts are sampled)"),
            (0 < s.top_p <= 1, "top_p", "in (0, 1]"),
            (s.top_k >= 0, "top_k", ">= 0"),
            (s.kl_coef >= 0, "kl_coef", ">= 0"),
            (s.value_model in VALUE_MODELS, "value_model", f"one of {', '.join(VALUE_MODELS)}"),
            (s.value_model == "separate" or s.value_init == "policy", "value_init",
             "'policy' with value_model 'shared' (a reward model's weights need value_model 'separate')"),
            (s.kl_controller in KL_CONTROLLERS, "kl_controller", f"one of {', '.join(KL_CONTROLLERS)}"),
            (s.kl_controller == "fixed" or s.kl_coef > 0, "kl_coef",
             "> 0 with kl_controller 'adaptive' (it scales the coefficient)"),
            (s.kl_target > 0, "kl_target", "> 0"),
            (s.kl_horizon > 0, "kl_horizon", "> 0"),
            (s.kl_estimator in ppo_loss.KL_ESTIMATORS, "kl_estimator", f"one of {', '.join(ppo_loss.KL_ESTIMATORS)}"),
            (0 < s.gamma <= 1, "gamma", "in (0, 1]"),
            (0 <= s.lam <= 1, "lam", "in [0, 1]"),
            (0 < s.cliprange < 1, "cliprange", "in (0, 1)"),
            (s.cliprange_value > 0, "cliprange_value", "> 0"),
            (s.vf_coef >= 0, "vf_coef", ">= 0"),
            (s.num_ppo_epochs >= 1, "num_ppo_epochs", ">= 1"),
            (s.num_mini_batches >= 1, "num_mini_batches", ">= 1"),
            (s.missing_eos_penalty is None or s.missing_eos_penalty >= 0, "missing_eos_penalty", ">= 0 or None"),
            (s.reference in ("auto", "copy", "base"), "reference", "auto, copy or base"),
        ]
        cls.check_keys(config, checks)
        if s.reference == "base" and config.peft.method == "none":
            raise UserError(f"config key '{cls.key('reference')}' is 'base': that needs peft.method (the base without "
                            "adapters); use 'copy' or 'auto' for full fine-tuning")
        cls.check_rollout_cycle(config, "num_ppo_epochs", "num_mini_batches")
        if s.value_model == "separate" and s.value_init != "policy":
            value_init.check_source(s.value_init, cls.key("value_init"))
        cls.validate_prompts(config)
        RewardSet.from_specs(list(s.rewards), list(s.reward_weights))  # names and weights resolve now

    def adapt_model_config(self, model_config):
        if not hasattr(model_config, "value_head"):
            raise UserError(f"objective.type 'ppo' puts a value head on a decoder-only model; "
                            f"{type(model_config).__name__} has none")
        return model_config.replace(value_head=True, value_backbone=self.section.value_model == "separate")

    @property
    def adapts_start_weights(self):
        return self.section.value_model == "separate"

    def adapt_start_weights(self, weights, setup, *, frozen_base):
        """The separate value model's start: the policy's backbone (value_init 'policy'; the value
        head keeps the seed's init) or a reward model's weights (value_init a directory)."""
        if not self.adapts_start_weights:
            return weights
        return value_init.start_value_model(weights, self.section.value_init, setup, key=self.key("value_init"),
                                            frozen_base=frozen_base, peft=loading.peft_spec(self.config))

    def kl_reference(self) -> str:
        if self.section.reference != "auto":
            return self.section.reference
        return "base" if self.config.peft.method != "none" else "copy"

    def reference_kind(self):
        return "none"  # the KL is scored at rollout time (into the rewards): the loss needs no reference

    # ---- rows --------------------------------------------------------------------------------

    def batch_shapes(self, batch_size):
        t = self.config.data.seq_len
        shapes = {k: jax.ShapeDtypeStruct((batch_size, t), jnp.int32)
                  for k in ("inputs", "targets", "loss_mask", "segment_ids", "positions")}
        shapes.update({k: jax.ShapeDtypeStruct((batch_size, t), jnp.float32) for k in _ROW_KEYS})
        shapes["inv_tokens"] = jax.ShapeDtypeStruct((batch_size, 2), jnp.float32)
        shapes["rollout_stats"] = jax.ShapeDtypeStruct((batch_size, len(self.stat_names)), jnp.float32)
        return shapes

    def _rows_per_rollout(self, batch_size: int) -> int:
        return batch_size * self.section.num_mini_batches

    def _check_fit(self, records) -> None:
        s, d = self.section, self.config.data
        longest = max((len(self.prompt_ids(self.tokenizer, r)) for r in records), default=0)
        example_len = longest + s.max_completion_tokens  # the last token is an input too (its value)
        rows = self._rows_per_rollout(self.config.train.global_batch_size // jax.process_count())
        need = rows_needed(s.num_prompts, example_len=example_len, seq_len=d.seq_len, packing=d.packing)
        if example_len > d.seq_len or need > rows:
            raise UserError(
                f"PPO: {s.num_prompts} completions of up to {example_len} tokens (longest prompt {longest} + "
                f"objective.ppo.max_completion_tokens {s.max_completion_tokens}) need {need} rows of "
                f"data.seq_len={d.seq_len} tokens{' (packed)' if d.packing else ' (one per row)'}, but a rollout has "
                f"train.global_batch_size * objective.ppo.num_mini_batches = {rows}; raise those, data.seq_len, or "
                "lower objective.ppo.num_prompts")

    # ---- loss --------------------------------------------------------------------------------

    def weight(self, batch):
        return jnp.float32(1.0)  # the loss terms carry their mini-batch's token weights (inv_tokens)

    def loss(self, model, params, batch, *, frozen=None, rng=None, ref_params=None):
        s = self.section
        rngs = None if rng is None else {"dropout": rng}
        stats, values = model.token_stats_and_values(params, batch, frozen=frozen, rngs=rngs, temperature=s.temperature)
        targets = {"old_logps": batch["old_logps"], "advantages": batch["advantages"], "returns": batch["returns"],
                   "values": batch["old_values"], "mask": batch["loss_mask"].astype(jnp.float32),
                   "value_mask": batch["value_mask"]}
        weights = batch["inv_tokens"][0]  # 1 / the mini-batch's (completion, value) tokens, the same in every row
        loss, metrics = ppo_loss.ppo_losses(stats.logp, values, targets, cliprange=s.cliprange,
                                            cliprange_value=s.cliprange_value, vf_coef=s.vf_coef,
                                            token_weight=weights[0], value_weight=weights[1],
                                            entropy=-stats.logp)
        rollout = jnp.sum(batch["rollout_stats"], axis=0)
        metrics.update({k: rollout[i] for i, k in enumerate(self.stat_names)})
        return loss, metrics

    # ---- rollouts ----------------------------------------------------------------------------

    def start(self, run):
        self.run = run
        self.tokenizer = run.data.tokenizer
        self._cache = None
        self._rollout_done: float | None = None  # when the last rollout's batches were ready
        self._check_fit(run.data.train[:1000])
        apply_fn, temperature = run.setup.apply_fn, self.section.temperature

        def policy(params, frozen, rows):
            stats, values = apply_fn.token_stats_and_values(params, rows, frozen=frozen, temperature=temperature)
            return stats.logp, values

        self._policy = jax.jit(policy)
        self._logps = jax.jit(lambda params, frozen, rows: apply_fn.token_stats(params, rows, frozen=frozen,
                                                                                 temperature=temperature).logp)
        self._reference = None
        if self.section.kl_coef and self.kl_reference() == "copy":  # the policy's weights (no value model)
            self._reference = {k: v for k, v in run.start_params().items() if k != value_init.VALUE_MODEL}

    def plan_memory(self, setup, *, num_processes):
        """The frozen reference copy (full fine-tuning with a KL) and the rollout sampler's KV cache."""
        s, cfg = self.section, setup.model_config
        out = {}
        if s.kl_coef and self.kl_reference() == "copy":
            policy = {k: v for k, v in setup.abstract_state.params.items() if k != value_init.VALUE_MODEL}
            shardings = {k: setup.state_shardings.params[k] for k in policy}
            out["reference copy"] = (sum(math.prod(sh.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                                         for x, sh in zip(jax.tree.leaves(policy), jax.tree.leaves(shardings))), "always")
        rows = s.num_prompts * num_processes
        shards = math.prod(setup.mesh.shape[a] for a in sharding.BATCH_AXES if a in setup.mesh.shape)
        per_device_rows = rows // shards if rows % shards == 0 else rows  # rows split over the batch axes, or not
        head_dim = getattr(cfg, "resolved_head_dim", None) or cfg.hidden_size // cfg.num_heads
        per_token = cfg.num_layers * (2 * cfg.num_kv_heads * head_dim * np.dtype(cfg.dtype).itemsize + 4)  # k, v, segment
        out["rollout KV cache"] = (per_device_rows * self.config.data.seq_len * per_token, "sampling")
        return out

    def checkpoint_state(self):
        return {"kl_coef": self.kl_coef} if self.section.kl_controller == "adaptive" else None

    def restore_checkpoint_state(self, saved):
        if self.section.kl_controller == "adaptive" and "kl_coef" in saved:
            self.kl_coef = float(saved["kl_coef"])

    def _update_kl_coef(self, kl_sums: np.ndarray) -> None:
        """After a rollout: the adaptive controller's step on the mean summed KL of every process's
        completions (the same on all processes, so they keep one coefficient)."""
        if self.section.kl_controller != "adaptive":
            return
        local = [float(np.sum(kl_sums)), float(len(kl_sums))]
        total, count = np.sum(distributed.all_gather([local], "ppo/kl"), axis=0)[0]
        self.kl_coef = ppo_loss.adaptive_kl_coef(self.kl_coef, float(total / count), target=self.section.kl_target,
                                                 horizon=self.section.kl_horizon, num_samples=int(count))

    def next_batch(self, state, data_iter, rng):
        s = self.section
        step = int(jax.device_get(state.step))
        cycle = s.num_ppo_epochs * s.num_mini_batches
        if self._cache is None or step % cycle == 0:
            self._cache = self._rollout_batches(state, data_iter, rng, step)
        return self._cache[step % cycle]

    def _rollout_batches(self, state, data_iter, rng, step) -> list[dict[str, np.ndarray]]:
        s, d = self.section, self.config.data
        jax.block_until_ready(state.params)  # the dispatched steps finish here: they count as learning
        t0 = time.perf_counter()
        learner_s = t0 - self._rollout_done if self._rollout_done is not None else 0.0
        records = next(data_iter)
        seed = int(jax.random.randint(rng, (), 0, 2**31 - 1))
        rollouts, _, scores, parts = self.sample(self.run.setup.model, self.run.model_variables(state), self.tokenizer,
                                                 records, group_size=1, seed=seed, temperature=s.temperature,
                                                 per_process=True)
        sample_s = time.perf_counter() - t0
        scoring_s = self.last_scoring_s
        has_eos = np.array([bool(r.completion_ids) and r.completion_ids[-1] == self.tokenizer.eos_id for r in rollouts])
        scores = np.asarray(ppo_loss.penalise_missing_eos(jnp.asarray(scores, jnp.float32), jnp.asarray(has_eos),
                                                          s.missing_eos_penalty))
        examples = [_example(r, seq_len=d.seq_len) for r in rollouts]
        local_rows = self.config.train.global_batch_size // jax.process_count()
        try:
            rows = build_rows(examples, rows=self._rows_per_rollout(local_rows), seq_len=d.seq_len, packing=d.packing)
            places = place_examples([len(e["inputs"]) for e in examples], rows=len(rows["inputs"]), seq_len=d.seq_len,
                                    packing=d.packing)
        except ValueError as e:
            raise UserError(f"PPO rollouts: {e}. objective.ppo.num_prompts completions must fit in "
                            "train.global_batch_size * objective.ppo.num_mini_batches rows of data.seq_len tokens: "
                            "raise those or lower num_prompts") from None
        # Completion position t of rollout i is row position start + (prompt length - 1) + t.
        offsets = [(row, start + len(r.prompt_ids) - 1) for r, (row, start) in zip(rollouts, places)]
        lengths = np.array([len(r.completion_ids) for r in rollouts])
        max_len = s.max_completion_tokens
        old_logps, values = self._per_row_outputs(self._policy, state.params, state.frozen, rows)
        ref_logps = old_logps
        if s.kl_coef:
            ref_params = self._reference if self.kl_reference() == "copy" else state.frozen
            ref_logps = self._logps_of(ref_params, None, rows)
        gathered = [_gather(x, offsets, max_len) for x in (old_logps, ref_logps, values)]
        targets = ppo_loss.rollout_targets(jnp.asarray(scores), *(jnp.asarray(g) for g in gathered), jnp.asarray(lengths),
                                           kl_coef=self.kl_coef, kl_estimator=s.kl_estimator, gamma=s.gamma, lam=s.lam,
                                           whiten_rewards=s.whiten_rewards,
                                           moments=_global_moments if jax.process_count() > 1 else None)
        targets = {k: np.asarray(v) for k, v in targets.items()}
        value_s = time.perf_counter() - t0 - sample_s
        rows["old_logps"] = old_logps
        for key, source in (("advantages", "advantages"), ("returns", "returns"), ("old_values", "values"),
                            ("value_mask", "value_mask")):
            rows[key] = _scatter(targets[source], offsets, rows["inputs"].shape)
        metrics = ppo_loss.rollout_metrics(jnp.asarray(scores), jnp.asarray(gathered[0]), jnp.asarray(targets["kl"]),
                                           jnp.asarray(targets["mask"]), kl_coef=self.kl_coef,
                                           num_eos_tokens=int(has_eos.sum()))
        stats = {k: float(v) for k, v in metrics.items()}
        stats["objective/kl_coef"] = self.kl_coef  # the coefficient this rollout's rewards used
        self._update_kl_coef(np.sum(targets["kl"] * targets["mask"], axis=1))
        stats.update({"rollout/accuracy": grpo._accuracy([parts]), "rollout/completion_len": float(lengths.mean()),
                      "rollout/sampling_time_s": sample_s, "rollout/scoring_time_s": scoring_s,
                      "rollout/value_time_s": value_s, "rollout/learner_time_s": learner_s})
        if s.sample_every and step % s.sample_every == 0 and jax.process_index() == 0:
            self._dump(step, [(rollouts, [self.prompt_text(r) for r in records], scores, parts, None)])
        batches = self._epochs(rows, local_rows, stats, step)
        self._rollout_done = time.perf_counter()
        return batches

    def _epochs(self, rows, local_rows, stats, step) -> list[dict[str, np.ndarray]]:
        """The rollout rows as num_ppo_epochs shuffles of num_mini_batches mini-batches, each with its
        global token weights and the rollout metrics' per-row shares."""
        s = self.section
        processes = jax.process_count()
        share = np.array([stats[k] / (local_rows * (1 if k in _SUMMED_OVER_PROCESSES else processes))
                          for k in self.stat_names], np.float32)
        orders = [np.random.default_rng([self.config.seed, step, epoch]).permutation(len(rows["inputs"]))
                  for epoch in range(s.num_ppo_epochs)]
        minis = [order[i * local_rows : (i + 1) * local_rows] for order in orders for i in range(s.num_mini_batches)]
        local = [[float(rows["loss_mask"][m].sum()), float(rows["value_mask"][m].sum())] for m in minis]
        total = np.sum(distributed.all_gather(local, "ppo/tokens"), axis=0)
        batches = []
        for m, (tokens, value_tokens) in zip(minis, total):
            batch = {k: v[m] for k, v in rows.items()}
            weights = [1.0 / max(tokens, 1.0), 1.0 / max(value_tokens, 1.0)]
            batch["inv_tokens"] = np.tile(np.array(weights, np.float32), (local_rows, 1))
            batch["rollout_stats"] = np.tile(share, (local_rows, 1))
            batches.append(batch)
        return batches

    def describe(self):
        s = self.section
        coef = (f"adaptive kl_coef from {s.kl_coef:g} (target {s.kl_target:g}, horizon {s.kl_horizon:g})"
                if s.kl_controller == "adaptive" else f"kl_coef={s.kl_coef:g}")
        kl = f"KL {s.kl_estimator} {coef} in the reward to the {self.kl_reference()} reference"
        return (f"PPO: {s.num_prompts} completions per rollout, {s.num_ppo_epochs} epochs x {s.num_mini_batches} "
                f"mini-batches, GAE(gamma={s.gamma:g}, lam={s.lam:g}), clip {s.cliprange:g} / value clip "
                f"{s.cliprange_value:g}, vf_coef={s.vf_coef:g}, {kl}; {self._value_model_text()}; "
                f"rewards {', '.join(self.rewards.names)}")


    def _value_model_text(self) -> str:
        s = self.section
        if s.value_model == "shared":
            return "value head on the policy's backbone"
        source = "the policy's start weights" if s.value_init == "policy" else s.value_init
        return f"value model on its own backbone from {source}"


def _global_moments(x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """masked_moments over every process's rollout (mean, then the centred sum of squares, gathered):
    the whitening then depends on the global rollout only, not on how processes split it."""
    total, count = np.sum(distributed.all_gather([[float(jnp.sum(x * mask)), float(jnp.sum(mask))]], "ppo/mean"),
                          axis=0)[0]
    mean = total / max(count, 1.0)
    squares = sum(distributed.all_gather(float(jnp.sum(jnp.square(x - mean) * mask)), "ppo/var"))
    return jnp.float32(mean), jnp.float32(squares / max(count - 1.0, 1.0))


def _example(rollout: Rollout, *, seq_len: int) -> dict[str, np.ndarray]:
    """One completion's row: every token an input (the last one's value is the finished sequence's),
    the next token its target, the completion's tokens trained."""
    tokens = rollout.prompt_ids + rollout.completion_ids
    if len(tokens) > seq_len:
        raise UserError(f"PPO: a prompt of {len(rollout.prompt_ids)} tokens and its completion of "
                        f"{len(rollout.completion_ids)} do not fit data.seq_len={seq_len}; raise data.seq_len")
    n = len(tokens)
    inputs = np.array(tokens, np.int32)
    targets = np.zeros(n, np.int32)
    targets[:-1] = tokens[1:]
    loss_mask = np.zeros(n, np.int32)
    loss_mask[len(rollout.prompt_ids) - 1 : n - 1] = 1
    return {"inputs": inputs, "targets": targets, "loss_mask": loss_mask,
            "advantages": np.zeros(n, np.float32)}


def _gather(x: np.ndarray, offsets, max_len: int) -> np.ndarray:
    """Row-layout [R, T] -> completion-aligned [N, max_len] (positions past a row's end read 0)."""
    out = np.zeros((len(offsets), max_len), np.float32)
    for i, (row, start) in enumerate(offsets):
        part = x[row, start : start + max_len]
        out[i, : len(part)] = part
    return out


def _scatter(x: np.ndarray, offsets, shape) -> np.ndarray:
    """Completion-aligned [N, L] -> row layout (`shape`), each completion at its row offset."""
    out = np.zeros(shape, np.float32)
    for i, (row, start) in enumerate(offsets):
        n = min(x.shape[1], shape[1] - start)
        out[row, start : start + n] += x[i, :n]
    return out

