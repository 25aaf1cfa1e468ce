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
from jaxtune import models
from jaxtune.checkpoint import latest_checkpoint, saved_config
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


def _tokenizer(path: Path, what: str) -> Tokenizer:
    if not path.exists():
        raise UserError(f"{what}: no tokenizer at {path}")
    return load_tokenizer(path)


def from_hf_dir(hf_dir: str, config: ml_collections.ConfigDict | None = None) -> Loaded:
    """An HF model dir (config.json, *.safetensors, tokenizer.json or tokenizer.model)."""
    if not Path(hf_dir).is_dir():
        raise UserError(f"--hf_dir {hf_dir}: no such directory")
    config = ml_collections.ConfigDict((config or config_lib.base_config()).to_dict())
    config.model.hf_dir = str(hf_dir)
    tokenizer = _tokenizer(Path(config.data.tokenizer or hf_dir), f"--hf_dir {hf_dir}")
    model, params = models.from_pretrained(hf_dir)
    return Loaded(config, model, params, tokenizer, None)


def from_workdir(workdir: str, config: ml_collections.ConfigDict | None = None) -> Loaded:
    """The latest checkpoint of a `jaxtune train` run (its saved config unless `config` is given).

    The model is built from the saved config when there is one (it fixes the checkpoint's shapes);
    a given config only steers evaluation. A PEFT run (lora, dora, prefix) checkpoints adapters
    only: its base is re-created as training saw it (model.hf_dir or the seed's init, quantised
    for QLoRA) and `params` is the variables dict of base + adapters.
    """
    import orbax.checkpoint as ocp

    from jaxtune import trainer

    directory, step = latest_checkpoint(workdir, "--workdir")
    with ocp.CheckpointManager(directory) as manager:
        state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
        saved = saved_config(manager, step)
    if saved is None and config is None:
        raise UserError(f"--workdir {workdir}: checkpoint {directory / str(step)} has no saved config; pass --config")
    trained = ml_collections.ConfigDict(saved) if saved is not None else config
    if trained.model.get("hf_dir"):
        tokenizer_path = Path(trained.data.get("tokenizer") or trained.model.hf_dir)
    else:
        tokenizer_path = Path(trained.data.get("tokenizer") or Path(workdir) / TOKENIZER_FILE)
    tokenizer = _tokenizer(tokenizer_path, f"--workdir {workdir}")
    model_config = trainer.model_config_from(trained, vocab_size=tokenizer.vocab_size)
    params = state["params"]
    if model_config.peft is not None:
        params = trainer.variables_for(params, trainer.frozen_base_on_host(trained, model_config))
    return Loaded(config or trained, models.build(model_config), params, tokenizer, step)


def load(*, workdir: str | None, hf_dir: str | None, config: ml_collections.ConfigDict | None = None) -> Loaded:
    if bool(workdir) == bool(hf_dir):
        raise UserError("give exactly one of --workdir (a jaxtune run) or --hf_dir (a Hugging Face model dir)")
    return from_hf_dir(hf_dir, config) if hf_dir else from_workdir(workdir, config)
