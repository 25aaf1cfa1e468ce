"""A trained model ready to sample or evaluate: from a run's latest checkpoint or an HF directory.

Used by `jaxtune generate` and `jaxtune eval`. A workdir supplies its saved config (unless one is
given), its tokenizer (data.tokenizer, model.hf_dir or the tokenizer trained into the workdir)
and the params of its latest checkpoint; an HF dir supplies config.json, weights and tokenizer.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import ml_collections

from jaxtune import config as config_lib
from jaxtune import models
from jaxtune.checkpoint import latest_checkpoint
from jaxtune.data.datasets import TOKENIZER_FILE
from jaxtune.data.tokenizers import Tokenizer, load_tokenizer
from jaxtune.errors import UserError


@dataclasses.dataclass
class Loaded:
    config: ml_collections.ConfigDict
    model: Any
    params: Any
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
    """The latest checkpoint of a `jaxtune train` run (its saved config unless `config` is given)."""
    import orbax.checkpoint as ocp

    from jaxtune import trainer

    directory, step = latest_checkpoint(workdir, "--workdir")
    with ocp.CheckpointManager(directory) as manager:
        items = {"state": ocp.args.StandardRestore()}
        if config is None:
            items["config"] = ocp.args.JsonRestore()
        restored = manager.restore(step, args=ocp.args.Composite(**items))
    if config is None:
        config = ml_collections.ConfigDict(restored.config)
    if config.model.get("hf_dir"):
        tokenizer_path = Path(config.data.get("tokenizer") or config.model.hf_dir)
    else:
        tokenizer_path = Path(config.data.get("tokenizer") or Path(workdir) / TOKENIZER_FILE)
    tokenizer = _tokenizer(tokenizer_path, f"--workdir {workdir}")
    model_config = trainer.model_config_from(config, vocab_size=tokenizer.vocab_size)
    return Loaded(config, models.build(model_config), restored.state["params"], tokenizer, step)


def load(*, workdir: str | None, hf_dir: str | None, config: ml_collections.ConfigDict | None = None) -> Loaded:
    if bool(workdir) == bool(hf_dir):
        raise UserError("give exactly one of --workdir (a jaxtune run) or --hf_dir (a Hugging Face model dir)")
    return from_hf_dir(hf_dir, config) if hf_dir else from_workdir(workdir, config)
