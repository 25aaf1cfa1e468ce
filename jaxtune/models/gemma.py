"""Gemma (v1) decoder: config dataclass -> named variants -> Flax modules.

Gemma = Llama with GeGLU (gelu tanh-approximation) MLPs, RMSNorms that scale by (1 + w)
(w initialised to zeros), token embeddings multiplied by sqrt(hidden_size) in the compute
dtype, and tied input/output embeddings. Gemma 2 and 3 (gemma2.py, gemma3.py) build on these
modules: the decoder always scans a per-layer `is_sliding` flag (all False here).

Params layout: embed/embedding, layers/{attn_norm,mlp_norm}/scale,
layers/attn/{q,k,v,o}_proj/kernel, layers/mlp/{gate,up,down}_proj/kernel, final_norm/scale,
lm_head/kernel (untied only); Gemma 2+ add layers/{post_attn_norm,post_mlp_norm}/scale.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxtune.errors import UserError
from jaxtune.models import hf_mapping, layers, llama


@dataclasses.dataclass(frozen=True)
class GemmaConfig(llama.LlamaConfig):
    """LlamaConfig fields (same meaning) with Gemma defaults, plus the MLP activation."""

    head_dim: int | None = 256
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    hidden_activation: str = "gelu_pytorch_tanh"  # HF name, a key of layers.ACTIVATIONS

    def __post_init__(self):
        super().__post_init__()
        if self.hidden_activation not in layers.ACTIVATIONS:
            raise UserError(
                f"{type(self).__name__}: hidden_activation={self.hidden_activation!r}, expected one "
                f"of {tuple(layers.ACTIVATIONS)}."
            )

    def sliding_layers(self) -> tuple[bool, ...]:
        """Per layer: True where attention is local (sliding window). Gemma v1: none."""
        return (False,) * self.num_layers


# ----------------------------------------------------------------------------- variants

VARIANTS: dict[str, GemmaConfig] = {
    "tiny": GemmaConfig(
        **layers.TINY_SHAPE,
        head_dim=16,
    ),
    # google/gemma-2b: 2,506,172,416 params (published "2B"; tested vs transformers).
    "gemma-2b": GemmaConfig(
        vocab_size=256000,
        hidden_size=2048,
        intermediate_size=16384,
        num_layers=18,
        num_heads=8,
        num_kv_heads=1,
        head_dim=256,
    ),
}


# ----------------------------------------------------------------------------- modules


class GemmaDecoderLayer(nn.Module):
    """x + [post_norm](attn(norm(x))), then x + [post_norm](mlp(norm(x))). Scan-compatible."""

    config: GemmaConfig
    post_norms = False  # Gemma 2+: also normalise each sublayer's output before the residual add

    def attention_options(self) -> dict[str, Any]:
        """Extra `layers.Attention` fields; Gemma 2/3 override."""
        return {}

    @nn.compact
    def __call__(self, x, positions, segment_ids, is_sliding):
        cfg = self.config
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        residual = ("act_batch", "act_length", "act_embed")

        def norm(name):
            return layers.RMSNorm(cfg.rms_norm_eps, unit_offset=True, name=name, **kw)

        h = layers.Attention(
            num_heads=cfg.num_heads,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.resolved_head_dim,
            rope_theta=cfg.rope_theta,
            rope_scaling=cfg.rope_scaling,
            name="attn",
            implementation=cfg.attention,
            **self.attention_options(),
            **kw,
        )(norm("attn_norm")(x), positions, segment_ids, is_sliding)
        if self.post_norms:
            h = norm("post_attn_norm")(h)
        x = nn.with_logical_constraint(x + h, residual)

        h = layers.MLP(cfg.intermediate_size, activation=cfg.hidden_activation, name="mlp", **kw)(
            norm("mlp_norm")(x)
        )
        if self.post_norms:
            h = norm("post_mlp_norm")(h)
        x = nn.with_logical_constraint(x + h, residual)
        return x, None


class Gemma(layers.CausalLM):
    """inputs[B,T] int -> logits[B,T,vocab] in the compute dtype (same contract as llama.Llama)."""

    config: GemmaConfig
    decoder_layer = GemmaDecoderLayer  # Gemma 2/3 swap in theirs
    final_norm_unit_offset = True

    def embed_tokens(self, inputs):
        # HF multiplies by sqrt(hidden) rounded to the compute dtype (bf16: sqrt(2048) -> 45.25).
        scale = jnp.asarray(math.sqrt(self.config.hidden_size), jnp.dtype(self.config.dtype))
        return super().embed_tokens(inputs) * scale

    def layer_inputs(self):
        return (jnp.asarray(np.array(self.config.sliding_layers(), dtype=bool)),)  # local attention per layer


# ----------------------------------------------------------------------------- Hugging Face

HF_MODEL_TYPES = ("gemma",)


def hf_fields(hf: Mapping[str, Any], rope: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """GemmaConfig fields from a HF Gemma/Gemma2/Gemma3 config dict (shared by the three).

    `rope`: the global-attention rope parameters when they are not at the top level (Gemma 3).
    """
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    act = "gelu_pytorch_tanh" if act == "gelu" else act  # what transformers does for Gemma
    # Llama's reader handles the shared fields; it insists on silu, so the activation is read here.
    base = {**hf, "hidden_act": "silu", "rms_norm_eps": hf.get("rms_norm_eps", 1e-6)}
    if rope is not None:
        base["rope_parameters"], base["rope_scaling"] = dict(rope), None
    cfg = llama.config_from_hf(base)
    kw = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    kw.update(hidden_activation=act, tie_word_embeddings=hf.get("tie_word_embeddings", True))
    return kw


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> GemmaConfig:
    return GemmaConfig(**{**hf_fields(hf), **overrides})


def config_to_hf(config: GemmaConfig) -> dict[str, Any]:
    hf = llama.config_to_hf(config)
    hf.update(
        architectures=["GemmaForCausalLM"], model_type="gemma", hidden_act=config.hidden_activation,
    )
    hf.pop("mlp_bias")
    return hf


def hf_param_maps(config: GemmaConfig, norm_names: Mapping[str, str] | None = None) -> list[hf_mapping.ParamMap]:
    """Llama's tensor names; `norm_names` (jaxtune norm -> HF name) replaces the layer norms."""
    maps = llama.hf_param_maps(config)
    if norm_names is None:
        return maps
    maps = [m for m in maps if not (m.stacked and m.path[-1] == "scale")]
    for ours, theirs in norm_names.items():
        maps.append(hf_mapping.layer_param(
            ("layers", ours, "scale"), f"model.layers.{{i}}.{theirs}.weight",
            range(config.num_layers), hf_mapping.identity(),
        ))
    return maps
