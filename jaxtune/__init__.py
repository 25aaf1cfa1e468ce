"""jaxtune: JAX-native post-training (SFT, LoRA, preference objectives) for large language models.

The Python API (`jaxtune.load_config`, `train`, `read_metrics`, `load`, `starting_model`, `export`,
`reward_fn`) lives in
`jaxtune.api`; it is imported on first use so `import jaxtune` (and the CLI's error paths) stay light.
"""

__version__ = "0.1.0"

_API = ("load_config", "train", "read_metrics", "load", "starting_model", "export", "reward_fn", "Model")
__all__ = list(_API)


def __getattr__(name):
    if name in _API:
        from jaxtune import api

        return getattr(api, name)
    raise AttributeError(f"module 'jaxtune' has no attribute {name!r}")
