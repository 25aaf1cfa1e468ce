"""GRPO and its variants (Dr. GRPO, DAPO, GSPO): RL with verifiable rewards on sampled completions.

Settings are `objective.grpo.*` (below: `objective.` for short). Prompts come from the shared data
settings: the built-in verifiable problems (`data.builtin='verifiable'`) or JSONL records
(`data.train_path`, held out: `data.eval_path`; `objective.grpo.format='gsm8k'` for GSM8K records).

Every `objective.steps_per_rollout * objective.num_iterations` steps, `next_batch` takes
`objective.grpo.num_prompts` prompts from the data, samples `objective.grpo.num_generations` completions
of each with the *current* policy (the train state's own variables; a LoRA/DoRA run's adapters
folded into its float base for the decode loop, `rollouts.sampling_policy`; a quantised base as held), scores them with the reward functions
(`objective.grpo.rewards`, summed with `objective.grpo.reward_weights`), turns rewards into group-relative
advantages and the completions into training rows (packed with segment ids when
`data.packing`). The rows are split into `steps_per_rollout` mini-batches of
`train.global_batch_size` rows, each trained on `num_iterations` times; with more than one pass
the sampling policy's log-probs are kept (`old_logps`) for the clipped ratio. The loss math and
its formula table are in grpo_loss.py.

Variants are settings: GRPO (defaults), Dr. GRPO (`scale_rewards=False, aggregation='constant'`),
DAPO (`clip_high=0.28, aggregation='token_mean', dynamic_sampling=True, overlong_cache=...`),
GSPO (`importance='sequence'` with a small clip range, e.g. 3e-4 / 4e-4). RLOO and REINFORCE++ are
advantage estimators (`advantage_estimator='rloo'|'reinforce_pp'`, advantages.py): the same
rollouts and rewards, with the KL of the sampling policy to the reference folded into the reward
at rollout time (scored here, so the loss needs no reference) instead of added to the loss.

The rollout randomness is a pure function of (`seed`, step), and the prompt stream is the
checkpointed data iterator, so a resumed run samples what the uninterrupted run sampled (exactly
so when the checkpoint falls at the start of a rollout cycle; see `validate`).

Several processes (multi-host): each process draws its own `num_prompts` prompts (its shard of
the data), the prompts of all processes are gathered and sampled in one SPMD call on the whole
mesh (the sampler's input must be identical everywhere), and each process keeps, scores and
normalises its own groups: a group never spans processes, so GRPO's advantages need no communication
(the batch-wide whitening of RLOO / REINFORCE++ gathers two moments per process).
Each process then packs its groups into its rows of the global batch.
Rollout metrics (rewards per function, accuracy, lengths, zero-spread groups, sampling time and
throughput) ride in the batch as per-row shares and come out of the step as plain totals; the
reward/accuracy/length metrics describe the first round of sampling (the policy as it is), not
the groups dynamic sampling kept.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxtune import distributed, loading, paths, workdir as workdir_lib
from jaxtune.data import chat, datasets
from jaxtune.data.builtin import verifiable
from jaxtune.data.formats import check_message_list
from jaxtune.data.gsm8k import parse_gsm8k
from jaxtune.data.sources import SourceError
from jaxtune.data.templates import render
from jaxtune.data.tokenizers import encode_prompt, encode_with_specials, start_sequence
from jaxtune.errors import UserError
from jaxtune.objectives import advantages as advantages_lib, base, grpo_loss
from jaxtune.rewards import RewardSet
from jaxtune.rollouts import (build_rows, completion_positions, rollout_example, rows_needed, sample_groups,
                              sampling_policy)

PROMPT_FORMATS = ("fields", "gsm8k")  # objective.grpo.format of JSONL prompt records
# Host-side rollout metrics, carried as per-row shares in batch["rollout_stats"] (column order).
ROLLOUT_STATS = (
    "reward", "reward_std", "accuracy", "zero_spread_groups", "completion_len", "completion_len_max",
    "truncated", "rollout_tokens_per_s", "sampling_time_s", "sampling_fraction", "learner_tokens_per_s",
)
_TOKEN_METRICS = ("kl", "clip_low", "clip_high", "ratio", "entropy")


@dataclasses.dataclass
class PromptData:
    tokenizer: Any
    train: list[dict]
    heldout: list[dict]


@dataclasses.dataclass
class EvalSet:
    records: list[dict]

    def __bool__(self):
        return bool(self.records)


@base.register("grpo")
class GRPO(base.Objective):
    """Group-relative policy optimisation on rollouts of the current policy (see module docstring)."""

    def __init__(self, config):
        super().__init__(config)
        self.rewards = RewardSet.from_specs(list(self.section.rewards), list(self.section.reward_weights))
        # Per reward function: mean and std over the completions it applies to.
        kl = ("kl",) if self.kl_in_reward else ()  # the KL folded into the reward (RLOO, REINFORCE++)
        self.stat_names = ROLLOUT_STATS + kl + tuple(f"{stat}/{n}" for n in self.rewards.names for stat in ("reward", "reward_std"))
        self.summed_metrics = ("trained_tokens", "completions", *_TOKEN_METRICS, *(f"rollout/{k}" for k in self.stat_names))

    @classmethod
    def config_section(cls):
        c = ml_collections.ConfigDict()
        c.beta = ml_collections.FieldReference(None, field_type=float)  # GRPO: KL weight; None = 0 (no reference)
        c.reference = "auto"
        # JSONL prompt records (data.train_path / data.eval_path): fields (rendered with prompt_template,
        # or chat `messages`) | gsm8k (question/answer records: prompt, solution and answer fields)
        c.format = "fields"
        c.prompt_template = "{prompt}"  # how a record becomes the prompt text ({field} placeholders)
        c.rewards = ("math", "instructions")  # built-in names or 'module.path:function'
        c.reward_weights = ()  # () = 1.0 each
        c.num_generations = 8  # G: completions per prompt
        c.num_prompts = 8  # prompts per rollout (per process)
        c.max_completion_tokens = 32
        c.temperature = 1.0  # rollout sampling; the learner's log-probs are of softmax(logits / temperature) too
        c.top_p = 1.0
        c.top_k = 0  # 0 = off
        # grpo | rloo (leave-one-out baseline) | reinforce_pp (REINFORCE++: token-level returns, batch-whitened);
        # rloo and reinforce_pp fold the KL (kl_estimator of the sampling policy) into the reward (advantages.py)
        c.advantage_estimator = "grpo"
        c.normalize_advantages = False  # rloo: whiten the advantages over the whole rollout batch (TRL's option)
        c.gamma = 1.0  # reinforce_pp: discount of the token-level returns
        c.scale_rewards = True  # grpo: divide advantages by the group std (Dr. GRPO: False)
        c.negative_advantage_scale = 1.0  # weight of negative advantages; 0 = positive only (RAFT-style)
        c.aggregation = "sequence_mean"  # sequence_mean (GRPO) | token_mean (DAPO) | constant (Dr. GRPO)
        c.importance = "token"  # token (GRPO) | sequence (GSPO)
        c.clip_low = 0.2
        c.clip_high = 0.2  # DAPO clip-higher: 0.28
        c.kl_estimator = "k3"
        c.num_iterations = 1  # optimisation passes over each rollout batch
        c.steps_per_rollout = 1  # mini-batches (optimizer steps) per rollout batch
        c.dynamic_sampling = False  # DAPO: replace zero-spread groups by groups of new prompts
        c.max_resample_rounds = 3
        c.overlong_cache = 0  # DAPO soft overlong punishment over the last N tokens (0 = off)
        c.sample_every = 0  # write sampled completions to WORKDIR/samples/step_N.jsonl every N steps
        c.eval_samples = 4  # held-out eval: sampled completions per prompt (plus one greedy)
        return c

    @classmethod
    def validate(cls, config):
        s = cls.section_of(config)
        checks = [
            (s.format in PROMPT_FORMATS, "format", f"one of {', '.join(PROMPT_FORMATS)}"),
            (s.num_generations >= 2, "num_generations", ">= 2 (advantages are relative to the group)"),
            (s.num_prompts >= 1, "num_prompts", ">= 1"),
            (s.eval_samples >= 1, "eval_samples", ">= 1"),
            (s.max_completion_tokens >= 1, "max_completion_tokens", ">= 1"),
            (s.temperature > 0, "temperature", "> 0 (rollouts are sampled)"),
            (0 < s.top_p <= 1, "top_p", "in (0, 1]"),
            (s.top_k >= 0, "top_k", ">= 0"),
            (s.aggregation in grpo_loss.AGGREGATIONS, "aggregation", f"one of {', '.join(grpo_loss.AGGREGATIONS)}"),
            (s.advantage_estimator in advantages_lib.ESTIMATORS, "advantage_estimator",
             f"one of {', '.join(advantages_lib.ESTIMATORS)}"),
            (0 < s.gamma <= 1, "gamma", "in (0, 1]"),
            (s.importance in grpo_loss.IMPORTANCE_LEVELS, "importance", f"one of {', '.join(grpo_loss.IMPORTANCE_LEVELS)}"),
            (s.kl_estimator in grpo_loss.KL_ESTIMATORS, "kl_estimator", f"one of {', '.join(grpo_loss.KL_ESTIMATORS)}"),
            (0 <= s.clip_low < 1 and s.clip_high >= 0, "clip_low", "in [0, 1) with clip_high >= 0"),
            (0 <= s.negative_advantage_scale <= 1, "negative_advantage_scale", "in [0, 1]"),
            (s.num_iterations >= 1, "num_iterations", ">= 1"),
            (s.steps_per_rollout >= 1, "steps_per_rollout", ">= 1"),
            (0 <= s.overlong_cache < s.max_completion_tokens, "overlong_cache", "in [0, max_completion_tokens)"),
            ((s.beta or 0.0) >= 0, "beta", ">= 0"),
            (s.reference in ("auto", "none", "copy", "base"), "reference", "auto, none, copy or base"),
        ]
        cls.check_keys(config, checks)
        cls.check_rollout_cycle(config, "num_iterations", "steps_per_rollout")
        cls.validate_prompts(config)
        RewardSet.from_specs(list(s.rewards), list(s.reward_weights))  # names and weights resolve now

    @classmethod
    def check_rollout_cycle(cls, config, outer: str, inner: str) -> None:
        """A rollout batch is trained for `outer` * `inner` optimizer steps; checkpoints must fall
        between rollout batches so a resumed run restarts at a fresh one."""
        s = cls.section_of(config)
        cycle = s[outer] * s[inner]
        if cycle > 1 and config.train.checkpoint_every % cycle:
            raise UserError(
                f"config key 'train.checkpoint_every' ({config.train.checkpoint_every}) must be a multiple of "
                f"{cls.key(outer)} * {inner} ({cycle}) so a resumed run restarts at a fresh rollout batch")

    @classmethod
    def validate_prompts(cls, config):
        """The prompt data's settings (shared with the objectives that reuse GRPO's prompts)."""
        if config.data.tasks or config.data.builtin in ("quickstart", "clusters"):
            raise UserError(f"config key 'objective.type' is {cls.name!r}: prompts come from data.builtin='verifiable' "
                            "or data.train_path (JSONL), not "
                            + ("data.tasks" if config.data.tasks else f"data.builtin={config.data.builtin!r}"))
        if config.data.builtin == "verifiable":
            verifiable.check_families(config.data.verifiable_families)
        if config.data.chat_template:
            try:
                chat.check_template(config.data.chat_template)
            except UserError as e:
                raise UserError(f"config key 'data.chat_template': {e}") from None
        if not config.data.builtin and not config.data.train_path:
            raise UserError(f"config key 'data.train_path' is empty: {cls.name} reads its prompts from it (JSONL), or "
                            "set data.builtin='verifiable' for the built-in problems")

    # ---- reference -------------------------------------------------------------------------

    @property
    def beta(self) -> float:
        return float(self.section.beta or 0.0)

    @property
    def kl_in_reward(self) -> bool:
        """RLOO and REINFORCE++ subtract the KL from the reward at rollout time; GRPO adds it to the loss."""
        return self.section.advantage_estimator != "grpo"

    def kl_reference(self) -> str:
        """The KL's reference: none | copy (a frozen copy of the start weights) | base (LoRA: no adapters)."""
        if self.beta == 0.0 or self.section.reference == "none":
            return "none"
        if self.section.reference != "auto":
            return self.section.reference
        return "base" if self.config.peft.method != "none" else "copy"

    def reference_kind(self):
        # With the KL in the reward the loss needs no reference: the rollout scores it (a copy is kept here).
        return "none" if self.kl_in_reward else self.kl_reference()

    # ---- data ------------------------------------------------------------------------------

    def load_data(self, workdir):
        s, d = self.section, self.config.data
        if d.builtin == "verifiable":
            families = verifiable.check_families(d.verifiable_families)
            seed = self.config.seed
            steps = {"min_steps": d.verifiable_min_steps, "max_steps": d.verifiable_max_steps}
            train = verifiable.generate_records(d.num_train_examples, split="train", seed=seed, families=families,
                                                **steps)
            heldout = verifiable.generate_records(d.num_eval_examples, split="heldout", seed=seed, families=families,
                                                  **steps)
            corpus = lambda: verifiable.tokenizer_corpus(seed=seed, **steps)
        else:
            settings = loading.data_settings(self.config, workdir)

            def read(path, which):
                if not path:
                    return []
                source = datasets.single_set(settings, which)  # JSONL, or a 🤗 dataset split (data.source_kind='hf')
                records = [source[i] for i in range(len(source))]
                if s.format == "gsm8k":  # e.g. openai/gsm8k as it is on the Hub
                    return [parse_gsm8k(r, str(r.get("_where", f"{path}: record {i}"))) for i, r in enumerate(records)]
                return records

            train, heldout = read(d.train_path, "train"), read(d.eval_path, "eval")
            corpus = lambda: (self.prompt_text(r) for r in train[:20_000])
        for i, record in enumerate(train[:1000] + heldout[:1000]):
            self.prompt_text(record, where=str(record.get("_where", f"record {i}")))  # bad templates fail now
        return PromptData(self._tokenizer(workdir, corpus), train, heldout)

    def _tokenizer(self, workdir, corpus):
        """The run's tokenizer, resolved as every objective's is (loading.tokenizer_path: data.tokenizer >
        model.hf_dir > the workdir's > model.init_from's), else one trained on the prompts (`corpus`)."""
        return datasets.run_tokenizer(loading.data_settings(self.config, workdir), paths.path(workdir), corpus)

    def prompt_text(self, record: dict, where: str = "") -> str:
        """The prompt as the reward functions read it: `objective.grpo.prompt_template` rendered with the
        record's fields, or for a record with chat `messages` its last (user) message."""
        messages = _conversation(record, where)
        if messages:
            return messages[-1]["content"]
        return render(self.section.prompt_template, record, where=where or self.key("prompt_template"))

    def prompt_ids(self, tokenizer, record: dict) -> list[int]:
        """The prompt's token ids, ready for the completion. Plain text, or a conversation when
        `data.chat_template` is set (the prompt text as the user turn) or the record has `messages`
        (rendered with data.chat_template or the tokenizer's own): the chat template's text up to
        its generation prompt (add_generation_prompt=True), as `transformers` renders it."""
        messages = _conversation(record)
        template = self.config.data.chat_template or (getattr(tokenizer, "chat_template", None) if messages else None)
        if not template:
            if messages:
                raise UserError(f"{record.get('_where', 'a prompt record')}: chat 'messages' need a chat template; the "
                                "tokenizer has none, so set config key 'data.chat_template' (e.g. 'chatml')")
            return encode_prompt(tokenizer, self.prompt_text(record))
        text = chat.render_chat(messages or [{"role": "user", "content": self.prompt_text(record)}], template,
                                bos_token=getattr(tokenizer, "bos_token", None),
                                eos_token=getattr(tokenizer, "eos_token", None), add_generation_prompt=True)
        return start_sequence(tokenizer, encode_with_specials(tokenizer, text), chat=True)

    def train_dataset(self, data, *, batch_size, process_index, process_count):
        if not data.train:
            raise UserError(f"{self.name}: no training prompts (data.train_path is empty)")
        records = data.train
        ds = grain.MapDataset.range(len(records))
        if self.config.data.shuffle:
            ds = ds.shuffle(seed=self.config.seed)
        ds = ds.repeat()[process_index::process_count].map(lambda i: records[int(i)])
        ds = ds.batch(self.prompts_per_batch(batch_size), batch_fn=list)
        return ds.to_iter_dataset(), None

    def prompts_per_batch(self, batch_size: int) -> int:
        """Prompts each `next(data_iter)` gives this process (`batch_size`: its rows per step)."""
        return self.section.num_prompts

    def _rows_per_rollout(self, batch_size: int) -> int:
        return batch_size * self.section.steps_per_rollout

    def batch_shapes(self, batch_size):
        t = self.config.data.seq_len
        shapes = {k: jax.ShapeDtypeStruct((batch_size, t), jnp.int32)
                  for k in ("inputs", "targets", "loss_mask", "segment_ids", "positions")}
        shapes["advantages"] = jax.ShapeDtypeStruct((batch_size, t), jnp.float32)
        if self.section.num_iterations > 1:
            shapes["old_logps"] = jax.ShapeDtypeStruct((batch_size, t), jnp.float32)
        shapes["inv_tokens"] = jax.ShapeDtypeStruct((batch_size,), jnp.float32)
        shapes["rollout_stats"] = jax.ShapeDtypeStruct((batch_size, len(self.stat_names)), jnp.float32)
        return shapes

    # ---- loss ------------------------------------------------------------------------------

    def weight(self, batch):
        return grpo_loss.aggregation_weight(batch["loss_mask"], batch["segment_ids"], self.section.aggregation,
                                            self.section.max_completion_tokens)

    def loss(self, model, params, batch, *, frozen=None, rng=None, ref_params=None):
        s = self.section
        rngs = None if rng is None else {"dropout": rng}
        t = s.temperature  # the distribution the rollouts were sampled from (TRL does the same)
        stats = model.token_stats(params, batch, frozen=frozen, rngs=rngs, temperature=t)
        lp_ref = None
        kind = self.reference_kind()
        if kind == "copy":
            lp_ref = jax.lax.stop_gradient(model.token_stats(ref_params, batch, temperature=t).logp)
        elif kind == "base":
            lp_ref = jax.lax.stop_gradient(model.token_stats(frozen, batch, temperature=t).logp)
        loss_sum, _, m = grpo_loss.policy_loss(
            stats.logp, batch["advantages"], batch["loss_mask"], batch["segment_ids"], lp_old=batch.get("old_logps"),
            lp_ref=lp_ref, beta=0.0 if self.kl_in_reward else self.beta, kl_estimator=s.kl_estimator, clip_low=s.clip_low, clip_high=s.clip_high,
            importance=s.importance, aggregation=s.aggregation, max_completion_len=s.max_completion_tokens,
        )
        mask = batch["loss_mask"].astype(jnp.float32)
        inv_tokens = batch["inv_tokens"][0]  # 1 / trained tokens of the global batch (same in every row)
        m["entropy"] = jnp.sum(-jax.lax.stop_gradient(stats.logp) * mask)  # sampled tokens' NLL: entropy estimate
        metrics = {k: m[k] * inv_tokens for k in _TOKEN_METRICS if k in m}
        metrics.update(loss=loss_sum, trained_tokens=m["tokens"], completions=m["sequences"])
        rollout = jnp.sum(batch["rollout_stats"], axis=0)
        metrics.update({f"rollout/{k}": rollout[i] for i, k in enumerate(self.stat_names)})
        return loss_sum, metrics

    # ---- rollouts --------------------------------------------------------------------------

    def start(self, run):
        self.run = run
        self.tokenizer = run.data.tokenizer
        self._cache: list[dict[str, np.ndarray]] | None = None
        self._rollout_done: float | None = None  # when the last rollout batch was ready
        self._learned_tokens = 0  # tokens of the batches handed to the step since then
        self._check_fit(run.data.train[:1000])
        model = run.setup.apply_fn
        temperature = self.section.temperature
        self._logps = jax.jit(lambda params, frozen, rows: model.token_stats(params, rows, frozen=frozen,
                                                                              temperature=temperature).logp)
        self._reference = None  # KL in the reward, copy reference: the start weights, materialised once
        if self.kl_in_reward and self.kl_reference() == "copy":
            self._reference = run.start_params()

    def _check_fit(self, records) -> None:
        """Fails before anything runs when the longest prompt seen plus a full-length completion, for
        every completion of a rollout, cannot fit the rollout's rows."""
        s, d = self.section, self.config.data
        longest = max((len(self.prompt_ids(self.tokenizer, r)) for r in records), default=0)
        example_len = longest + s.max_completion_tokens - 1
        rows = self._rows_per_rollout(self.config.train.global_batch_size // jax.process_count())
        need = rows_needed(s.num_prompts * s.num_generations, example_len=example_len, seq_len=d.seq_len,
                           packing=d.packing)
        if example_len > d.seq_len or need > rows:
            raise UserError(
                f"GRPO: {s.num_prompts} prompts x {s.num_generations} completions of up to {example_len} tokens "
                f"(longest prompt {longest} + objective.grpo.max_completion_tokens {s.max_completion_tokens}) need "
                f"{need} rows of data.seq_len={d.seq_len} tokens{' (packed)' if d.packing else ' (one per row)'}, "
                f"but a rollout has train.global_batch_size * objective.grpo.steps_per_rollout = {rows}; raise those, "
                "data.seq_len, or lower objective.grpo.num_prompts / num_generations")

    def next_batch(self, state, data_iter, rng):
        s = self.section
        step = int(jax.device_get(state.step))
        cycle = s.num_iterations * s.steps_per_rollout
        if self._cache is None or step % cycle == 0:
            self._cache = self._rollout_batches(state, data_iter, rng, step)
        batch = self._cache[(step % cycle) % s.steps_per_rollout]
        self._learned_tokens += int(np.count_nonzero(batch["segment_ids"]))
        return batch

    def sample(self, model, variables, tokenizer, records: Sequence[dict], *, group_size: int, seed: int,
               temperature: float, per_process: bool = False):
        """(rollouts, prompts, total rewards, {name: rewards}) for G completions of each record.

        `per_process`: every process brings its own records (training prompts). The sampler is one
        SPMD program over all processes' devices, so its input must be the same everywhere: the
        prompts of all processes are gathered, sampled together with one seed, and each process
        keeps (and scores) its own groups. Otherwise the records are the same on every process
        (held-out evaluation)."""
        s = self.section
        prompts = [self.prompt_text(r) for r in records]
        ids = [self.prompt_ids(tokenizer, r) for r in records]
        everyone = distributed.all_gather(ids, "grpo/prompts") if per_process else [ids]
        offset = sum(len(part) for part in everyone[: jax.process_index()]) if per_process else 0
        rollouts = sample_groups(
            model, variables, [p for part in everyone for p in part], decode=tokenizer.decode,
            group_size=group_size, max_new_tokens=s.max_completion_tokens,
            temperature=temperature, top_p=s.top_p if s.top_p < 1 else None, top_k=s.top_k or None,
            stop_tokens=(tokenizer.eos_id,), seed=seed, pad_id=tokenizer.pad_id,
        )
        rollouts = [dataclasses.replace(r, prompt_index=r.prompt_index - offset)
                    for r in rollouts[offset * group_size : (offset + len(ids)) * group_size]]
        fields = {k: [r.get(k) for r in records for _ in range(group_size)]
                  for k in sorted({k for r in records for k in r}) if not k.startswith("_")}
        repeated = [p for p in prompts for _ in range(group_size)]
        scoring_start = time.perf_counter()
        totals, parts = self.rewards(repeated, [r.text for r in rollouts], fields)
        self.last_scoring_s = time.perf_counter() - scoring_start  # of sample's time: the rewards' share
        return rollouts, repeated, np.asarray(totals, np.float64), parts

    def _rollout_batches(self, state, data_iter, rng, step) -> list[dict[str, np.ndarray]]:
        s, g = self.section, self.section.num_generations
        jax.block_until_ready(state.params)  # the dispatched step finishes here: it counts as learning
        # Since the last rollout: the train steps on it (and the loop's hooks), measured on the host.
        learner_s = time.perf_counter() - self._rollout_done if self._rollout_done is not None else 0.0
        learned_tokens, self._learned_tokens = self._learned_tokens, 0
        t0 = time.perf_counter()
        # The policy as the state holds it; LoRA: adapters merged into the base for the decode loop.
        sampler, variables = sampling_policy(self.run.setup.model, self.run.model_variables(state),
                                             loading.peft_spec(self.config))
        kept: list[tuple] = []  # (rollouts, prompts, totals, parts, records) per group
        zero_groups, sampled_tokens, rounds = 0, 0, 0
        spare: list[tuple] = []
        first: list[tuple] = []  # the first round's groups: an unbiased sample of the policy (metrics)
        # Sampling is collective: every process takes part in each round until all have their groups.
        while rounds <= (s.max_resample_rounds if s.dynamic_sampling else 0) and any(
                distributed.all_gather(len(kept) < s.num_prompts, "grpo/need")):
            records = next(data_iter)
            seed = int(jax.random.randint(jax.random.fold_in(rng, rounds), (), 0, 2**31 - 1))
            rollouts, prompts, totals, parts = self.sample(sampler, variables, self.tokenizer, records,
                                                           group_size=g, seed=seed, temperature=s.temperature,
                                                           per_process=True)
            sampled_tokens += sum(len(r.completion_ids) for r in rollouts)
            if s.overlong_cache:
                totals = totals + grpo_loss.overlong_penalty([len(r.completion_ids) for r in rollouts],
                                                             max_len=s.max_completion_tokens, cache_len=s.overlong_cache)
            for i in range(len(records)):
                sl = slice(i * g, (i + 1) * g)
                group = (rollouts[sl], prompts[sl], totals[sl], {k: v[sl] for k, v in parts.items()}, records[i])
                flat = np.all(totals[sl] == totals[sl][0])
                zero_groups += int(flat) if rounds == 0 else 0
                (spare if flat and s.dynamic_sampling else kept).append(group)
                if rounds == 0:
                    first.append(group)
            rounds += 1
        kept = (kept + spare)[: s.num_prompts]
        sample_s = time.perf_counter() - t0
        rollouts = [r for grp in kept for r in grp[0]]
        totals = np.concatenate([grp[2] for grp in kept])
        seq_len, packing = self.config.data.seq_len, self.config.data.packing
        examples = [rollout_example(r, 0.0, seq_len=seq_len) for r in rollouts]
        trained = [i for i, e in enumerate(examples) if e is not None]  # rollouts with tokens to train on
        examples = [examples[i] for i in trained]
        local_rows = self.config.train.global_batch_size // jax.process_count()
        try:
            rows = build_rows(examples, rows=self._rows_per_rollout(local_rows), seq_len=seq_len, packing=packing)
        except ValueError as e:
            raise UserError(
                f"GRPO rollouts: {e}. objective.grpo.num_prompts * num_generations completions must fit in "
                f"train.global_batch_size * objective.grpo.steps_per_rollout rows of data.seq_len tokens "
                f"(one per row without data.packing): raise those or lower num_prompts") from None
        # Each trained rollout's completion tokens in the rows: (row, [positions]).
        where = dict(zip(trained, completion_positions(examples, rows=len(rows["inputs"]), seq_len=seq_len,
                                                       packing=packing)))
        old_logps = self._old_logps(state, rows) if s.num_iterations > 1 or self.kl_in_reward else None
        if s.num_iterations > 1:  # the sampling policy's log-probs, kept for every pass
            rows["old_logps"] = old_logps
        kl_tokens = self._reward_kl(state, rows, old_logps, where, len(rollouts))
        for i, adv in enumerate(self._advantages(totals, kl_tokens)):
            if i in where:
                row, positions = where[i]
                rows["advantages"][row, positions] = adv
        accuracy = _accuracy([grp[3] for grp in first])
        sampled = np.concatenate([grp[2] for grp in first])
        lengths = np.array([len(r.completion_ids) for grp in first for r in grp[0]])
        stats = {
            "kl": sum(float(k.sum()) for k in kl_tokens) / max(1, sum(k.size for k in kl_tokens)),
            "reward": sampled.mean(), "reward_std": sampled.std(), "accuracy": accuracy,
            "zero_spread_groups": zero_groups, "completion_len": lengths.mean(), "completion_len_max": lengths.max(),
            "truncated": np.mean([r.truncated for grp in first for r in grp[0]]),
            "rollout_tokens_per_s": sampled_tokens / max(sample_s, 1e-9), "sampling_time_s": sample_s,
            "sampling_fraction": sample_s / (sample_s + learner_s) if learner_s else 1.0,
            "learner_tokens_per_s": learned_tokens / learner_s if learner_s else 0.0,
        }
        for name in self.rewards.names:
            values = [v for grp in first for v in grp[3][name] if v is not None]
            stats[f"reward/{name}"] = float(np.mean(values)) if values else 0.0
            stats[f"reward_std/{name}"] = float(np.std(values)) if values else 0.0
        if s.sample_every and step % s.sample_every == 0 and jax.process_index() == 0:
            self._dump(step, kept)
        self._rollout_done = time.perf_counter()
        return self._split(rows, local_rows, stats)

    def _advantages(self, totals: np.ndarray, kl_tokens: list[np.ndarray]) -> list:
        """Per rollout, its advantage: a number (grpo, rloo) or one per completion token (reinforce_pp)."""
        s = self.section
        gather, w = _gather_moments, s.negative_advantage_scale
        if s.advantage_estimator == "rloo":
            out = advantages_lib.rloo_advantages(totals, [k.sum() for k in kl_tokens], s.num_generations,
                                                 beta=self.beta, normalize=s.normalize_advantages, gather=gather)
            return list(np.where(out < 0, out * w, out))
        if s.advantage_estimator == "reinforce_pp":
            out = advantages_lib.reinforce_pp_advantages(totals, kl_tokens, beta=self.beta, gamma=s.gamma, gather=gather)
            return [np.where(a < 0, a * w, a) for a in out]
        advantages, _ = advantages_lib.group_advantages(totals, s.num_generations, scale_rewards=s.scale_rewards,
                                                        negative_scale=s.negative_advantage_scale)
        return list(advantages)

    def _reward_kl(self, state, rows, old_logps, where, count: int) -> list[np.ndarray]:
        """Per rollout, the per-token KL estimate (kl_estimator) of the sampling policy to the reference on
        its completion tokens, when the KL is folded into the reward (zeros otherwise; empty: not trained)."""
        kind = self.kl_reference() if self.kl_in_reward else "none"
        if kind == "none":
            return [np.zeros(len(where[i][1]) if i in where else 0) for i in range(count)]
        ref_params = self._reference if kind == "copy" else state.frozen
        ref_logps = self._logps_of(ref_params, None, rows)
        kl = np.asarray(grpo_loss.kl_penalty(jnp.asarray(old_logps), jnp.asarray(ref_logps), self.section.kl_estimator))
        return [kl[where[i][0], where[i][1]].astype(np.float64) if i in where else np.zeros(0) for i in range(count)]

    def _old_logps(self, state, rows) -> np.ndarray:
        return self._logps_of(state.params, state.frozen, rows)

    def _logps_of(self, params, frozen, rows) -> np.ndarray:
        """Per-token log-probs [rows, T] of this process's rollout rows under `params` (+ `frozen`)."""
        return self._per_row_outputs(self._logps, params, frozen, rows)

    def _per_row_outputs(self, fn, params, frozen, rows):
        """`fn(params, frozen, batch)` (per-token arrays [B, T], or a tuple of them) over this process's
        rollout rows, one global batch at a time, as float32 numpy arrays [rows, T]."""
        keys = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
        out = []
        local = self.config.train.global_batch_size // jax.process_count()
        for start in range(0, len(rows["inputs"]), local):
            sharding = self.run.setup.batch_sharding
            chunk = {k: jax.make_array_from_process_local_data(sharding[k], rows[k][start : start + local]) for k in keys}
            out.append(jax.tree.map(lambda x: _local_rows(x, local), fn(params, frozen, chunk)))
        return jax.tree.map(lambda *parts: np.concatenate(parts).astype(np.float32), *out)

    def _split(self, rows, local_rows, stats) -> list[dict[str, np.ndarray]]:
        """The rollout rows as steps_per_rollout mini-batches, each with its metric shares."""
        batches = []
        share = np.array([stats[k] for k in self.stat_names], np.float32) / (local_rows * jax.process_count())
        local_tokens = [int(rows["loss_mask"][i * local_rows : (i + 1) * local_rows].sum())
                        for i in range(self.section.steps_per_rollout)]
        global_tokens = np.sum(distributed.all_gather(local_tokens, "grpo/tokens"), axis=0)
        for i in range(self.section.steps_per_rollout):
            batch = {k: v[i * local_rows : (i + 1) * local_rows] for k, v in rows.items()}
            tokens = max(1, int(global_tokens[i]))
            batch["inv_tokens"] = np.full((local_rows,), 1.0 / tokens, np.float32)
            batch["rollout_stats"] = np.tile(share, (local_rows, 1))
            batches.append(batch)
        return batches

    def _dump(self, step, groups) -> None:
        path = self.run.workdir / workdir_lib.SAMPLES / f"step_{step}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as f:
            for rollouts, prompts, totals, parts, _ in groups:
                for i, r in enumerate(rollouts):
                    f.write(json.dumps({"step": step, "prompt": prompts[i], "completion": r.text,
                                        "reward": float(totals[i]), "rewards": {k: v[i] for k, v in parts.items()},
                                        "truncated": r.truncated}) + "\n")

    # ---- evaluation ------------------------------------------------------------------------

    def eval_set(self, data):
        return EvalSet(list(data.heldout))

    def evaluate(self, model, variables, tokenizer, eval_set, *, show=0, printer=print):
        """Mean reward and accuracy of greedy completions and of `eval_samples` sampled completions per
        prompt of the held-out prompts (never trained on)."""
        scores = {}
        records = eval_set.records
        for mode, temperature, n in (("greedy", 0.0, 1), ("sampled", self.section.temperature, self.section.eval_samples)):
            rollouts, prompts, totals, parts = self.sample(model, variables, tokenizer, records, group_size=n,
                                                           seed=self.config.seed, temperature=temperature)
            scores[f"{mode}/reward"] = float(totals.mean())
            scores[f"{mode}/accuracy"] = _accuracy([parts])
            for name, values in parts.items():
                applicable = [v for v in values if v is not None]
                if applicable:
                    scores[f"{mode}/{name}"] = float(np.mean(applicable))
            if mode == "greedy":
                for i in range(min(show, len(records))):
                    printer(f"  {prompts[i]!r} -> {rollouts[i].text!r} (reward {totals[i]:g})")
        return scores

    def describe(self):
        s = self.section
        advantages = {
            "grpo": f"group advantages {'/ group std' if s.scale_rewards else 'centred only'}",
            "rloo": f"RLOO leave-one-out advantages{' whitened over the batch' if s.normalize_advantages else ''}",
            "reinforce_pp": f"REINFORCE++ token returns (gamma={s.gamma:g}) whitened over the batch",
        }[s.advantage_estimator]
        variant = f"clip ({s.clip_low:g}, {s.clip_high:g}), {s.importance}-level ratios, {s.aggregation} loss, {advantages}"
        place = "in the reward" if self.kl_in_reward else "in the loss"
        reference = (f"KL {s.kl_estimator} beta={self.beta:g} {place} to the {self.kl_reference()} reference"
                     if self.beta else "no KL")
        name = {"grpo": "GRPO", "rloo": "RLOO", "reinforce_pp": "REINFORCE++"}[s.advantage_estimator]
        return (f"{name}: {s.num_prompts} prompts x {s.num_generations} completions per rollout, {variant}, {reference}; "
                f"rewards {', '.join(self.rewards.names)}")


def _conversation(record: dict, where: str = "") -> list[dict] | None:
    """A record's chat `messages` (None without them), checked: role/content strings, ending with a
    user (or system) turn that the model answers."""
    messages = record.get("messages")
    if messages is None and isinstance(record.get("prompt"), list):  # TRL's conversational prompt-only format
        messages = record["prompt"]
    if messages is None:
        return None
    where = where or str(record.get("_where", "a prompt record"))
    try:
        messages = check_message_list(messages, where)  # the chat records' own check
    except SourceError as e:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{'role': ..., 'content': ...}} strings "
                        f"({str(e).removeprefix(where + ': ')})") from None
    if messages[-1]["role"] == "assistant":
        raise UserError(f"{where}: 'messages' ends with an assistant turn; a prompt ends with the turn the model "
                        "answers (the completion is sampled)")
    return messages


def _accuracy(parts_per_group: Sequence[dict[str, list]]) -> float:
    """Fraction of completions whose every applicable reward is 1 (meaningful for 0/1 rewards)."""
    hits = []
    for parts in parts_per_group:
        columns = list(parts.values())
        for i in range(len(columns[0])):
            applicable = [c[i] for c in columns if c[i] is not None]
            hits.append(bool(applicable) and all(math.isclose(v, 1.0) for v in applicable))
    return float(np.mean(hits)) if hits else 0.0


def _gather_moments(moments: tuple[float, float]) -> tuple[float, float]:
    """(count, sum) of this process's advantages -> of every process's (batch-wide normalisation)."""
    parts = distributed.all_gather(list(moments), "grpo/moments")
    return float(sum(p[0] for p in parts)), float(sum(p[1] for p in parts))


def _local_rows(x: jax.Array, local: int) -> np.ndarray:
    """This process's rows of a global batch-sharded array (all of it on one process)."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    full = np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return full[jax.process_index() * local : (jax.process_index() + 1) * local]
