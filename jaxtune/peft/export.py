"""Adapters out of jaxtune: PEFT's on-disk format, or a full HF checkpoint with them merged in.

PEFT format (what `peft.PeftModel.from_pretrained(base, dir)` reads): `adapter_config.json`
plus `adapter_model.safetensors` with keys
`base_model.model.<HF module>.lora_A.weight` [r, in], `.lora_B.weight` [out, r] and (DoRA)
`.lora_magnitude_vector` [out]. HF module names come from each family's `hf_param_maps`
(the kernel's HF tensor name minus ".weight"); in/out are flattened in the same order as the
base weight's layout change, and scaling stays in the config (lora_alpha, use_rslora).
Prefix tuning: PEFT's PREFIX_TUNING format, the effective prefixes as one `prompt_embeddings`
[P, L*2*kv_heads*head_dim] tensor (ordered layer, key/value, head, dim), which is also what PEFT
saves for a prefix_projection run (the MLP is a training-time reparameterisation).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from etils import epath

from jaxtune import models
from jaxtune.errors import UserError
from jaxtune.models import hf
from jaxtune.peft import base as peft_base
from jaxtune.peft import heads, lora, prefix, quant

PEFT_FORMAT_METHODS = ("lora", "dora", "prefix")  # methods with a PEFT on-disk format here
MERGEABLE_METHODS = ("lora", "dora")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def _hf_modules(model_config, path: tuple[str, ...]) -> tuple[str, ...]:
    """HF module names (one per layer) of the projection at jaxtune `path`."""
    for m in models.family_of(model_config).hf_param_maps(model_config):
        if m.path == (*path, "kernel"):
            return tuple(name.removesuffix(".weight") for name in m.hf_names)
    raise UserError(f"no Hugging Face tensor for adapted projection {'/'.join(path)}")


def head_state_dict(model_config, adapters: Mapping, base: Mapping | None) -> dict[str, np.ndarray]:
    """A reward model's fully trained score head (base kernel + delta) as PEFT saves a
    `modules_to_save` module: `base_model.model.score.weight`, the whole HF weight."""
    deltas = list(heads.head_deltas(adapters))
    if not deltas:
        return {}
    if base is None:
        raise UserError("export --peft: this run trains its score head in full (a reward model); the export needs "
                        "the base weights to write it")
    maps = {m.path: m for m in models.family_of(model_config).hf_param_maps(model_config)}
    out = {}
    for path, delta in deltas:
        m = maps[(*path, "kernel")]
        kernel = np.asarray(jax.device_get(lora._get(base, (*path, "kernel"))), np.float32)
        out[_PREFIX + m.hf_names[0]] = m.to_hf(kernel + np.asarray(jax.device_get(delta), np.float32))
    return out


def peft_state_dict(model_config, adapters: Mapping) -> dict[str, np.ndarray]:
    """PEFT tensor name -> float32 array, in PEFT's layouts (stacked layers split out)."""
    out = {}
    for path, site in lora._adapter_sites(adapters):
        a, b = np.asarray(jax.device_get(site["lora_a"]), np.float32), np.asarray(jax.device_get(site["lora_b"]), np.float32)
        names = _hf_modules(model_config, path)
        for i, name in enumerate(names):
            rank = a.shape[-1]
            out[f"{_PREFIX}{name}.lora_A.weight"] = a[i].reshape(-1, rank).T
            out[f"{_PREFIX}{name}.lora_B.weight"] = b[i].reshape(rank, -1).T
            if "magnitude" in site:
                out[f"{_PREFIX}{name}.lora_magnitude_vector"] = np.asarray(jax.device_get(site["magnitude"][i]), np.float32).reshape(-1)
    return dict(sorted(out.items()))


def adapter_config(spec: peft_base.Spec, base_model_name_or_path: str | None = None, *,
                   seq_cls: bool = False, seq2seq: bool = False) -> dict[str, Any]:
    """The adapter_config.json fields PEFT's LoraConfig reads (everything else takes its default).
    `seq_cls`: a reward model, whose `score` head is saved whole (modules_to_save); `seq2seq`: an
    encoder-decoder (T5), which PEFT wraps as PeftModelForSeq2SeqLM."""
    extra = {"modules_to_save": ["score"]} if seq_cls else {}
    return {
        **extra,
        "peft_type": "LORA",
        "task_type": "SEQ_CLS" if seq_cls else "SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "use_rslora": spec.rslora,
        "use_dora": spec.dora,
        "target_modules": sorted(spec.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def prompt_embeddings(model_config, adapters: Mapping) -> np.ndarray:
    """PEFT's `prompt_embeddings` [P, L*2*kv*hd] of prefix adapters (layers in HF order)."""
    by_layer = {}
    for path, kv in prefix.layer_prefixes(adapters):  # kv [L, P, 2, kv_heads, head_dim]
        kv = np.asarray(jax.device_get(kv), np.float32)
        for i, name in enumerate(_hf_modules(model_config, (*path, "k_proj"))):
            by_layer[int(name.split("layers.")[1].split(".")[0])] = kv[i]
    stacked = np.stack([by_layer[i] for i in sorted(by_layer)], axis=1)  # [P, L, 2, kv, hd]
    return stacked.reshape(stacked.shape[0], -1)


def prefix_adapter_config(model_config, spec: peft_base.Spec, base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """adapter_config.json of PEFT's PrefixTuningConfig (token_dim = kv_heads * head_dim, as PEFT
    sets it for grouped-query models)."""
    token_dim = model_config.num_kv_heads * model_config.resolved_head_dim
    return {
        "peft_type": "PREFIX_TUNING",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "num_virtual_tokens": spec.prefix_length,
        "num_layers": model_config.num_layers,
        "num_attention_heads": model_config.num_kv_heads,
        "token_dim": token_dim,
        "num_transformer_submodules": 1,
        "prefix_projection": spec.prefix_projection > 0,
        "encoder_hidden_size": spec.prefix_projection or token_dim,
        "inference_mode": True,
    }


def export_peft(model_config, spec: peft_base.Spec | None, adapters: Mapping, out_dir: str | epath.PathLike, *,
                base_model_name_or_path: str | None = None, base: Mapping | None = None) -> epath.Path:
    """Writes a PEFT adapter directory for the adapters `spec` describes (`base`: the frozen base
    weights, needed only by a reward model's score head)."""
    if spec is None:
        raise UserError("export --peft: this run has no adapters (peft.method is 'none'); use --merged or convert")
    check_exportable(spec)
    out = epath.Path(out_dir)
    is_prefix = spec.prefix_length > 0
    if is_prefix:
        tensors = {"prompt_embeddings": prompt_embeddings(model_config, adapters)}
    else:
        tensors = {**peft_state_dict(model_config, adapters), **head_state_dict(model_config, adapters, base)}
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        if is_prefix:
            config = prefix_adapter_config(model_config, spec, base_model_name_or_path)
        else:
            config = adapter_config(spec, base_model_name_or_path,
                                    seq_cls=bool(getattr(model_config, "num_labels", None)),
                                    seq2seq=models.family_of(model_config).is_encoder_decoder)
        (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        hf.write_safetensors(out / WEIGHTS_FILE, tensors)
    return out


def check_exportable(spec: peft_base.Spec) -> None:
    if spec.method not in PEFT_FORMAT_METHODS:
        raise UserError(f"export --peft: peft.method={spec.method!r} has no PEFT-format export; jaxtune writes "
                        f"{', '.join(PEFT_FORMAT_METHODS)} adapters")


def check_mergeable(spec: peft_base.Spec | None) -> None:
    if spec is not None and spec.method not in (*MERGEABLE_METHODS, "prefix"):
        raise UserError(f"export --merged: peft.method={spec.method!r} cannot be merged; jaxtune merges "
                        f"{', '.join(MERGEABLE_METHODS)} adapters")
    if spec is not None and spec.prefix_length > 0:
        raise UserError("export --merged: prefix tuning adds key/value slots to attention and cannot be merged "
                        "into the weights; use --peft OUT (PEFT's PREFIX_TUNING format)")


def export_merged(model_config, spec: peft_base.Spec, base: Mapping, adapters: Mapping, out_dir: str | epath.PathLike, *,
                  dtype: str | None = None, tokenizer_dir: str | None = None, max_shard_size: int | str = "2GB",
                  add_bos: str = "auto") -> epath.Path:
    """A full HF checkpoint of the adapted model: W + scaling * A B (DoRA: rescaled to the learned
    magnitude) in float32, cast to `dtype` (default: the model's param dtype) when written. A QLoRA
    base's kernels that no adapter targets are written dequantised too."""
    check_mergeable(spec)
    merged = jax.jit(lambda b, a: lora.merge(b, a, spec))(base, adapters)
    if spec.quantize != "none":
        shapes = models.abstract_params(model_config)
        merged = jax.jit(lambda m: quant.dequantize_params(m, shapes))(merged)
    return models.save_pretrained(model_config, merged, out_dir, dtype=dtype or model_config.param_dtype,
                                  tokenizer_dir=tokenizer_dir, max_shard_size=max_shard_size, add_bos=add_bos)
