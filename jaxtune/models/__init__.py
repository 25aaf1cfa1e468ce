"""The model families: the registry (registry.py: family name -> config class, named variants,
module class) and Hugging Face checkpoint interop (hf.py), re-exported here.

Adding a family (qwen2, gemma, ...) is one `FAMILIES` entry; the trainer only calls
`get_config`, `build` and `count_params`.
"""

from __future__ import annotations

from jaxtune.models.hf import config_from_pretrained, from_pretrained, load_params, save_pretrained  # noqa: F401
from jaxtune.models.registry import (  # noqa: F401
    FAMILIES, Family, abstract_params, build, count_params, family_for_hf, family_of, get_config,
)
