"""Llama 2/3 decoder: config dataclass -> named variants -> Flax modules.

Params layout (HF conversion, adapters and the optimizer's decay mask key on these names):
  embed/embedding, layers/{attn_norm,mlp_norm}/scale, layers/attn/{q,k,v,o}_proj/kernel,
  layers/mlp/{gate,up,down}_proj/kernel, final_norm/scale, lm_head/kernel (untied only).
Everything under `layers` has a leading "layers" axis (nn.scan).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from jaxtune.errors import UserError
from jaxtune.models import attention, hf_mapping, layers

_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture plus numerics; field names follow HF where a HF field exists."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None  # None -> hidden_size // num_heads
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF format, e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat_policy: str = "none"  # a key of layers.REMAT_POLICIES
    attention: str = "auto"  # models/attention.py: "auto" | "splash" | "blockwise" | "cudnn" | "reference"
    layer_loop: str = "auto"  # layers.LAYER_LOOPS: "auto" (unrolled on CPU, else scan) | "scan" | "unrolled"
    # Sequence classification / reward model (HF *ForSequenceClassification): a `score` head with
    # num_labels outputs replaces the LM head; pad_token_id picks the pooled (last non-pad) token.
    num_labels: int | None = None
    pad_token_id: int | None = None
    # PPO's value model on the policy's backbone: a scalar `value_head` beside the LM head (never in
    # Hugging Face checkpoints: a policy loaded from one gets a seeded head, an export leaves it out).
    value_head: bool = False
    # With value_head: the value model on a backbone of its own (`value_model`: this model's shape
    # with a one-label `score` head, i.e. a reward model's), not on the policy's.
    value_backbone: bool = False

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise UserError(
                f"LlamaConfig: num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})."
            )
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise UserError(
                f"LlamaConfig: hidden_size ({self.hidden_size}) is not divisible by num_heads "
                f"({self.num_heads}); set head_dim explicitly."
            )
        if self.num_labels is not None and self.num_labels < 1:
            raise UserError(f"{type(self).__name__}: num_labels={self.num_labels}, expected >= 1 or None (a causal LM).")
        for field in ("dtype", "param_dtype"):
            if getattr(self, field) not in _DTYPES:
                raise UserError(
                    f"LlamaConfig: {field}={getattr(self, field)!r}, expected one of {_DTYPES}."
                )
        if self.remat_policy not in layers.REMAT_POLICIES:
            raise UserError(
                f"LlamaConfig: remat_policy={self.remat_policy!r}, expected one of "
                f"{tuple(layers.REMAT_POLICIES)}."
            )
        if self.layer_loop not in layers.LAYER_LOOPS:
            raise UserError(
                f"{type(self).__name__}: layer_loop={self.layer_loop!r}, expected one of {layers.LAYER_LOOPS}."
            )
        if self.attention not in attention.IMPLEMENTATIONS:
            raise UserError(
                f"{type(self).__name__}: attention={self.attention!r}, expected one of {attention.IMPLEMENTATIONS}."
            )
        # Fail at config time, not at first trace, on an unsupported rope_scaling.
        try:
            layers.rope_inv_freq(self.resolved_head_dim, self.rope_theta, self.rope_scaling)
        except (KeyError, ValueError) as e:
            raise UserError(f"LlamaConfig: bad rope_scaling {self.rope_scaling!r}: {e}") from None

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    def replace(self, **kw: Any) -> LlamaConfig:
        return dataclasses.replace(self, **kw)


# ----------------------------------------------------------------------------- variants

_LLAMA31_8B = LlamaConfig(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
)

VARIANTS: dict[str, LlamaConfig] = {
    # Test-sized; trains from scratch on CPU in seconds.
    "tiny": LlamaConfig(
        **layers.TINY_SHAPE,
    ),
    # Parameter counts below match the published checkpoints exactly (tested).
    "llama3.2-1b": _LLAMA31_8B.replace(  # 1,235,814,400
        hidden_size=2048,
        intermediate_size=8192,
        num_layers=16,
        tie_word_embeddings=True,
        rope_scaling={**_LLAMA31_8B.rope_scaling, "factor": 32.0},
    ),
    "llama3.1-8b": _LLAMA31_8B,  # 8,030,261,248
    "llama3.1-70b": _LLAMA31_8B.replace(  # 70,553,706,496
        hidden_size=8192,
        intermediate_size=28672,
        num_layers=80,
        num_heads=64,
    ),
}


# ----------------------------------------------------------------------------- modules


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)). Scan-compatible signature."""

    config: LlamaConfig

    def attention_options(self) -> dict[str, Any]:
        """Extra `layers.Attention` fields; families built on Llama (Mistral, Qwen) override it."""
        return {}

    @nn.compact
    def __call__(self, x, positions, segment_ids):
        cfg = self.config
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        residual = ("act_batch", "act_length", "act_embed")

        h = layers.RMSNorm(cfg.rms_norm_eps, name="attn_norm", **kw)(x)
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
        )(h, positions, segment_ids)
        x = nn.with_logical_constraint(x + h, residual)

        h = layers.RMSNorm(cfg.rms_norm_eps, name="mlp_norm", **kw)(x)
        h = layers.MLP(cfg.intermediate_size, name="mlp", **kw)(h)
        x = nn.with_logical_constraint(x + h, residual)
        return x, None


class Llama(layers.CausalLM):
    """inputs[B,T] int -> logits[B,T,vocab] in the compute dtype (see layers.CausalLM).

    positions default to arange(T) and segment_ids to ones (one unpacked sequence per row);
    attention is causal within equal segment ids only (0 = padding).
    """

    config: LlamaConfig
    decoder_layer = DecoderLayer  # the scanned block; families built on Llama swap in theirs

# ----------------------------------------------------------------------------- Hugging Face

HF_MODEL_TYPES = ("llama",)


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> LlamaConfig:
    """LlamaConfig from a HF config.json dict (old `rope_scaling` or new `rope_parameters` form)."""
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise UserError(f"HF Llama config sets {flag}=True; jaxtune's Llama has no biases.")
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(
            f"HF Llama config has hidden_act={hf['hidden_act']!r}; only 'silu' is supported."
        )

    # transformers>=5 folds rope_theta into `rope_parameters`; older configs keep them apart.
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope.pop("type")
    if rope.get("rope_type", "default") == "default":
        rope = {}

    kw = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rope_theta=float(rope_theta),
        rope_scaling=rope or None,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def derived_config_from_hf(config_cls: type, family: str, hf: Mapping[str, Any], *, default_eps: float, **overrides: Any):
    """A Llama-shaped family's config (Qwen2/3...): Llama's reading of config.json, as `config_cls`."""
    if hf.get("use_sliding_window"):
        raise UserError(f"HF {family} config sets use_sliding_window=True; jaxtune's {family} does not support it.")
    base = config_from_hf({**hf, "rms_norm_eps": hf.get("rms_norm_eps", default_eps)})
    kw = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    kw.update(overrides)
    return config_cls(**kw)


def config_to_hf(config: LlamaConfig) -> dict[str, Any]:
    """config.json content that `transformers.LlamaForCausalLM` reads back to the same model."""
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.resolved_head_dim,
        "max_position_embeddings": config.max_position_embeddings,
        "rope_theta": config.rope_theta,
        "rope_scaling": dict(config.rope_scaling) if config.rope_scaling else None,
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": config.param_dtype,
    }
    return hf


def hf_param_maps(config: LlamaConfig) -> list[hf_mapping.ParamMap]:
    """Every jaxtune param with its HF tensor name(s) and layout change (see hf_mapping)."""
    h, kv, d = config.num_heads, config.num_kv_heads, config.resolved_head_dim
    layers = range(config.num_layers)
    prefix = "model.layers.{i}."

    def layer(path, name, transforms):
        return hf_mapping.layer_param(("layers", *path), prefix + name, layers, transforms)

    maps = [
        hf_mapping.param(("embed", "embedding"), "model.embed_tokens.weight", hf_mapping.identity()),
        layer(("attn_norm", "scale"), "input_layernorm.weight", hf_mapping.identity()),
        layer(("attn", "q_proj", "kernel"), "self_attn.q_proj.weight", hf_mapping.split_out_heads(h, d)),
        layer(("attn", "k_proj", "kernel"), "self_attn.k_proj.weight", hf_mapping.split_out_heads(kv, d)),
        layer(("attn", "v_proj", "kernel"), "self_attn.v_proj.weight", hf_mapping.split_out_heads(kv, d)),
        layer(("attn", "o_proj", "kernel"), "self_attn.o_proj.weight", hf_mapping.split_in_heads(h, d)),
        layer(("mlp_norm", "scale"), "post_attention_layernorm.weight", hf_mapping.identity()),
        layer(("mlp", "gate_proj", "kernel"), "mlp.gate_proj.weight", hf_mapping.transpose()),
        layer(("mlp", "up_proj", "kernel"), "mlp.up_proj.weight", hf_mapping.transpose()),
        layer(("mlp", "down_proj", "kernel"), "mlp.down_proj.weight", hf_mapping.transpose()),
        hf_mapping.param(("final_norm", "scale"), "model.norm.weight", hf_mapping.identity()),
    ]
    if not config.tie_word_embeddings:
        maps.append(hf_mapping.param(("lm_head", "kernel"), "lm_head.weight", hf_mapping.transpose()))
    return maps
