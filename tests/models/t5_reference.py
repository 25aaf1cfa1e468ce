"""Tiny random transformers T5 / T5 v1.1 / mT5 models and their jaxtune conversions (parity tests)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from jaxtune import models
from jaxtune.models import hf_mapping

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

_SHAPE = dict(vocab_size=97, d_model=40, d_kv=12, d_ff=56, num_layers=3, num_decoder_layers=2, num_heads=5,
              relative_attention_num_buckets=8, relative_attention_max_distance=12, dropout_rate=0.0)
# variant -> (HF config class, HF kwargs, untied head). Few buckets and a short max distance so
# the log-spaced and clipped buckets occur within the test's sequence lengths.
VARIANTS = {
    "t5": ("T5Config", dict(_SHAPE, feed_forward_proj="relu"), False),
    "t5-v1.1": ("T5Config", dict(_SHAPE, feed_forward_proj="gated-gelu", tie_word_embeddings=False), True),
    "mt5": ("MT5Config", dict(_SHAPE, feed_forward_proj="gated-gelu"), True),
}


def hf_model(variant: str, seed: int = 0, **shape):
    """A random eval-mode HF model with O(1) activations; v1.1/mT5 get their own lm_head
    (transformers >= 5 ties a head built from a config; a checkpoint's distinct lm_head unties it).
    `shape`: config fields in place of the test shape's (e.g. a tokenizer's vocab_size)."""
    cls, kw, untied = VARIANTS[variant]
    torch.manual_seed(seed)
    config = getattr(transformers, cls)(attn_implementation="eager", **{**kw, **shape})
    arch = "MT5ForConditionalGeneration" if cls == "MT5Config" else "T5ForConditionalGeneration"
    model = getattr(transformers, arch)(config).eval()
    with torch.no_grad():
        if untied:
            model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.shared.weight))
        for name, p in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("relative_attention_bias.weight"):
                p.normal_(0.0, 1.0)
            elif name.endswith(".q.weight"):  # T5's own init: the 1/sqrt(d_kv) attention scale lives here
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1] * config.d_kv))
            elif p.ndim == 2:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))
    return model


def converted(variant: str, seed: int = 0):
    """(HF model, jaxtune config, params as numpy) for one variant."""
    model = hf_model(variant, seed)
    fam = models.FAMILIES["t5"]
    config = fam.config_from_hf(model.config.to_dict(), tie_word_embeddings=not VARIANTS[variant][2])
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    params = hf_mapping.params_from_state_dict(
        fam.hf_param_maps(config), sd,
        ignore=lambda name: name in fam.hf_unused_tensors(config) or (config.tie_word_embeddings and name == "lm_head.weight"))
    return model, config, params


def hf_logits(model, enc: np.ndarray, enc_mask: np.ndarray, dec: np.ndarray, dec_mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc_mask),
                    decoder_input_ids=torch.tensor(dec), decoder_attention_mask=torch.tensor(dec_mask))
    return out.logits.numpy()
