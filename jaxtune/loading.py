"""A run's model, weights and tokenizer from its config: the one place that resolves them.

Training (trainer/), `jaxtune generate/eval/export/convert` (inference.py, cli.py), the Python
API and the objectives all ask this module, so they agree on:

- the model config (`model_config_from`: model.hf_dir's config.json, else the named variant with
  overrides; the objective's adaptation, e.g. a reward head, is passed in by the caller);
- where the weights a fresh run starts from come from (`start_weights`: model.hf_dir >
  model.init_from > seed; PEFT: the frozen base, `base_params`), so a frozen reference copy is
  rebuilt on resume rather than checkpointed;
- the tokenizer (`tokenizer_path`, `data_settings`): data.tokenizer > model.hf_dir's own > the
  one already in the workdir > model.init_from's (the starting run's) > one trained on the data
  into the workdir (by the data layer, `data.datasets.run_tokenizer`);
- Hugging Face Hub ids in model.hf_dir, data.tokenizer and `reward_model:` specs (`hub_ids`,
  `pin_hub_ids`): downloaded once per process by jaxtune.hub before any device is used, the
  commit each resolved to recorded in the workdir (workdir.HUB_COMMITS) and reused on resume, so
  a resumed run and `jaxtune export/generate --workdir` read the same files as its first start.

It sits below the objectives and the trainer (it names neither) and above models, peft and data.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxtune import checkpoint as checkpoint_lib
from jaxtune import config as config_lib
from jaxtune import distributed, hub, models, paths, sharding, workdir as workdir_lib
from jaxtune.data.tokenizers import Tokenizer, load_tokenizer
from jaxtune.errors import UserError
from jaxtune.models.hf import read_hf_config
from jaxtune.peft import base as peft_base
from jaxtune.peft import prefix, quant, wrapper

ModelAdapter = Callable[[Any], Any]  # model config -> the model config the objective trains

REWARD_MODEL_PREFIX = "reward_model:"  # a GRPO reward spec naming a reward model (a run dir, HF dir or Hub id)

_MODEL_OVERRIDE_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
    "head_dim", "max_position_embeddings", "rope_theta", "tie_word_embeddings",
)


def model_config_from(config: ml_collections.ConfigDict, vocab_size: int | None = None, *,
                      adapt: ModelAdapter | None = None):
    """The model config: named variant + non-None overrides (a from-scratch vocab comes from the
    tokenizer), then `adapt` (the run's `Objective.adapt_model_config`, e.g. a reward model's head:
    the layers above pass it in, this module names no objective)."""
    m = config.model
    numerics = dict(dtype=m.dtype, param_dtype=m.param_dtype, remat_policy=m.remat_policy)
    if not is_encoder_decoder(config):  # T5 always runs its biased reference attention (docs/guides/t5.md)
        numerics["attention"] = m.get("attention", "auto")  # configs saved before the setting existed
        numerics["layer_loop"] = m.get("layer_loop", "auto")
    if m.hf_dir:
        model_config = models.config_from_pretrained(hf_dir(config), **numerics)
    else:
        overrides = {k: m[k] for k in _MODEL_OVERRIDE_KEYS if m[k] is not None}
        if "vocab_size" not in overrides and vocab_size is not None:
            overrides["vocab_size"] = vocab_size
        model_config = models.get_config(m.family, m.variant, **overrides, **numerics)
    return model_config if adapt is None else adapt(model_config)


def encoder_decoder_family(config: ml_collections.ConfigDict, *, resolve_hub: bool = True) -> str | None:
    """What names the model (for errors) when the run's model (`model.hf_dir` or `model.family`) is an
    encoder-decoder (T5), else None. `resolve_hub=False` (config validation, before Hub ids are
    pinned and downloaded) leaves a Hub id unchecked (None)."""
    m = config.model
    if m.hf_dir:
        if not resolve_hub and hub.is_hub_id(m.hf_dir):
            return None
        try:  # a Hub id: its pinned snapshot
            model_type = read_hf_config(hub.local_path(m.hf_dir, "model")).get("model_type")
        except UserError:
            return None  # not (yet) a model directory: loading the model names the problem
        if model_type is None or not any(model_type in f.hf_model_types for f in models.FAMILIES.values()):
            return None  # config_from_pretrained names the problem
        family, where = models.family_for_hf(model_type), f"model.hf_dir {m.hf_dir} (model_type {model_type!r})"
    elif m.family in models.FAMILIES:
        family, where = models.FAMILIES[m.family], f"config key 'model.family' is {m.family!r}, which"
    else:
        return None
    return where if family.is_encoder_decoder else None


def is_encoder_decoder(config: ml_collections.ConfigDict) -> bool:
    """Whether the run trains an encoder-decoder: its batches then carry a decoder stream too."""
    return encoder_decoder_family(config) is not None


def projection_names(config: ml_collections.ConfigDict, *, resolve_hub: bool = True) -> tuple[str, ...] | None:
    """The run's model's projection module names (what `peft.targets` choose from): T5's q, k, v, o,
    wi / wi_0, wi_1, wo, or the decoder-only families' q_proj..down_proj. `resolve_hub=False` (config
    validation, before Hub ids are pinned) gives None for a Hub id: its model is not known yet."""
    if not resolve_hub and config.model.hf_dir and hub.is_hub_id(config.model.hf_dir):
        return None
    if encoder_decoder_family(config, resolve_hub=resolve_hub) is None:
        return peft_base.DECODER_PROJECTIONS
    model_config = model_config_from(config)
    return models.family_of(model_config).projection_names(model_config)


def peft_spec(config: ml_collections.ConfigDict) -> peft_base.Spec | None:
    """The run's PEFT settings (config.peft), validated against the run's model; None for full fine-tuning."""
    if "peft" not in config:
        return None
    projections = projection_names(config) if config.peft.method != "none" else None
    return peft_base.spec_from_config(config.peft, projections or peft_base.DECODER_PROJECTIONS)


def build_model(config: ml_collections.ConfigDict, model_config):
    """The model a run trains and samples: `model_config`'s model, wrapped by the run's PEFT method."""
    return wrapper.wrap(models.build(model_config), peft_spec(config))


def peft_base_pointer(config: ml_collections.ConfigDict) -> dict | None:
    """Where a LoRA run's frozen base comes from (written beside its adapters-only checkpoints)."""
    if config.peft.method == "none":
        return None
    if config.model.hf_dir:
        return {"hf_dir": config.model.hf_dir}
    return {"family": config.model.family, "variant": config.model.variant, "seed": config.seed}


def variables_for(params, frozen=None) -> dict:
    """The model's variables: the weights, or a PEFT run's base + adapters (prefix runs: the
    effective prefixes of their trainable tree)."""
    if frozen is None:
        return {"params": params}
    return {"params": frozen, peft_base.COLLECTION: prefix.effective(params)}


def base_model(model) -> nn.Module:
    """The model without adapters (its params are the base params of the LoRA model)."""
    return wrapper.unwrap(model)


def prepare_base(base, spec):
    """A PEFT run's frozen base as it is held: float weights cast to `spec.base_dtype` (when set),
    then QLoRA's decoder kernels as NF4/int8 codes (when `spec.quantize`)."""
    if spec is None:
        return base
    if spec.base_dtype:
        dtype = jnp.dtype(spec.base_dtype)
        base = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, base)
    if spec.quantize == "none":
        return base
    return quant.quantize_params(base, spec.quantize, spec.quant_block_size)


def base_params(config: ml_collections.ConfigDict, model_config, setup=None, *, as_held: bool = True):
    """A PEFT run's frozen base as training holds it (cast/quantised): from model.hf_dir, or the
    seed's init. With `setup` (a TrainSetup) in its training shardings; without, on the default
    device outside any mesh (generate, eval, export). No PEFT (`peft_spec(config)` None): the
    plain model's weights from the same sources. `as_held=False` (without `setup`): the float base
    before PEFT casts or quantises it."""
    spec = peft_spec(config) if as_held else None
    if setup is None:
        if config.model.hf_dir:
            head = {"num_labels": model_config.num_labels} if hasattr(model_config, "num_labels") else {}  # a reward model's (T5: none)
            _, base = models.from_pretrained(hf_dir(config), dtype=model_config.param_dtype, **head)
        else:
            plain = models.build(model_config)
            init = jax.jit(lambda rng: sharding.unbox(plain.init(rng, jnp.zeros((1, 1), jnp.int32))["params"]))
            base = init(jax.random.key(config.seed))
        return base if spec is None else jax.jit(functools.partial(prepare_base, spec=spec))(base)
    shardings = setup.state_shardings
    if not config.model.hf_dir:
        base = jax.jit(lambda rng: setup.init_state(rng).frozen, out_shardings=shardings.frozen)(
            jax.random.key(config.seed))
        return _objective_start(base, setup, frozen_base=True)
    plain = models.build(model_config)
    abstract = jax.eval_shape(plain.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    base = models.load_params(hf_dir(config), plain.config,
                              sharding.logical_shardings(abstract, setup.mesh, setup.rule_table))
    base = _with_value_head(base, config, setup, lambda state: state.frozen)
    if spec.quantize != "none" or spec.base_dtype:
        base = jax.jit(functools.partial(prepare_base, spec=spec), out_shardings=shardings.frozen)(base)
    return _objective_start(base, setup, frozen_base=True)


def start_weights(config: ml_collections.ConfigDict, setup) -> Any:
    """The weights a fresh run starts from (PEFT: the frozen base), in their shards: model.hf_dir >
    model.init_from > seed. Deterministic, so a frozen reference copy is rebuilt from it on resume."""
    model_config, shardings = setup.model_config, setup.state_shardings
    if peft_spec(config) is not None:
        return base_params(config, model_config, setup)
    if config.model.hf_dir:
        params = models.load_params(hf_dir(config), model_config, shardings.params)
        params = _with_value_head(params, config, setup, lambda state: state.params)
    elif config.model.init_from:
        target = checkpoint_lib.abstract_with_shardings(setup.abstract_state.params, shardings.params)
        params = _restore_init_from(config, setup, target)
    else:
        params = setup.init_state(jax.random.key(config.seed)).params
    return _objective_start(params, setup, frozen_base=False)


def _objective_start(weights: Any, setup, *, frozen_base: bool) -> Any:
    """`weights` as the run's objective starts from them (Objective.adapt_start_weights; e.g. PPO's
    separate value model); a setup without an objective (tests' stand-ins) keeps them."""
    objective = getattr(setup, "objective", None)
    return weights if objective is None else objective.adapt_start_weights(weights, setup, frozen_base=frozen_base)


def _restore_init_from(config: ml_collections.ConfigDict, setup, target) -> Any:
    """model.init_from's params; a reward model (or PPO's value head) started from a causal-LM run
    (a checkpoint without the head) takes the decoder from it and the head from the seed's init."""
    try:
        return checkpoint_lib.restore_params(config.model.init_from, target)
    except UserError:
        head = "score" if getattr(setup.model_config, "num_labels", None) else next(
            (k for k in (VALUE_HEAD, VALUE_MODEL) if k in target), VALUE_HEAD)
        if head not in target:
            raise
    decoder = checkpoint_lib.restore_params(config.model.init_from, {k: v for k, v in target.items() if k != head})
    new = jax.jit(lambda rng: setup.init_state(rng).params[head], out_shardings=setup.state_shardings.params[head])
    return {**decoder, head: new(jax.random.key(config.seed))}


VALUE_HEAD = "value_head"  # PPO's value head (model config `value_head`): in no Hugging Face checkpoint
VALUE_MODEL = "value_model"  # PPO's value model on its own backbone (`value_backbone`): filled by the objective


def _with_value_head(params: dict, config: ml_collections.ConfigDict, setup, held: Callable[[Any], Any]) -> dict:
    """`params` loaded from a Hugging Face checkpoint plus, for a model with PPO's value head, that
    head from the seed's init (`held(state)`: where the state holds it, params or the frozen base)."""
    if not getattr(setup.model_config, VALUE_HEAD, False):
        return params
    key = VALUE_MODEL if getattr(setup.model_config, "value_backbone", False) else VALUE_HEAD
    if key in params:
        return params
    init = jax.jit(lambda rng: held(setup.init_state(rng))[key], out_shardings=held(setup.state_shardings)[key])
    return {**params, key: init(jax.random.key(config.seed))}


# ---- Hugging Face Hub ids -------------------------------------------------------------------------


def hf_dir(config: ml_collections.ConfigDict) -> str:
    """model.hf_dir as a local directory: a Hub id's snapshot at the commit pinned for the run."""
    return hub.local_path(config.model.hf_dir, "model")


def hub_ids(config: ml_collections.ConfigDict) -> dict[str, str]:
    """The config's Hub ids -> what each needs ("model" or "tokenizer"): model.hf_dir,
    data.tokenizer and GRPO's `reward_model:` reward specs."""
    found = {}
    if hub.is_hub_id(config.data.get("tokenizer")):
        found[config.data.tokenizer] = "tokenizer"
    grpo = config.objective.get("grpo") if "objective" in config else None
    for spec in (grpo.get("rewards", ()) if grpo is not None else ()):
        if spec.startswith(REWARD_MODEL_PREFIX) and hub.is_hub_id(spec[len(REWARD_MODEL_PREFIX):]):
            found[spec[len(REWARD_MODEL_PREFIX):]] = "model"
    if hub.is_hub_id(config.model.get("hf_dir")):
        found[config.model.hf_dir] = "model"
    return found


def pin_hub_ids(config: ml_collections.ConfigDict, workdir: str | Path | None = None, *,
                record: bool = True) -> dict[str, dict]:
    """Downloads the config's Hub ids (before any device is used) at the commits recorded in
    `workdir` (a resumed run, or a command reading a run), else at their revisions, and pins them
    for this process. With `record`, process 0 writes what it resolved into the workdir. Returns
    {id: {"repo", "revision", "commit"}}."""
    wanted = hub_ids(config)
    if not wanted:
        return {}
    file = paths.path(workdir) / workdir_lib.HUB_COMMITS if workdir is not None else None
    recorded = json.loads(file.read_text()) if file is not None and file.exists() else {}
    resolved = dict(recorded)
    for ref, what in wanted.items():
        snapshot = hub.resolve(ref, what, commit=recorded.get(ref, {}).get("commit"))
        resolved[ref] = {"repo": snapshot.repo_id, "revision": snapshot.revision, "commit": snapshot.commit}
    if record and file is not None and resolved != recorded:
        distributed.on_first_process(lambda: file.write_text(json.dumps(resolved, indent=1, sort_keys=True)),
                                     "hub_commits")
    return resolved


# ---- the tokenizer ------------------------------------------------------------------------------


def tokenizer_path(config: ml_collections.ConfigDict, workdir: str | Path | None = None) -> Path | None:
    """Where the run's tokenizer is: data.tokenizer, else model.hf_dir (the model's own), else the one
    in `workdir` (trained there by an earlier start of the run), else model.init_from's (the
    starting run's, so its ids match the weights it starts from); else `workdir`'s tokenizer file,
    not there yet (training trains one on the data into it; None without a workdir). Training,
    generate/eval/export and the objectives all resolve the tokenizer here."""
    if config.data.get("tokenizer"):
        return paths.path(hub.local_path(config.data.tokenizer, "tokenizer"))
    if config.model.get("hf_dir"):
        return paths.path(hf_dir(config))
    own = paths.path(workdir) / workdir_lib.TOKENIZER_FILE if workdir is not None else None
    if own is not None and own.is_file():
        return own
    start = config.model.get("init_from")
    found = _starting_run_tokenizer(start) if start else None
    return found if found is not None else own


def _starting_run_tokenizer(start: str, hops: int = 16) -> Path | None:
    """model.init_from's tokenizer: the starting run's own file, else the one its saved config
    names (data.tokenizer, model.hf_dir, or its own init_from's, followed back), so a chain of runs
    (SFT -> DPO -> GRPO, each starting from the last) keeps the first run's ids."""
    own = paths.path(start) / workdir_lib.TOKENIZER_FILE
    if own.is_file():
        return own
    saved = checkpoint_lib.latest_saved_config(start) if hops > 0 else None
    if not saved:
        return None
    data, model = saved.get("data") or {}, saved.get("model") or {}
    if data.get("tokenizer"):
        return paths.path(hub.local_path(data["tokenizer"], "tokenizer"))
    if model.get("hf_dir"):
        return paths.path(hub.local_path(model["hf_dir"], "model"))
    return _starting_run_tokenizer(model["init_from"], hops - 1) if model.get("init_from") else None


def load_run_tokenizer(path: Path, what: str, config: ml_collections.ConfigDict) -> Tokenizer:
    """The tokenizer at `path` (a file, or a directory holding one) with the config's data.add_bos;
    a missing one is a UserError naming `what` (the command's flag and the run)."""
    if not path.exists():
        raise UserError(f"{what}: no tokenizer at {path}")
    return load_tokenizer(path, add_bos=config.data.get("add_bos", "auto"))  # configs saved before data.add_bos: auto


def data_settings(config: ml_collections.ConfigDict, workdir: str | Path | None = None) -> ml_collections.ConfigDict:
    """config.data as the data layer takes it (plain settings, no config loading there):
    `tokenizer` resolved by `tokenizer_path` (left empty when the data layer is to train one into
    the workdir) and `default_task`, the single-task keys (data.train_path + data.templates, ...)
    as one task of the config schema's `task_config`."""
    data = ml_collections.ConfigDict(config.data.to_dict())
    data.seq2seq = is_encoder_decoder(config)
    path = tokenizer_path(config, workdir)
    if data.tokenizer or config.model.get("hf_dir"):
        data.tokenizer = str(path)  # a file, or a dir (load_tokenizer picks tokenizer.json, else tokenizer.model)
    elif path is not None and path.is_file():
        data.tokenizer = str(path)
    data.default_task = config_lib.task_config(
        source=data.source_kind, path=data.train_path, split=data.split, name=data.name, revision=data.revision,
        format=data.format, chat_template=data.chat_template, templates=tuple(tuple(t) for t in data.templates),
        truncation=data.truncation, word_dropout=data.word_dropout, on_error=data.on_error)
    # data.eval_path read the same way (a held-out split of the same kind of source)
    data.eval_task = config_lib.task_config(
        source=data.source_kind, path=data.eval_path, split=data.eval_split, name=data.name, revision=data.revision,
        format=data.format, chat_template=data.chat_template, templates=tuple(tuple(t) for t in data.templates),
        truncation=data.truncation, on_error=data.on_error)
    return data
