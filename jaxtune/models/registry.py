"""The model families and their registry: config -> module, HF model_type -> family.

Kept apart from `jaxtune.models` (which re-exports it) so that models/hf.py can use the registry
at import time without importing its own package's __init__ (no import cycle).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxtune.errors import UserError
from jaxtune.models import gemma, gemma2, gemma3, hf_mapping, layers, llama, mistral, qwen2, qwen3, t5


class Family(NamedTuple):
    config_cls: type
    variants: dict[str, Any]
    module_cls: type[nn.Module]
    # Hugging Face interop (see hf_mapping): config.json "model_type" values this family reads,
    # config.json dict -> config, config -> config.json dict, config -> [ParamMap].
    hf_model_types: tuple[str, ...]
    config_from_hf: Callable[..., Any]
    config_to_hf: Callable[[Any], dict]
    hf_param_maps: Callable[[Any], list]
    # config -> names of tensors a checkpoint may hold that no map reads (T5's copies of its shared
    # embedding): loading skips them instead of calling the checkpoint mismatched.
    hf_unused_tensors: Callable[[Any], frozenset]
    # True for encoder-decoders (T5): the module takes encoder inputs and `decoder_inputs`.
    is_encoder_decoder: bool = False
    # config -> the module names of the model's linear projections (HF's names; what adapter targets
    # name): the decoder-only families' q_proj..down_proj unless the family module says otherwise.
    projection_names: Callable[[Any], tuple[str, ...]] = lambda config: layers.DECODER_PROJECTIONS
    # (config, the checkpoint's tensor names) -> config: what config.json cannot say alone (T5 files
    # written by transformers >= 5 always say tied, but a distinct lm_head.weight means untied).
    config_for_checkpoint: Callable[[Any, frozenset], Any] = lambda config, names: config


def _family(module) -> Family:
    """A family module exposes the same names: config class, VARIANTS, module class, HF hooks.

    The HF hooks are wrapped with the shared sequence-classification head (hf_mapping): a config
    with `num_labels` reads and writes its family's `*ForSequenceClassification` checkpoints.
    """
    config_cls = next(v for k, v in vars(module).items() if k.endswith("Config") and isinstance(v, type))
    module_cls = next(v for k, v in vars(module).items() if isinstance(v, type) and issubclass(v, nn.Module) and config_cls.__name__ == k + "Config")

    def config_from_hf(hf, **overrides):
        return module.config_from_hf(hf, **{**hf_mapping.head_fields_from_hf(hf), **overrides})

    def config_to_hf(config):
        return hf_mapping.head_config_to_hf(module.config_to_hf(config), config)

    def hf_param_maps(config):
        return hf_mapping.head_param_maps(module.hf_param_maps(config), config)

    unused = getattr(module, "hf_unused_tensors", lambda config: frozenset())
    projections = getattr(module, "projection_names", lambda config: layers.DECODER_PROJECTIONS)
    for_checkpoint = getattr(module, "config_for_checkpoint", lambda config, names: config)
    return Family(config_cls, module.VARIANTS, module_cls, module.HF_MODEL_TYPES, config_from_hf, config_to_hf,
                  hf_param_maps, unused, getattr(module_cls, "is_encoder_decoder", False), projections, for_checkpoint)


FAMILIES: dict[str, Family] = {
    "llama": _family(llama),
    "mistral": _family(mistral),
    "qwen2": _family(qwen2),
    "qwen3": _family(qwen3),
    "gemma": _family(gemma),
    "gemma2": _family(gemma2),
    "gemma3": _family(gemma3),
    "t5": _family(t5),
}


def family_of(config) -> Family:
    """The family a config object belongs to."""
    for fam in FAMILIES.values():
        if type(config) is fam.config_cls:
            return fam
    raise TypeError(f"No model family registered for config type {type(config).__name__}.")


def family_for_hf(model_type: str) -> Family:
    """The family that reads a Hugging Face config.json with this `model_type`."""
    for fam in FAMILIES.values():
        if model_type in fam.hf_model_types:
            return fam
    supported = sorted(t for fam in FAMILIES.values() for t in fam.hf_model_types)
    raise UserError(f"Hugging Face model_type {model_type!r} is not supported; supported: {', '.join(supported)}")


def _closest(name: str, valid) -> str:
    match = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.0)
    return f" Did you mean {match[0]!r}?" if match else ""


def get_config(family: str, variant: str, **overrides: Any):
    """A variant's config with field overrides: get_config("llama", "tiny", dtype="bfloat16")."""
    if family not in FAMILIES:
        raise UserError(
            f"Unknown model family {family!r}; valid families: {sorted(FAMILIES)}."
            f"{_closest(family, FAMILIES)}"
        )
    fam = FAMILIES[family]
    if variant not in fam.variants:
        raise UserError(
            f"Unknown {family} variant {variant!r}; valid variants: {sorted(fam.variants)}."
            f"{_closest(variant, fam.variants)}"
        )
    fields = [f.name for f in dataclasses.fields(fam.config_cls)]
    for key in overrides:
        if key not in fields:
            raise UserError(
                f"Unknown {family} config field {key!r}.{_closest(key, fields)} "
                f"Valid fields: {fields}."
            )
    return dataclasses.replace(fam.variants[variant], **overrides)


def build(config) -> nn.Module:
    """The module for a config, chosen by the config's type."""
    return family_of(config).module_cls(config)


def abstract_params(config) -> Any:
    """The model's params as unboxed shapes (jax.eval_shape), so 70B configs cost no memory."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    return nn.meta.unbox(jax.eval_shape(build(config).init, jax.random.key(0), tokens)["params"])


def count_params(config) -> int:
    """Parameter count from shapes only."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(config)))
