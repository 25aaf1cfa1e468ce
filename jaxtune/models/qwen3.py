"""Qwen3 (dense): Llama plus a per-head RMSNorm on q and k (before RoPE), explicit head_dim.

Params layout: Llama's plus layers/attn/{q,k}_norm/scale ([L, head_dim]).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


from jaxtune.models import hf_mapping, layers, llama


@dataclasses.dataclass(frozen=True)
class Qwen3Config(llama.LlamaConfig):
    """LlamaConfig with Qwen3 defaults; q/k are RMS-normalised per head (eps = rms_norm_eps)."""

    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6


# ----------------------------------------------------------------------------- variants

_QWEN3_8B = Qwen3Config(
    vocab_size=151936,
    hidden_size=4096,
    intermediate_size=12288,
    num_layers=36,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
)

VARIANTS: dict[str, Qwen3Config] = {
    "tiny": Qwen3Config(
        **layers.TINY_SHAPE,
        head_dim=24,
        tie_word_embeddings=True,
    ),
    # Counts tested against transformers; published: Qwen3-0.6B 0.6B (0.44B non-embedding),
    # Qwen3-8B 8.2B.
    "qwen3-0.6b": _QWEN3_8B.replace(  # 596,049,920
        hidden_size=1024,
        intermediate_size=3072,
        num_layers=28,
        num_heads=16,
        tie_word_embeddings=True,
    ),
    "qwen3-8b": _QWEN3_8B,  # 8,190,735,360
}


# ----------------------------------------------------------------------------- modules


class Qwen3DecoderLayer(llama.DecoderLayer):
    config: Qwen3Config

    def attention_options(self) -> dict[str, Any]:
        return {"qk_norm": True, "qk_norm_eps": self.config.rms_norm_eps}


class Qwen3(llama.Llama):
    """inputs[B,T] -> logits[B,T,vocab]; see llama.Llama for the call contract."""

    config: Qwen3Config
    decoder_layer = Qwen3DecoderLayer


# ----------------------------------------------------------------------------- Hugging Face

HF_MODEL_TYPES = ("qwen3",)


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> Qwen3Config:
    return llama.derived_config_from_hf(Qwen3Config, "Qwen3", hf, default_eps=1e-6, **overrides)


def config_to_hf(config: Qwen3Config) -> dict[str, Any]:
    hf = llama.config_to_hf(config)
    hf.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3", use_sliding_window=False)
    return hf


def hf_param_maps(config: Qwen3Config) -> list[hf_mapping.ParamMap]:
    maps = llama.hf_param_maps(config)
    return maps + hf_mapping.qk_norm_maps(config.num_layers)
