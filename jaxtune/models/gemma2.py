"""Gemma 2: Gemma plus local/global layer alternation, soft-capping and sandwich norms.

- layers alternate sliding-window (local) and full (global) attention: layer i is local when
  (i + 1) % sliding_window_pattern != 0 (pattern 2: local, global, local, ...). One nn.scan
  covers all layers; a scanned [L] bool input selects each layer's mask, so params stay
  uniformly stacked [L, ...] and HF's per-layer names map 1:1.
- attention scores are scaled by query_pre_attn_scalar**-0.5 and soft-capped
  (cap * tanh(s / cap)); final logits are soft-capped too.
- each sublayer output is normalised again before the residual add (post_attn_norm,
  post_mlp_norm); mlp_norm is HF's pre_feedforward_layernorm.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from jaxtune.errors import UserError
from jaxtune.models import gemma, hf_mapping, layers

# jaxtune layer norm -> HF module name (Gemma 2 and 3).
NORM_NAMES = {
    "attn_norm": "input_layernorm",
    "post_attn_norm": "post_attention_layernorm",
    "mlp_norm": "pre_feedforward_layernorm",
    "post_mlp_norm": "post_feedforward_layernorm",
}


@dataclasses.dataclass(frozen=True)
class Gemma2Config(gemma.GemmaConfig):
    query_pre_attn_scalar: int = 256  # scores scale = query_pre_attn_scalar ** -0.5
    sliding_window: int = 4096
    sliding_window_pattern: int = 2  # every pattern-th layer is global, the others local
    attn_logit_softcapping: float | None = 50.0
    final_logit_softcapping: float | None = 30.0

    def __post_init__(self):
        super().__post_init__()
        if self.sliding_window < 1 or self.sliding_window_pattern < 1:
            raise UserError(
                f"{type(self).__name__}: sliding_window ({self.sliding_window}) and "
                f"sliding_window_pattern ({self.sliding_window_pattern}) must be >= 1."
            )

    def sliding_layers(self) -> tuple[bool, ...]:
        p = self.sliding_window_pattern
        return tuple((i + 1) % p != 0 for i in range(self.num_layers))


# ----------------------------------------------------------------------------- variants

_GEMMA2_9B = Gemma2Config(
    vocab_size=256000,
    hidden_size=3584,
    intermediate_size=14336,
    num_layers=42,
    num_heads=16,
    num_kv_heads=8,
    head_dim=256,
)

VARIANTS: dict[str, Gemma2Config] = {
    "tiny": Gemma2Config(
        **layers.TINY_SHAPE,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=16,
    ),
    # Counts tested against transformers; published: gemma-2-2b 2.61B, gemma-2-9b 9.24B.
    "gemma2-2b": _GEMMA2_9B.replace(  # 2,614,341,888
        hidden_size=2304,
        intermediate_size=9216,
        num_layers=26,
        num_heads=8,
        num_kv_heads=4,
    ),
    "gemma2-9b": _GEMMA2_9B,  # 9,241,705,984
}


# ----------------------------------------------------------------------------- modules


class Gemma2DecoderLayer(gemma.GemmaDecoderLayer):
    config: Gemma2Config
    post_norms = True

    def attention_options(self) -> dict[str, Any]:
        cfg = self.config
        return dict(
            sliding_window=cfg.sliding_window,
            logit_soft_cap=cfg.attn_logit_softcapping,
            query_scale=float(cfg.query_pre_attn_scalar) ** -0.5,
        )


class Gemma2(gemma.Gemma):
    """inputs[B,T] -> logits[B,T,vocab]; see gemma.Gemma for the call contract."""

    config: Gemma2Config
    decoder_layer = Gemma2DecoderLayer


# ----------------------------------------------------------------------------- Hugging Face

HF_MODEL_TYPES = ("gemma2",)


def pattern_from_hf(hf: Mapping[str, Any], default: int) -> int:
    """sliding_window_pattern from HF `layer_types` (or the legacy int), checked to fit."""
    types = hf.get("layer_types")
    if not types:
        return int(hf.get("sliding_window_pattern") or default)
    n = len(types)
    for p in range(1, n + 2):
        if all((t == "sliding_attention") == bool((i + 1) % p) for i, t in enumerate(types)):
            return p
    raise UserError(
        f"HF config layer_types {types} is not a repeating 'local..., global' pattern; "
        "jaxtune supports only that."
    )


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> Gemma2Config:
    kw = gemma.hf_fields(hf)
    kw.update(
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
        sliding_window=hf.get("sliding_window", 4096),
        sliding_window_pattern=pattern_from_hf(hf, 2),
        attn_logit_softcapping=hf.get("attn_logit_softcapping"),
        final_logit_softcapping=hf.get("final_logit_softcapping"),
    )
    kw.update(overrides)
    return Gemma2Config(**kw)


def config_to_hf(config: Gemma2Config) -> dict[str, Any]:
    hf = gemma.config_to_hf(config)
    hf.pop("hidden_act")
    hf.update(
        architectures=["Gemma2ForCausalLM"],
        model_type="gemma2",
        hidden_activation=config.hidden_activation,
        query_pre_attn_scalar=config.query_pre_attn_scalar,
        sliding_window=config.sliding_window,
        layer_types=["sliding_attention" if s else "full_attention" for s in config.sliding_layers()],
        attn_logit_softcapping=config.attn_logit_softcapping,
        final_logit_softcapping=config.final_logit_softcapping,
    )
    return hf


def hf_param_maps(config: Gemma2Config) -> list[hf_mapping.ParamMap]:
    return gemma.hf_param_maps(config, NORM_NAMES)
