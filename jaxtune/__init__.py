"""jaxtune: JAX-native post-training (SFT, LoRA, preference objectives) for large language models."""

__version__ = "0.1.0"
