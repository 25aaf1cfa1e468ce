"""Reference models for parity tests: tiny random transformers models built from config objects."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def hf_config(model_type: str, **kw):
    return transformers.AutoConfig.for_model(model_type, attn_implementation="eager", **kw)


def random_hf_model(model_type: str, *, tie: bool, unit_offset: bool, **kw):
    """Odd-sized HF model with weights scaled up so logits are O(1).

    unit_offset: the family's norms scale by (1 + w) (Gemma), so norm weights centre on 0.
    """
    torch.manual_seed(0)
    cfg = hf_config(model_type, tie_word_embeddings=tie, **kw)
    model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_((0.0 if unit_offset else 1.0) + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5)
            elif p.ndim == 2:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))
    return model


def state_dict(model, config) -> dict:
    """The HF model's tensors as numpy (without lm_head when the jaxtune config ties embeddings)."""
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd
