"""A trained model ready to sample or evaluate: from a run's latest checkpoint or an HF directory.

Used by `jaxtune generate` and `jaxtune eval`. A workdir supplies its saved config (unless one is
given), its tokenizer (loading.tokenizer_path: data.tokenizer, model.hf_dir, the tokenizer trained
into the workdir or model.init_from's) and the params of its latest checkpoint (a PEFT run: its
base re-created + adapters); an HF dir supplies config.json, weights and tokenizer.

The model a run trained may be its objective's adaptation of the configured one (a reward
model's scalar head): callers above the objectives pass `adapt(config, model_config)` in (e.g.
`objectives.adapt_model_config`); this module names no objective.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_collections

import orbax.checkpoint as ocp

from jaxtune import config as config_lib
from jaxtune import hub, loading, models, paths
from jaxtune.checkpoint import latest_checkpoint, local_target, restore_newest, saved_config
from jaxtune.data.tokenizers import Tokenizer
from jaxtune.errors import UserError
from jaxtune.hf_check import validate_hf_dir

# (the run's config, the configured model config) -> the model config the run trained
RunModelAdapter = Callable[[ml_collections.ConfigDict, Any], Any]


@dataclasses.dataclass
class Loaded:
    config: ml_collections.ConfigDict
    model: Any
    params: Any  # the weights, or a variables dict (a PEFT run's base + adapters)
    tokenizer: Tokenizer
    step: int | None  # checkpoint step (None for an HF dir)


def from_hf_dir(hf_dir: str, config: ml_collections.ConfigDict | None = None) -> Loaded:
    """An HF model dir (config.json, *.safetensors, tokenizer.json or tokenizer.model), or a Hub id
    (`org/name[@revision]`, downloaded by jaxtune.hub)."""
    hf_dir = hub.local_path(hf_dir, "model")
    if not paths.path(hf_dir).is_dir():
        raise UserError(f"--hf_dir {hf_dir}: no such directory")
    config = ml_collections.ConfigDict((config or config_lib.base_config()).to_dict())
    validate_hf_dir(hf_dir, tokenizer=not config.data.tokenizer)
    config.model.hf_dir = str(hf_dir)
    tokenizer = loading.load_run_tokenizer(loading.tokenizer_path(config), f"--hf_dir {hf_dir}", config)
    model, params = models.from_pretrained(hf_dir)
    return Loaded(config, model, params, tokenizer, None)


@dataclasses.dataclass
class Run:
    """A run's latest checkpoint as saved: what convert/export/generate/eval all start from."""

    config: ml_collections.ConfigDict  # the config the run trained with
    model_config: Any
    state: dict  # the saved train state (params: the weights, or a PEFT run's adapters)
    step: int
    tokenizer: Tokenizer | None  # loaded when the model's vocab size comes from it, else None
    tokenizer_path: Path  # tokenizer file or dir the run trained with (HF export copies from it)


def restore_run(workdir: str, what: str, *, config: ml_collections.ConfigDict | None = None,
                dtype: str | None = None, adapt: RunModelAdapter | None = None) -> Run:
    """The latest checkpoint of a `jaxtune train` run, its saved config (or `config`) and tokenizer.

    The saved config wins when there is one: it fixes the checkpoint's shapes. The tokenizer is
    the one training used (loading.tokenizer_path). `adapt(config, model_config)` gives the model
    the run's objective trained (a reward model's head); None: the model as configured.
    """
    directory, _ = latest_checkpoint(workdir, what)
    with ocp.CheckpointManager(directory) as manager:  # a damaged latest step: the one before (warned)
        step, state = restore_newest(
            manager.all_steps(),
            lambda s: manager.restore(s, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(local_target(directory / str(s) / "state")))).state,  # each process holds it all
            directory)
        saved = saved_config(manager, step)
    if saved is None and config is None:
        raise UserError(f"{what} {workdir}: checkpoint {directory / str(step)} has no saved config; pass --config")
    trained = ml_collections.ConfigDict(saved if saved is not None else config.to_dict())
    config_lib.upgrade_saved(trained)  # a run saved by an older jaxtune (its objective's keys: objectives.build)
    loading.pin_hub_ids(trained, workdir, record=False)  # its Hub ids at the commits it trained on
    if dtype:
        trained.model.param_dtype = dtype
    tokenizer_path = loading.tokenizer_path(trained, workdir)
    needs_vocab = not trained.model.get("hf_dir") and trained.model.get("vocab_size") is None
    tokenizer = loading.load_run_tokenizer(tokenizer_path, f"{what} {workdir}", trained) if needs_vocab else None
    model_config = loading.model_config_from(
        trained, vocab_size=tokenizer.vocab_size if tokenizer else None,
        adapt=None if adapt is None else (lambda model_config: adapt(trained, model_config)))
    if getattr(model_config, "num_labels", None) and model_config.pad_token_id is None:
        # A sequence classifier (reward model) pools its last non-pad token: transformers needs the
        # tokenizer's pad id in config.json, and our own scoring uses the same rule.
        tokenizer = tokenizer or loading.load_run_tokenizer(tokenizer_path, f"{what} {workdir}", trained)
        model_config = model_config.replace(pad_token_id=tokenizer.pad_id)
    return Run(trained, model_config, state, step, tokenizer, tokenizer_path)


def from_workdir(workdir: str, config: ml_collections.ConfigDict | None = None, *,
                 adapt: RunModelAdapter | None = None) -> Loaded:
    """The latest checkpoint of a `jaxtune train` run (its saved config unless `config` is given).

    A given config only steers evaluation (the saved one builds the model). A PEFT run (lora,
    dora, prefix) checkpoints adapters only: its base is re-created as training saw it
    (model.hf_dir or the seed's init, quantised for QLoRA) and `params` is the variables dict of
    base + adapters. `adapt`: as for `restore_run`.
    """
    run = restore_run(workdir, "--workdir", config=config, adapt=adapt)
    tokenizer = run.tokenizer or loading.load_run_tokenizer(run.tokenizer_path, f"--workdir {workdir}", run.config)
    params = run.state["params"]
    if loading.peft_spec(run.config) is not None:  # the base as training held it, re-created as the state builder does
        params = loading.variables_for(params, loading.base_params(run.config, run.model_config))
    return Loaded(config or run.config, loading.build_model(run.config, run.model_config), params, tokenizer, run.step)


def load(*, workdir: str | None, hf_dir: str | None, config: ml_collections.ConfigDict | None = None,
         adapt: RunModelAdapter | None = None) -> Loaded:
    """A run's latest checkpoint (`adapt`: as for `restore_run`) or an HF model dir, whichever is given."""
    if bool(workdir) == bool(hf_dir):
        raise UserError("give exactly one of --workdir (a jaxtune run) or --hf_dir (a Hugging Face model dir)")
    return from_hf_dir(hf_dir, config) if hf_dir else from_workdir(workdir, config, adapt=adapt)
