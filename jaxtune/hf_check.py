"""Checks a Hugging Face model directory before any command does real work with it.

A download that broke half-way, a hand-edited config.json or a missing tokenizer should end in
one `jaxtune: error:` line naming the file and what is wrong, not a traceback from deep inside a
JSON parser or from the middle of a sharded load. Every command that reads an HF dir (`train`
with model.hf_dir, `convert --hf_dir`, `export` of a run on one, `generate/eval --hf_dir`,
`plan`) calls `validate_hf_dir` first. It reads only config.json, the index, the safetensors
headers and the tokenizer files (no tensor data), so it costs milliseconds even for large models.
It sits above both `models` and `data` because it checks the weights against the tokenizer.
"""

from __future__ import annotations

from typing import Any

from etils import epath

from jaxtune.data.tokenizers import load_tokenizer
from jaxtune.errors import UserError
from jaxtune.models import hf


def validate_hf_dir(path: str | epath.PathLike, *, tokenizer: bool = True, **config_overrides: Any):
    """Raises a UserError naming the first damaged file of the HF dir `path`; returns its model config.

    Checked: config.json (readable, JSON, a supported model_type with the fields the family needs),
    the index (valid, every shard present, every listed tensor in its shard), every safetensors
    header (parses, sizes consistent with the file: a truncated file is caught), every tensor the
    model needs (present, expected shape, floating-point dtype), and with `tokenizer` the tokenizer
    (tokenizer.json or tokenizer.model present and loadable; its vocabulary fits the embedding).
    `config_overrides` are passed to `config_from_pretrained` (e.g. param_dtype).
    """
    config = hf.config_from_pretrained(path, **config_overrides)
    ckpt = hf._Checkpoint(epath.Path(path))
    try:
        hf.check_tensors(ckpt, config)
    finally:
        ckpt.close()
    if tokenizer:
        check_tokenizer(path, config.vocab_size)
    return config


def check_tokenizer(path: str | epath.PathLike, vocab_size: int) -> None:
    """The HF dir's tokenizer loads and its vocabulary fits the model's `vocab_size` rows."""
    path = epath.Path(path)
    if not any((path / name).exists() for name in ("tokenizer.json", "tokenizer.model")):
        raise UserError(f"{path}: no tokenizer.json or tokenizer.model (copy the tokenizer files into the "
                        "model directory, or set data.tokenizer)")
    tok = load_tokenizer(path)
    if tok.vocab_size > vocab_size:
        raise UserError(f"{path}: the tokenizer has {tok.vocab_size} tokens but config.json's vocab_size is "
                        f"{vocab_size} (embedding rows); ids past {vocab_size - 1} would have no embedding")
