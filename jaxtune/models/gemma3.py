"""Gemma 3 text decoder ("gemma3_text"): Gemma 2 plus per-head q/k norms and two RoPE bases.

- local (sliding) layers use RoPE base `rope_local_base_freq` without scaling; global layers
  use `rope_theta` with `rope_scaling` (e.g. linear x8 on 4B+). The scanned per-layer flag
  picks both the mask and the inverse frequencies.
- pattern 6: five local layers, then one global.
- q and k are RMS-normalised per head with (1 + w) scales (layers/attn/{q,k}_norm/scale).
- no attention soft-capping (transformers ignores it for Gemma 3); final capping optional.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from jaxtune.errors import UserError
from jaxtune.models import gemma, gemma2, hf_mapping, layers


@dataclasses.dataclass(frozen=True)
class Gemma3Config(gemma2.Gemma2Config):
    max_position_embeddings: int = 131072
    rope_theta: float = 1000000.0  # global layers
    rope_local_base_freq: float = 10000.0  # local layers
    sliding_window: int = 1024
    sliding_window_pattern: int = 6
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.attn_logit_softcapping is not None:
            raise UserError("Gemma3Config: attn_logit_softcapping is not used by Gemma 3; set it to None.")


# ----------------------------------------------------------------------------- variants

VARIANTS: dict[str, Gemma3Config] = {
    "tiny": Gemma3Config(
        **layers.TINY_SHAPE,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=16,
        sliding_window_pattern=2,
    ),
    # Counts tested against transformers (text-only, Gemma3ForCausalLM). Published:
    # gemma-3-1b 1.0B (999,885,952); gemma-3-4b "4B" includes a ~0.42B vision tower.
    "gemma3-1b": Gemma3Config(  # 999,885,952
        vocab_size=262144,
        hidden_size=1152,
        intermediate_size=6912,
        num_layers=26,
        num_heads=4,
        num_kv_heads=1,
        max_position_embeddings=32768,
        sliding_window=512,
    ),
    "gemma3-4b": Gemma3Config(  # 3,880,263,168 (language model only)
        vocab_size=262208,
        hidden_size=2560,
        intermediate_size=10240,
        num_layers=34,
        num_heads=8,
        num_kv_heads=4,
        rope_scaling={"rope_type": "linear", "factor": 8.0},
    ),
}


# ----------------------------------------------------------------------------- modules


class Gemma3DecoderLayer(gemma2.Gemma2DecoderLayer):
    config: Gemma3Config

    def attention_options(self) -> dict[str, Any]:
        cfg = self.config
        return dict(
            super().attention_options(),
            qk_norm=True,
            qk_norm_eps=cfg.rms_norm_eps,
            qk_norm_unit_offset=True,
            local_rope_theta=cfg.rope_local_base_freq,
        )


class Gemma3(gemma2.Gemma2):
    """inputs[B,T] -> logits[B,T,vocab]; see gemma.Gemma for the call contract."""

    config: Gemma3Config
    decoder_layer = Gemma3DecoderLayer


# ----------------------------------------------------------------------------- Hugging Face

HF_MODEL_TYPES = ("gemma3_text",)


def _rope_params(hf: Mapping[str, Any]) -> tuple[dict, float]:
    """(global rope parameters, local base) from transformers>=5 nested `rope_parameters` or the
    older top-level rope_theta / rope_scaling / rope_local_base_freq."""
    rp = hf.get("rope_parameters") or {}
    if "full_attention" in rp or "sliding_attention" in rp:
        local = dict(rp.get("sliding_attention") or {})
        if local.get("rope_type", "default") != "default":
            raise UserError(f"HF Gemma 3 config: scaled local RoPE {local} is not supported.")
        full = dict(rp.get("full_attention") or {})
        full.setdefault("rope_theta", 1000000.0)
        return full, float(local.get("rope_theta", 10000.0))
    full = dict(hf.get("rope_scaling") or rp or {})
    full.setdefault("rope_theta", hf.get("rope_theta", 1000000.0))
    return full, float(hf.get("rope_local_base_freq", 10000.0))


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> Gemma3Config:
    if hf.get("use_bidirectional_attention"):
        raise UserError("HF Gemma 3 config uses bidirectional attention; jaxtune's Gemma 3 is causal.")
    full, local_theta = _rope_params(hf)
    kw = gemma.hf_fields(hf, rope=full)
    kw.update(
        rope_local_base_freq=local_theta,
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
        sliding_window=hf.get("sliding_window", 4096),
        sliding_window_pattern=gemma2.pattern_from_hf(hf, 6),
        final_logit_softcapping=hf.get("final_logit_softcapping"),
    )
    kw.update(overrides)
    return Gemma3Config(**kw)


def config_to_hf(config: Gemma3Config) -> dict[str, Any]:
    hf = gemma2.config_to_hf(config)
    full = {"rope_type": "default", **(config.rope_scaling or {}), "rope_theta": config.rope_theta}
    hf.pop("rope_theta"), hf.pop("rope_scaling"), hf.pop("attn_logit_softcapping")
    hf.update(
        architectures=["Gemma3ForCausalLM"],
        model_type="gemma3_text",
        rope_parameters={
            "full_attention": full,
            "sliding_attention": {"rope_type": "default", "rope_theta": config.rope_local_base_freq},
        },
    )
    return hf


def hf_param_maps(config: Gemma3Config) -> list[hf_mapping.ParamMap]:
    maps = gemma2.hf_param_maps(config)
    return maps + hf_mapping.qk_norm_maps(config.num_layers)
