"""Qwen2 / Qwen2.5: Llama plus biases on the q/k/v projections (tied embeddings on small sizes).

Params layout: Llama's plus layers/attn/{q,k,v}_proj/bias ([L, heads|kv_heads, head_dim]).
Qwen2's optional sliding window (`use_sliding_window`, off in every released checkpoint) is
not supported and rejected when reading a HF config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


from jaxtune.models import hf_mapping, layers, llama


@dataclasses.dataclass(frozen=True)
class Qwen2Config(llama.LlamaConfig):
    """LlamaConfig with Qwen2 defaults; q/k/v always carry biases."""

    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6


# ----------------------------------------------------------------------------- variants

_QWEN25_7B = Qwen2Config(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_layers=28,
    num_heads=28,
    num_kv_heads=4,
    max_position_embeddings=32768,
)

VARIANTS: dict[str, Qwen2Config] = {
    "tiny": Qwen2Config(
        **layers.TINY_SHAPE,
        tie_word_embeddings=True,
    ),
    # Counts tested against transformers; published: Qwen2.5-0.5B 0.49B, Qwen2.5-7B 7.61B.
    "qwen2.5-0.5b": _QWEN25_7B.replace(  # 494,032,768
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        tie_word_embeddings=True,
    ),
    "qwen2.5-7b": _QWEN25_7B,  # 7,615,616,512
}


# ----------------------------------------------------------------------------- modules


class Qwen2DecoderLayer(llama.DecoderLayer):
    config: Qwen2Config

    def attention_options(self) -> dict[str, Any]:
        return {"qkv_bias": True}


class Qwen2(llama.Llama):
    """inputs[B,T] -> logits[B,T,vocab]; see llama.Llama for the call contract."""

    config: Qwen2Config
    decoder_layer = Qwen2DecoderLayer


# ----------------------------------------------------------------------------- Hugging Face

HF_MODEL_TYPES = ("qwen2",)


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> Qwen2Config:
    return llama.derived_config_from_hf(Qwen2Config, "Qwen2", hf, default_eps=1e-6, **overrides)


def config_to_hf(config: Qwen2Config) -> dict[str, Any]:
    hf = llama.config_to_hf(config)
    hf.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=False)
    hf.pop("attention_bias"), hf.pop("mlp_bias")
    return hf


def hf_param_maps(config: Qwen2Config) -> list[hf_mapping.ParamMap]:
    h, kv, d = config.num_heads, config.num_kv_heads, config.resolved_head_dim
    maps = llama.hf_param_maps(config)
    for proj, heads in (("q_proj", h), ("k_proj", kv), ("v_proj", kv)):
        maps.append(hf_mapping.layer_param(
            ("layers", "attn", proj, "bias"), f"model.layers.{{i}}.self_attn.{proj}.bias",
            range(config.num_layers), hf_mapping.split_heads_bias(heads, d),
        ))
    return maps
