"""Where PPO's separate value model starts (`objective.ppo.value_model='separate'`, `value_init`).

The value model on its own backbone is a reward model's shape (this run's decoder with a one-label
`score` head, params["value_model"]), so it starts from either

- ``policy``: a copy of the policy's start backbone (the SFT model: model.init_from / hf_dir / the
  seed), the head from the seed's init (TRL's PPO starts its value model from the reward model by
  default; InstructGPT from the reward model too); or
- a reward model: a `jaxtune train` reward run's workdir (full fine-tuning) or an exported
  `*ForSequenceClassification` directory, optionally written ``reward_model:<dir>`` as in
  `objective.ppo.rewards`. It must have the policy's shape (the value backbone is the policy's).

Under PEFT both backbones are in the frozen base and each gets its own adapters (the interceptor
keys adapters by module path); the copy is a second buffer, so the base holds two backbones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune import inference, loading, models, scoring
from jaxtune import workdir as workdir_lib
from jaxtune.errors import UserError

VALUE_MODEL = loading.VALUE_MODEL
HEAD = "score"  # the value model's head (a reward model's)


def source_dir(spec: str) -> str:
    """The directory a non-'policy' value_init names (a 'reward_model:' prefix dropped)."""
    return spec.removeprefix(loading.REWARD_MODEL_PREFIX)


def check_source(spec: str, key: str) -> None:
    """A UserError naming `key` unless `spec` is a directory that can hold a reward model."""
    path = Path(source_dir(spec))
    if not source_dir(spec) or not path.is_dir():
        raise UserError(f"config key '{key}' is {spec!r}: expected 'policy', a reward run's workdir or an exported "
                        "*ForSequenceClassification directory (a local directory)")


def start_value_model(weights: dict, spec: str, setup, *, key: str, frozen_base: bool, peft=None) -> dict:
    """`weights` (params, or a PEFT run's frozen base when `frozen_base`, prepared with `peft`) with
    their value model replaced by its start (module docstring), in the same shardings and dtypes."""
    current = weights[VALUE_MODEL]
    if spec == "policy":
        backbone = {k: weights[k] for k in current if k != HEAD}
        shardings = jax.tree.map(lambda x: x.sharding, {k: current[k] for k in backbone})
        copied = jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=shardings)(backbone)  # its own buffers
        return {**weights, VALUE_MODEL: {**current, **copied}}
    loaded = _reward_model_params(spec, key, setup)
    if frozen_base and peft is not None:
        loaded = loading.prepare_base(loaded, peft)
    return {**weights, VALUE_MODEL: _placed_like(loaded, current, spec, key)}


def _reward_model_params(spec: str, key: str, setup) -> dict:
    """A reward model's weights (a one-label score head) from a run workdir (every process holds
    them whole) or a HF directory (placed in the run's mesh, as the value model's shards)."""
    check_source(spec, key)
    directory = source_dir(spec)
    if (Path(directory) / workdir_lib.CHECKPOINTS).is_dir():
        run = inference.restore_run(directory, key, adapt=_reward_run_model)
        model_config, params = run.model_config, run.state["params"]
        if loading.peft_spec(run.config) is not None:
            raise UserError(f"config key '{key}': {directory} is a PEFT reward run (adapters over a base); export it "
                            "merged (jaxtune export --merge) and pass that directory")
    else:
        model, params = models.from_pretrained(directory, mesh=setup.mesh, rules=setup.rule_table)
        model_config = model.config
    if getattr(model_config, "num_labels", None) != 1:
        raise UserError(f"config key '{key}': {directory} is not a reward model (num_labels="
                        f"{getattr(model_config, 'num_labels', None)}; a reward model is a jaxtune reward run or an "
                        "exported *ForSequenceClassification with one label)")
    return params


def _reward_run_model(config, model_config):
    """The model a restored run trained: a reward run's carries the one-label head."""
    return scoring.reward_head(model_config) if config.objective.get("type") == scoring.REWARD_OBJECTIVE else model_config


def _placed_like(loaded: Any, current: Any, spec: str, key: str) -> Any:
    """`loaded` in `current`'s structure, dtypes and shardings (a UserError naming the first mismatch)."""
    flat_loaded = dict(jax.tree_util.tree_flatten_with_path(loaded)[0])
    flat_current, treedef = jax.tree_util.tree_flatten_with_path(current)
    names = {jax.tree_util.keystr(p) for p, _ in flat_current}
    extra = sorted({jax.tree_util.keystr(p) for p in flat_loaded} - names)
    out = []
    for path, target in flat_current:
        name = jax.tree_util.keystr(path)
        source = flat_loaded.get(path)
        if source is None or tuple(source.shape) != tuple(target.shape):
            found = "missing" if source is None else f"shape {tuple(source.shape)}"
            raise UserError(f"config key '{key}' ({spec}): the reward model's {name} is {found}, the value model "
                            f"needs shape {tuple(target.shape)} (the value backbone has the policy's shape)")
        if isinstance(source, jax.Array) and source.sharding.is_equivalent_to(target.sharding, source.ndim):
            out.append(source.astype(target.dtype))  # already in the run's shards
            continue
        host = np.asarray(jax.device_get(source)).astype(target.dtype)  # whole on this process
        out.append(jax.make_array_from_callback(host.shape, target.sharding, lambda index, host=host: host[index]))
    if extra:
        raise UserError(f"config key '{key}' ({spec}): the reward model has {extra[0]}, which the value model does not "
                        "(it must have the policy's shape and one score head)")
    return jax.tree_util.tree_unflatten(treedef, out)
