"""Objectives: plug-ins the trainer runs without naming them (interface and registry: base.py).

Each objective module registers an `Objective` subclass: `sft` (sft.py), `dpo` (preference.py:
the paired preference losses, SimPO, ORPO and paired KTO as loss_type `kto_pair`), `kto`
(kto.py: unpaired KTO) and `reward` (reward_model.py: Bradley-Terry reward models with a scalar
head, `bradley_terry_loss`), `grpo` (grpo.py) and `online_dpo` (online_dpo.py: the DPO loss on pairs
sampled from the current policy each step). Each reads its own section, `objective.<name>.*`
(e.g. `objective.dpo.beta`). Old spellings still load: `objective.type='preference'` is `dpo` and
`loss_type='kto'` is `kto_pair`. The loss math is pure float32 functions of arrays
(`sft_loss_from_stats`, `preference_loss`, `kto_loss`); log-probs come from jaxtune/logprobs.py.

How to add an objective
-----------------------
Write one module here, e.g. ``jaxtune/objectives/focal.py`` (it is found on its own), plus its
tests. Nothing in the trainer, the CLI or the config package changes::

    import jax.numpy as jnp
    import ml_collections

    from jaxtune.errors import UserError
    from jaxtune.objectives import base
    from jaxtune.objectives.sft import SFT  # reuse SFT's data ([B, T] rows) and weight (trained tokens)


    @base.register("focal")
    class Focal(SFT):
        '''Focal loss (Lin et al. 2017) on next tokens: -(1 - p)^gamma log p, gamma=0 is SFT.'''

        @classmethod
        def config_section(cls):
            c = ml_collections.ConfigDict()
            c.gamma = 2.0  # -> config.objective.focal.gamma (only when objective.type='focal')
            return c

        @classmethod
        def validate(cls, config):
            if cls.section_of(config).gamma < 0:
                raise UserError(f"config key '{cls.key('gamma')}' must be >= 0")

        def loss(self, model, params, batch, *, frozen=None, rng=None, ref_params=None):
            rngs = None if rng is None else {"dropout": rng}
            stats = model.token_stats(params, batch, frozen=frozen, rngs=rngs)
            mask = batch["loss_mask"].astype(jnp.float32)
            focal = jnp.power(1.0 - jnp.exp(stats.logp), self.section.gamma)
            total = -jnp.sum(focal * stats.logp * mask)
            return total, {"loss": total, "nll": -jnp.sum(stats.logp * mask), "trained_tokens": jnp.sum(mask)}

Then ``jaxtune train --config configs/sft_llama.py --config.objective.type=focal
--config.objective.focal.gamma=1.0 ...`` runs it (its section is shown, saved and validated only
when it is selected): the step divides the summed loss and metrics by `weight(global batch)` (SFT's: the
trained tokens; `summed_metrics` lists totals left as they are), so gradient accumulation is
exact. An objective with other data overrides `load_data`, `train_dataset` and `batch_shapes`;
one that needs a reference returns it from `reference_kind`; an RL objective samples its batch
from the current policy in `next_batch(state, data_iter, rng)` (with the model and tokenizer it
kept in `start(run)`).
"""

from jaxtune.logprobs import (TokenStats, head_token_stats, masked_sequence_sums, model_token_stats, token_logprobs,
                              token_stats)
from jaxtune.objectives.base import Objective, RunContext, adapt_model_config, build, get, names, register
from jaxtune.objectives.kto import kto_loss
from jaxtune.objectives.preference import preference_loss, sequence_logps
from jaxtune.objectives.sft import sft_loss, sft_loss_from_stats

__all__ = ["Objective", "RunContext", "TokenStats", "adapt_model_config", "build", "get", "head_token_stats", "kto_loss",
           "masked_sequence_sums", "model_token_stats", "names", "preference_loss", "register", "sequence_logps",
           "sft_loss", "sft_loss_from_stats", "token_logprobs", "token_stats"]
