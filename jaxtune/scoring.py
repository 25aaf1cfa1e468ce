"""A trained reward model as a Python function: `rewards(prompts, completions) -> list[float]`.

    import jaxtune
    rewards = jaxtune.reward_fn("runs/rm")            # or reward_fn(hf_dir="exported/rm")
    rewards(["2+2="], ["4"])                           # [1.73]

The contract is the RL reward functions' (`jaxtune.rewards`, TRL's GRPOTrainer):
`fn(prompts, completions, **fields)`, one float per completion; other record fields are accepted
and ignored. Each (prompt, completion) is rendered with the run's first `data.templates` pair and
tokenized as the preference pipeline tokenizes a pair (BOS + prompt, completion + EOS; cut to
data.seq_len the same way), so a reward here is the number training optimised. Rows are
right-padded with the tokenizer's pad id to a power-of-two bucket (few compiles) and scored at
their last non-padding token, by transformers' `*ForSequenceClassification` rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune import inference, models
from jaxtune.data import examples, preference, templates
from jaxtune.peft import wrapper
from jaxtune.errors import UserError

_MIN_BUCKET = 16
REWARD_OBJECTIVE = "reward"  # objective.type of a reward-model run (objectives/reward_model.py registers it)


def reward_head(model_config):
    """A reward model's config: the decoder with a one-label sequence-classification head (what the
    reward objective trains and what this module scores with)."""
    return model_config.replace(num_labels=1)


def _trained_model(config, model_config):
    """The model a restored run trained: a reward run's has the scalar head; any other run's stays as
    configured (and `RewardScorer` then says it is not a reward model)."""
    return reward_head(model_config) if config.objective.get("type") == REWARD_OBJECTIVE else model_config


class RewardScorer:
    """`scorer(prompts, completions, **fields) -> list[float]` for a reward model (`num_labels=1`)."""

    def __init__(self, model, variables: dict, tokenizer, *, seq_len: int, templates: Sequence = (("{prompt}", "{response}"),),
                 batch_size: int = 16):
        config = model.config
        if getattr(config, "num_labels", None) != 1:
            raise UserError(f"not a reward model: the model has num_labels={getattr(config, 'num_labels', None)} "
                            "(a reward model is trained with objective.type='reward' or exported as "
                            "*ForSequenceClassification with one label)")
        if config.pad_token_id != tokenizer.pad_id:  # the pooled token is chosen with the tokenizer's pad id
            model = wrapper.wrap(models.build(config.replace(pad_token_id=tokenizer.pad_id)), wrapper.spec_of(model))
        self.model, self.variables, self.tokenizer = model, variables, tokenizer
        self.seq_len, self.batch_size = seq_len, batch_size
        self.template = tuple(templates[0]) if templates else ("{prompt}", "{response}")
        self._scores = jax.jit(lambda v, tokens, segment_ids: model.apply(
            v, tokens, segment_ids=segment_ids, method=model.sequence_scores)[:, 0])

    def tokens(self, prompt: str, completion: str) -> list[int]:
        """The token ids the reward model reads for one (prompt, completion), as training did."""
        tok = self.tokenizer
        fields = {"prompt": prompt, "response": completion}
        prompt_ids = examples.encode_prompt(tok, templates.render(self.template[0], fields, where="reward prompt"))
        completion_ids = tok.encode(templates.render(self.template[1], fields, where="reward completion")) + [tok.eos_id]
        if len(prompt_ids) + len(completion_ids) - 1 > self.seq_len:
            prompt_ids, (completion_ids,) = preference.truncate_rows(prompt_ids, [completion_ids], seq_len=self.seq_len,
                                                                     bos_id=tok.bos_id)
        # A training row holds seq_len inputs plus the last target when there is room for it.
        return (list(prompt_ids) + list(completion_ids))[:self.seq_len]

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **fields: Any) -> list[float]:
        del fields  # other record fields: not used by a learned reward
        if isinstance(prompts, str) or isinstance(completions, str):
            raise UserError("rewards(prompts, completions): pass lists of strings (one completion per prompt)")
        if not all(isinstance(x, str) for x in (*prompts, *completions)):
            raise UserError("rewards(prompts, completions): prompts and completions must be text (chat-message "
                            "prompts are not supported: render them with the chat template first)")
        if len(prompts) != len(completions):
            raise UserError(f"rewards(prompts, completions): {len(prompts)} prompts but {len(completions)} completions")
        rows = [self.tokens(p, c) for p, c in zip(prompts, completions)]
        out: list[float] = []
        for start in range(0, len(rows), self.batch_size):
            out.extend(self._score(rows[start:start + self.batch_size]))
        return out

    def _score(self, rows: list[list[int]]) -> list[float]:
        width = max(_MIN_BUCKET, 1 << (max(len(r) for r in rows) - 1).bit_length())
        width = min(width, max(self.seq_len, max(len(r) for r in rows)))
        tokens = np.full((self.batch_size, width), self.tokenizer.pad_id, np.int32)
        segment_ids = np.zeros((self.batch_size, width), np.int32)
        for i, r in enumerate(rows):
            tokens[i, :len(r)], segment_ids[i, :len(r)] = r, 1
        scores = self._scores(self.variables, jnp.asarray(tokens), jnp.asarray(segment_ids))
        return [float(s) for s in np.asarray(scores)[:len(rows)]]


def reward_fn(workdir: str | None = None, *, hf_dir: str | None = None, batch_size: int = 16) -> RewardScorer:
    """The reward model of a `jaxtune train` run with objective.type='reward' (its latest checkpoint)
    or of a Hugging Face `*ForSequenceClassification` directory, as `rewards(prompts, completions)`."""
    loaded = inference.load(workdir=workdir, hf_dir=hf_dir, adapt=_trained_model)
    params = loaded.params
    variables = params if isinstance(params, dict) and "params" in params else {"params": params}
    data = loaded.config.data
    return RewardScorer(loaded.model, variables, loaded.tokenizer, seq_len=data.seq_len, templates=data.templates,
                        batch_size=batch_size)
