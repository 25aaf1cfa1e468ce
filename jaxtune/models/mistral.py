"""Mistral: Llama plus sliding-window attention on every layer.

Params layout is exactly Llama's (see llama.py); HF tensor names are the same too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


from jaxtune.errors import UserError
from jaxtune.models import hf_mapping, layers, llama


@dataclasses.dataclass(frozen=True)
class MistralConfig(llama.LlamaConfig):
    """LlamaConfig plus `sliding_window` (None = full causal attention, as Mistral v0.2+)."""

    sliding_window: int | None = 4096

    def __post_init__(self):
        super().__post_init__()
        if self.sliding_window is not None and self.sliding_window < 1:
            raise UserError(f"MistralConfig: sliding_window={self.sliding_window}, expected >= 1 or None.")


# ----------------------------------------------------------------------------- variants

VARIANTS: dict[str, MistralConfig] = {
    "tiny": MistralConfig(
        **layers.TINY_SHAPE,
        sliding_window=16,
    ),
    # mistralai/Mistral-7B-v0.1: 7,241,732,096 params (published "7.24B"; tested vs transformers).
    "mistral-7b": MistralConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        max_position_embeddings=32768,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        sliding_window=4096,
    ),
}


# ----------------------------------------------------------------------------- modules


class MistralDecoderLayer(llama.DecoderLayer):
    config: MistralConfig

    def attention_options(self) -> dict[str, Any]:
        return {"sliding_window": self.config.sliding_window}


class Mistral(llama.Llama):
    """inputs[B,T] -> logits[B,T,vocab]; see llama.Llama for the call contract."""

    config: MistralConfig
    decoder_layer = MistralDecoderLayer


# ----------------------------------------------------------------------------- Hugging Face

HF_MODEL_TYPES = ("mistral",)


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> MistralConfig:
    if hf.get("layer_types") and len(set(hf["layer_types"])) > 1:
        raise UserError("HF Mistral config has mixed layer_types; jaxtune's Mistral slides on every layer.")
    base = llama.config_from_hf(hf)
    kw = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    kw["sliding_window"] = hf.get("sliding_window")
    kw.update(overrides)
    return MistralConfig(**kw)


def config_to_hf(config: MistralConfig) -> dict[str, Any]:
    hf = llama.config_to_hf(config)
    hf.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=config.sliding_window)
    hf.pop("attention_bias"), hf.pop("mlp_bias")
    return hf


def hf_param_maps(config: MistralConfig) -> list[hf_mapping.ParamMap]:
    return llama.hf_param_maps(config)
