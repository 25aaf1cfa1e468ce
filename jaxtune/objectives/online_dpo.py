"""Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"): the DPO
loss on pairs the *current* policy samples each step, ranked by a reward or a judge.

It follows TRL 1.16's `trl.experimental.online_dpo.OnlineDPOTrainer.training_step`:

- every step takes `train.global_batch_size` prompts (per process: its share) and samples two
  completions of each with the current policy (GRPO's sampler on the train state's own variables,
  `objective.online_dpo.temperature`, TRL's default 0.9);
- each completion is scored by the reward functions (`rewards`: verifiers, `reward_model:<dir>`,
  'module:function'; weighted sum, a function's None counts 0 as TRL's nansum), minus
  `missing_eos_penalty` when it has no EOS token; the first completion is chosen when its score is
  >= the second's (ties go to the first, as TRL's ``first_half >= second_half``). With `judge`
  ('module:function' or an object with a ``judge`` method, TRL's pairwise-judge contract
  ``judge(prompts, [[first, second], ...]) -> [0 | 1, ...]``, the index of the preferred
  completion; -1 = undecided counts as "not the first", as TRL's ``rank == 0`` did) the judge
  ranks instead and the rewards are only logged;
- the loss is `preference.preference_loss` (the `dpo` objective's code) on the completions'
  summed log-probs under the policy and the reference (a frozen copy of the start weights, or the
  base without adapters under LoRA), mean over pairs. ``sigmoid`` and ``ipo`` are TRL's two
  types; ``hinge`` (SLiC) is the DPO objective's. IPO here is on *summed* log-probs, as TRL's
  online trainer (its offline DPOTrainer length-averages). The learner's log-probs are of the raw
  logits (temperature 1), as TRL's ``_forward``.

Metrics (TRL's names): objective/kl (per completion, summed over its tokens), objective/entropy,
objective/non_score_reward (-beta * kl), objective/rlhf_reward, objective/scores,
objective/scores_margin, rewards/{chosen,rejected,accuracies,margins}, logps/{chosen,rejected},
val/contain_eos_token, beta; plus rollout/accuracy (completions every verifier scores 1) and
rollout/completion_len. Difference from TRL: kl and entropy sum over the completion tokens only
(TRL 1.16 sums its per-token log-probs over the padded completion width, padding included).
"""

from __future__ import annotations

import pkgutil
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxtune.batch import BATCH_KEYS
from jaxtune.errors import UserError
from jaxtune.objectives import base, grpo, pairs, preference
from jaxtune.rewards import RewardSet
from jaxtune.rollouts import build_rows, rollout_example

LOSS_TYPES = ("sigmoid", "ipo", "hinge")
REFERENCES = ("auto", "copy", "base")
# Per pair [B, 2] (chosen, rejected), host-side: the scores ranked, whether each has EOS, verifier hits, lengths.
PAIR_KEYS = ("scores", "contain_eos", "correct", "completion_len")
Judge = Callable[[list[str], list[list[str]]], Sequence[int]]


def rank_pairs(scores: np.ndarray, contain_eos: np.ndarray, missing_eos_penalty: float | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """(first is chosen [B] bool, penalised scores [B, 2]) of two completions per prompt, as TRL:
    scores minus the penalty where a completion has no EOS, the first chosen when >= the second."""
    scores = np.asarray(scores, np.float64).copy()
    if missing_eos_penalty is not None:
        scores[~np.asarray(contain_eos, bool)] -= missing_eos_penalty
    return scores[:, 0] >= scores[:, 1], scores


def judge_pairs(judge: Judge, prompts: Sequence[str], completions: Sequence[Sequence[str]]) -> np.ndarray:
    """[B] bool, the first completion preferred, by a pairwise judge (index of the preferred one)."""
    ranks = list(judge(list(prompts), [list(c) for c in completions]))
    if len(ranks) != len(prompts) or not all(r in (-1, 0, 1) for r in ranks):
        raise UserError(f"online_dpo judge: expected one of 0, 1 (or -1, undecided) per pair for {len(prompts)} "
                        f"pairs, got {ranks!r}")
    return np.array([r == 0 for r in ranks], bool)


def online_dpo_loss(loss_type: str, logps: jax.Array, ref_logps: jax.Array, *, beta: float
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(per-pair loss [B], per-pair-mean metrics) from summed log-probs [B, 2] (chosen, rejected) of the
    policy and the reference: the DPO objective's `preference_loss` (lengths of 1 keep IPO on sums, as
    TRL's online trainer), plus TRL's objective/kl, entropy and non_score_reward."""
    ones = jnp.ones(logps.shape[:1], jnp.float32)
    losses, metrics = preference.preference_loss(loss_type, logps[:, 0], logps[:, 1], ref_logps[:, 0],
                                                 ref_logps[:, 1], chosen_lengths=ones, rejected_lengths=ones, beta=beta)
    logps, ref_logps = jax.lax.stop_gradient(logps), jax.lax.stop_gradient(ref_logps)
    kl = jnp.mean(logps - ref_logps)  # per completion, summed over its tokens
    metrics.update({"objective/kl": kl, "objective/entropy": -jnp.mean(logps),
                    "objective/non_score_reward": -beta * kl})
    return losses, metrics


def score_metrics(pair_values: dict[str, jax.Array], non_score_reward: jax.Array) -> dict[str, jax.Array]:
    """TRL's score metrics (means over pairs) from the per-pair host values [B, 2] (PAIR_KEYS)."""
    scores = pair_values["scores"]
    return {
        "objective/scores": jnp.mean(scores), "objective/scores_margin": jnp.mean(scores[:, 0] - scores[:, 1]),
        "objective/rlhf_reward": jnp.mean(scores) + non_score_reward,
        "val/contain_eos_token": jnp.mean(pair_values["contain_eos"]),
        "rollout/accuracy": jnp.mean(pair_values["correct"]),
        "rollout/completion_len": jnp.mean(pair_values["completion_len"]),
    }


def load_judge(spec: str) -> Judge:
    """'package.module:name': a function ``judge(prompts, pairs)`` or an object with a ``judge`` method
    (TRL's pairwise judges)."""
    try:
        target = pkgutil.resolve_name(spec)
    except (ImportError, AttributeError, ValueError) as e:
        raise UserError(f"config key 'objective.online_dpo.judge': cannot load {spec!r} ({e}); expected "
                        "'package.module:function'") from None
    fn = getattr(target, "judge", target)
    if not callable(fn):
        raise UserError(f"config key 'objective.online_dpo.judge': {spec!r} is neither callable nor has a judge method")
    return fn


@base.register("online_dpo")
class OnlineDPO(grpo.GRPO):
    """Online DPO on pairs sampled from the current policy (module docstring). The prompts, their
    tokenization, the sampler, rewards and held-out evaluation are GRPO's; the loss is DPO's."""

    def __init__(self, config):
        base.Objective.__init__(self, config)
        s = self.section
        self.rewards = RewardSet.from_specs(list(s.rewards), list(s.reward_weights))
        self.judge = load_judge(s.judge) if s.judge else None

    @classmethod
    def config_section(cls):
        c = ml_collections.ConfigDict()
        c.loss_type = "sigmoid"  # sigmoid (DPO) | ipo (on summed log-probs, as TRL) | hinge (SLiC)
        c.beta = 0.1
        c.reference = "auto"  # auto: the base without adapters under LoRA, else a frozen copy | copy | base
        c.missing_eos_penalty = ml_collections.FieldReference(None, field_type=float)  # subtracted from the score
        c.judge = ""  # 'module:function' (or an object with .judge): ranks the pairs instead of the rewards
        # GRPO's prompt and sampling settings (objectives/grpo.py)
        c.format = "fields"
        c.prompt_template = "{prompt}"
        c.rewards = ("math", "instructions")
        c.reward_weights = ()
        c.max_completion_tokens = 32
        c.temperature = 0.9  # TRL's default
        c.top_p = 1.0
        c.top_k = 0
        c.sample_every = 0
        c.eval_samples = 4
        return c

    @classmethod
    def validate(cls, config):
        s = cls.section_of(config)
        checks = [
            (s.loss_type in LOSS_TYPES, "loss_type", f"one of {', '.join(LOSS_TYPES)}"),
            (s.beta > 0, "beta", "> 0"),
            (s.reference in REFERENCES, "reference", f"one of {', '.join(REFERENCES)}"),
            (s.reference != "base" or config.peft.method != "none", "reference",
             "auto or copy without PEFT ('base' is the model without its adapters)"),
            (s.reference != "copy" or config.peft.method == "none", "reference",
             "auto or base with PEFT (the reference is the base without adapters, no copy)"),
            (s.missing_eos_penalty is None or s.missing_eos_penalty >= 0, "missing_eos_penalty", ">= 0 (or None)"),
            (s.format in grpo.PROMPT_FORMATS, "format", f"one of {', '.join(grpo.PROMPT_FORMATS)}"),
            (s.eval_samples >= 1, "eval_samples", ">= 1"),
            (s.max_completion_tokens >= 1, "max_completion_tokens", ">= 1"),
            (s.temperature > 0, "temperature", "> 0 (the pairs are sampled)"),
            (0 < s.top_p <= 1, "top_p", "in (0, 1]"),
            (s.top_k >= 0, "top_k", ">= 0"),
        ]
        cls.check_keys(config, checks)
        if config.data.packing:
            raise UserError("config key 'data.packing' must be False for objective.type='online_dpo': each step's "
                            "pairs are padded [pairs, 2, data.seq_len] rows")
        cls.validate_prompts(config)
        RewardSet.from_specs(list(s.rewards), list(s.reward_weights))
        if s.judge:
            load_judge(s.judge)

    # ---- reference -------------------------------------------------------------------------

    @property
    def beta(self) -> float:
        return float(self.section.beta)

    @property
    def kl_in_reward(self) -> bool:
        return False

    def reference_kind(self):
        if self.section.reference == "auto":
            return "base" if self.config.peft.method != "none" else "copy"
        return self.section.reference

    # ---- data ------------------------------------------------------------------------------

    def prompts_per_batch(self, batch_size):
        return batch_size  # one pair per prompt: the step's pairs on this process

    def batch_shapes(self, batch_size):
        t = self.config.data.seq_len
        shapes = {k: jax.ShapeDtypeStruct((batch_size, 2, t), jnp.int32) for k in BATCH_KEYS}
        shapes.update({k: jax.ShapeDtypeStruct((batch_size, 2), jnp.float32) for k in PAIR_KEYS})
        return shapes

    # ---- loss ------------------------------------------------------------------------------

    def weight(self, batch):
        return jnp.asarray(batch["inputs"].shape[0], jnp.float32)  # pairs

    def loss(self, model, params, batch, *, frozen=None, rng=None, ref_params=None):
        rngs = None if rng is None else {"dropout": rng}
        logps, _ = pairs.pair_scores(model, params, batch, frozen=frozen, rngs=rngs)
        ref_weights, ref_frozen = (ref_params, None) if self.reference_kind() == "copy" else (frozen, None)
        ref = jax.lax.stop_gradient(pairs.pair_scores(model, ref_weights, batch, frozen=ref_frozen)[0])
        losses, means = online_dpo_loss(self.section.loss_type, logps, ref, beta=self.beta)
        means.update(score_metrics({k: batch[k] for k in PAIR_KEYS}, means["objective/non_score_reward"]))
        means["beta"] = jnp.asarray(self.beta, jnp.float32)
        n = self.weight(batch)
        total = jnp.sum(losses)
        return total, dict({k: v * n for k, v in means.items()}, loss=total)

    # ---- rollouts --------------------------------------------------------------------------

    def start(self, run):
        self.run = run
        self.tokenizer = run.data.tokenizer
        self._check_fit(run.data.train[:1000])

    def _check_fit(self, records) -> None:
        s, seq_len = self.section, self.config.data.seq_len
        longest = max((len(self.prompt_ids(self.tokenizer, r)) for r in records), default=0)
        if longest + s.max_completion_tokens - 1 > seq_len:
            raise UserError(f"online DPO: the longest prompt ({longest} tokens) plus "
                            f"objective.online_dpo.max_completion_tokens ({s.max_completion_tokens}) does not fit "
                            f"data.seq_len={seq_len}; raise data.seq_len or lower max_completion_tokens")

    def next_batch(self, state, data_iter, rng):
        """Two completions of each of this process's prompts, ranked, as [B, 2, T] (chosen, rejected) rows."""
        s = self.section
        step = int(jax.device_get(state.step))
        records = next(data_iter)
        seed = int(jax.random.randint(rng, (), 0, 2**31 - 1))
        variables = self.run.model_variables(state)
        rollouts, prompts, totals, parts = self.sample(self.run.setup.model, variables, self.tokenizer, records,
                                                       group_size=2, seed=seed, temperature=s.temperature,
                                                       per_process=True)
        eos = np.array([self.tokenizer.eos_id in r.completion_ids for r in rollouts], np.float32).reshape(-1, 2)
        first, scores = rank_pairs(totals.reshape(-1, 2), eos.astype(bool), s.missing_eos_penalty)
        if self.judge is not None:
            first = judge_pairs(self.judge, prompts[::2], [[rollouts[i].text, rollouts[i + 1].text]
                                                           for i in range(0, len(rollouts), 2)])
        order = np.where(first[:, None], [0, 1], [1, 0])  # [B, 2]: (chosen, rejected) of each pair
        chosen_rejected = [[rollouts[2 * b + j] for j in order[b]] for b in range(len(records))]
        seq_len = self.config.data.seq_len
        sides = []
        for side in range(2):
            examples = [rollout_example(pair[side], 0.0, seq_len=seq_len) for pair in chosen_rejected]
            if any(e is None for e in examples):
                raise UserError(f"online DPO: a prompt fills data.seq_len={seq_len} tokens, leaving no room for its "
                                "completion; raise data.seq_len")
            sides.append(build_rows(examples, rows=len(records), seq_len=seq_len, packing=False))
        batch = {k: np.stack([sides[0][k], sides[1][k]], axis=1) for k in BATCH_KEYS}
        correct = np.array([grpo._accuracy([{k: [v[i]] for k, v in parts.items()}]) for i in range(len(rollouts))])
        lengths = np.array([len(r.completion_ids) for r in rollouts], np.float32)
        pick = lambda x: np.take_along_axis(np.asarray(x).reshape(-1, 2), order, axis=1).astype(np.float32)
        batch.update(scores=pick(scores), contain_eos=pick(eos), correct=pick(correct), completion_len=pick(lengths))
        if s.sample_every and step % s.sample_every == 0 and jax.process_index() == 0:
            self._dump(step, [(rollouts[2 * b: 2 * b + 2], prompts[2 * b: 2 * b + 2], scores[b],
                               {k: v[2 * b: 2 * b + 2] for k, v in parts.items()}, records[b])
                              for b in range(len(records))])
        return batch

    def describe(self):
        s = self.section
        ranker = f"judge {s.judge}" if s.judge else f"rewards {', '.join(self.rewards.names)}"
        penalty = f", missing-EOS penalty {s.missing_eos_penalty:g}" if s.missing_eos_penalty is not None else ""
        return (f"online DPO ({s.loss_type}, beta={self.beta:g}): two completions per prompt ranked by {ranker}"
                f"{penalty}; reference: {pairs.REFERENCE_NAMES[self.reference_kind()]}")


__all__ = ["LOSS_TYPES", "OnlineDPO", "judge_pairs", "load_judge", "online_dpo_loss", "rank_pairs", "score_metrics"]
