"""Heads trained in full under PEFT (peft's `modules_to_save`): a reward model's `score` head.

Under any method the sequence-classification head is fully trainable, as peft makes it for
SEQ_CLS: a zero-initialised `delta` in the adapters' collection, in the head's scope, is added to
its frozen kernel (an interceptor of `layers.ScoreHead.get_kernel`). So the model without adapters
is still exactly the base model, training moves the whole head, and merging is kernel + delta.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
from flax import linen as nn

from jaxtune.models import layers
from jaxtune.peft import base

HEAD_DELTA = "delta"


def train_heads(next_fun, args, kwargs, context):
    """The interceptor: a ScoreHead's kernel becomes kernel + delta (float32)."""
    module = context.module
    kernel = next_fun(*args, **kwargs)
    if not (context.method_name == "get_kernel" and isinstance(module, layers.ScoreHead)):
        return kernel
    if not base.has_adapters(module, HEAD_DELTA):
        return kernel
    delta = base.adapter(module, HEAD_DELTA, nn.initializers.zeros_init(), kernel.shape, ("embed", None))
    return kernel.astype(jnp.float32) + delta.astype(jnp.float32)


def head_deltas(adapters: Mapping, path=()):
    """(path, delta) for every fully trained head (a `HEAD_DELTA` leaf beside no lora_a)."""
    for key, value in adapters.items():
        if key == HEAD_DELTA and "lora_a" not in adapters:
            yield path, value
        elif isinstance(value, Mapping):
            yield from head_deltas(value, (*path, key))
