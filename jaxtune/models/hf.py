"""Hugging Face <-> jaxtune conversion (Llama for now).

HF Linear weights are [out, in]; jaxtune kernels are [in, out] with the head axes split out
(q: [embed, heads, head_dim], o: [heads, head_dim, embed]). RoPE layouts already agree
(rotate_half), so q/k need no permutation. Per-layer tensors are stacked on a leading axis
to match nn.scan.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxtune.errors import UserError
from jaxtune.models.llama import LlamaConfig

# jaxtune path under "layers" -> (HF name under model.layers.{i}., how to reshape its [out, in])
_LLAMA_LAYER_MAP = {
    ("attn_norm", "scale"): ("input_layernorm.weight", "vector"),
    ("attn", "q_proj", "kernel"): ("self_attn.q_proj.weight", "split_out_heads"),
    ("attn", "k_proj", "kernel"): ("self_attn.k_proj.weight", "split_out_kv_heads"),
    ("attn", "v_proj", "kernel"): ("self_attn.v_proj.weight", "split_out_kv_heads"),
    ("attn", "o_proj", "kernel"): ("self_attn.o_proj.weight", "split_in_heads"),
    ("mlp_norm", "scale"): ("post_attention_layernorm.weight", "vector"),
    ("mlp", "gate_proj", "kernel"): ("mlp.gate_proj.weight", "transpose"),
    ("mlp", "up_proj", "kernel"): ("mlp.up_proj.weight", "transpose"),
    ("mlp", "down_proj", "kernel"): ("mlp.down_proj.weight", "transpose"),
}


def llama_config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> LlamaConfig:
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


def llama_params_from_hf(state_dict: Mapping[str, Any], config: LlamaConfig) -> dict:
    """jaxtune params pytree (unboxed numpy arrays in config.param_dtype) from a HF state dict.

    Unknown keys are an error (they would mean a silently ignored weight); the tied
    `lm_head.weight` and rotary buffers are skipped.
    """
    sd = {k: _to_numpy(v) for k, v in state_dict.items()}
    dtype = jnp.dtype(config.param_dtype)
    used: set[str] = set()

    def take(name: str) -> np.ndarray:
        if name not in sd:
            raise UserError(f"HF Llama state dict is missing {name!r}.")
        used.add(name)
        return sd[name]

    h, kv, d = config.num_heads, config.num_kv_heads, config.resolved_head_dim
    reshape = {
        "vector": lambda w: w,
        "transpose": lambda w: w.T,
        "split_out_heads": lambda w: w.T.reshape(w.shape[1], h, d),
        "split_out_kv_heads": lambda w: w.T.reshape(w.shape[1], kv, d),
        "split_in_heads": lambda w: w.T.reshape(h, d, w.shape[0]),
    }

    stacked: dict = {}
    for path, (hf_name, kind) in _LLAMA_LAYER_MAP.items():
        per_layer = [
            reshape[kind](take(f"model.layers.{i}.{hf_name}")) for i in range(config.num_layers)
        ]
        node = stacked
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = np.stack(per_layer).astype(dtype)

    params = {
        "embed": {"embedding": take("model.embed_tokens.weight").astype(dtype)},
        "layers": stacked,
        "final_norm": {"scale": take("model.norm.weight").astype(dtype)},
    }
    if not config.tie_word_embeddings:
        params["lm_head"] = {"kernel": take("lm_head.weight").T.astype(dtype)}
    else:
        used.add("lm_head.weight")

    leftover = sorted(k for k in sd if k not in used and not k.endswith("rotary_emb.inv_freq"))
    if leftover:
        raise UserError(
            f"HF Llama state dict has {len(leftover)} weights jaxtune does not use, "
            f"e.g. {leftover[:5]}; "
            "is the config (num_layers, tie_word_embeddings) right?"
        )
    return params


def _to_numpy(x: Any) -> np.ndarray:
    """numpy view of a numpy/jax/torch tensor without importing torch (bf16 goes via float32)."""
    if hasattr(x, "detach"):  # torch.Tensor
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        return x.numpy()
    return np.asarray(x)
