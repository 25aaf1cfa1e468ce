"""Hugging Face checkpoints <-> jaxtune params.

Family-specific knowledge (config.json fields, tensor names, layouts) lives in each family
module (`config_from_hf`, `config_to_hf`, `hf_param_maps`); this module holds what is shared.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxtune.models import hf_mapping, llama
from jaxtune.models.llama import LlamaConfig


def llama_config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> LlamaConfig:
    return llama.config_from_hf(hf, **overrides)


def llama_params_from_hf(state_dict: Mapping[str, Any], config: LlamaConfig) -> dict:
    """jaxtune params (numpy, in config.param_dtype) from an in-memory HF Llama state dict."""
    return hf_mapping.params_from_state_dict(
        llama.hf_param_maps(config), state_dict, dtype=np.dtype(config.param_dtype),
        ignore=lambda name: name.endswith("rotary_emb.inv_freq") or (config.tie_word_embeddings and name == "lm_head.weight"),
    )
