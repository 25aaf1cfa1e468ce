"""A trained model ready to sample or evaluate: from a run's latest checkpoint or an HF directory.

Used by `jaxtune generate` and `jaxtune eval`. A workdir supplies its saved config (unless one is
given), its tokenizer (data.tokenizer, model.hf_dir or the tokenizer trained into the workdir)
and the params of its latest checkpoint (a PEFT run: its base re-created + adapters); an HF dir
supplies config.json, weights and tokenizer.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import ml_collections

from jaxtune import config as config_lib
from jaxtune import models, paths
from jaxtune.checkpoint import latest_checkpoint, local_target, restore_newest, saved_config
from jaxtune.data.datasets import TOKENIZER_FILE
from jaxtune.data.tokenizers import Tokenizer, load_tokenizer
from jaxtune.errors import UserError


@dataclasses.dataclass
class Loaded:
    config: ml_collections.ConfigDict
    model: Any
    params: Any  # the weights, or a variables dict (a PEFT run's base + adapters)
    tokenizer: Tokenizer
    step: int | None  # checkpoint step (None for an HF dir)


def _tokenizer(path: Path, what: str, config: ml_collections.ConfigDict) -> Tokenizer:
    if not path.exists():
        raise UserError(f"{what}: no tokenizer at {path}")
    return load_tokenizer(path, add_bos=config.data.get("add_bos", "auto"))  # configs saved before data.add_bos: auto


def from_hf_dir(hf_dir: str, config: ml_collections.ConfigDict | None = None) -> Loaded:
    """An HF model dir (config.json, *.safetensors, tokenizer.json or tokenizer.model)."""
    from jaxtune.models.hf_check import validate_hf_dir

    if not paths.path(hf_dir).is_dir():
        raise UserError(f"--hf_dir {hf_dir}: no such directory")
    config = ml_collections.ConfigDict((config or config_lib.base_config()).to_dict())
    validate_hf_dir(hf_dir, tokenizer=not config.data.tokenizer)
    config.model.hf_dir = str(hf_dir)
    tokenizer = _tokenizer(paths.path(config.data.tokenizer or hf_dir), f"--hf_dir {hf_dir}", config)
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
                dtype: str | None = None) -> Run:
    """The latest checkpoint of a `jaxtune train` run, its saved config (or `config`) and tokenizer.

    The saved config wins when there is one: it fixes the checkpoint's shapes. The tokenizer is
    the one training used: data.tokenizer, else model.hf_dir's, else the one trained into the workdir.
    """
    import orbax.checkpoint as ocp

    from jaxtune.trainer import state as state_lib

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
    if dtype:
        trained.model.param_dtype = dtype
    tokenizer_path = paths.path(trained.data.get("tokenizer") or trained.model.get("hf_dir")
                                or paths.path(workdir) / TOKENIZER_FILE)
    needs_vocab = not trained.model.get("hf_dir") and trained.model.get("vocab_size") is None
    tokenizer = _tokenizer(tokenizer_path, f"{what} {workdir}", trained) if needs_vocab else None
    model_config = state_lib.model_config_from(trained, vocab_size=tokenizer.vocab_size if tokenizer else None)
    if getattr(model_config, "num_labels", None) and model_config.pad_token_id is None:
        # A sequence classifier (reward model) pools its last non-pad token: transformers needs the
        # tokenizer's pad id in config.json, and our own scoring uses the same rule.
        tokenizer = tokenizer or _tokenizer(tokenizer_path, f"{what} {workdir}", trained)
        model_config = model_config.replace(pad_token_id=tokenizer.pad_id)
    return Run(trained, model_config, state, step, tokenizer, tokenizer_path)


def from_workdir(workdir: str, config: ml_collections.ConfigDict | None = None) -> Loaded:
    """The latest checkpoint of a `jaxtune train` run (its saved config unless `config` is given).

    A given config only steers evaluation (the saved one builds the model). A PEFT run (lora,
    dora, prefix) checkpoints adapters only: its base is re-created as training saw it
    (model.hf_dir or the seed's init, quantised for QLoRA) and `params` is the variables dict of
    base + adapters.
    """
    from jaxtune.trainer import state as state_lib

    run = restore_run(workdir, "--workdir", config=config)
    tokenizer = run.tokenizer or _tokenizer(run.tokenizer_path, f"--workdir {workdir}", run.config)
    params = run.state["params"]
    if state_lib.peft_spec(run.config) is not None:  # the base as training held it, re-created by the state builder
        params = state_lib.variables_for(params, state_lib.base_params(run.config, run.model_config))
    return Loaded(config or run.config, state_lib.build_model(run.config, run.model_config), params, tokenizer, run.step)


def load(*, workdir: str | None, hf_dir: str | None, config: ml_collections.ConfigDict | None = None) -> Loaded:
    if bool(workdir) == bool(hf_dir):
        raise UserError("give exactly one of --workdir (a jaxtune run) or --hf_dir (a Hugging Face model dir)")
    return from_hf_dir(hf_dir, config) if hf_dir else from_workdir(workdir, config)
