"""Optax chains and learning-rate schedules; what is decayed or frozen is decided by masks."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

SCHEDULES = ("cosine", "linear", "constant")  # optim.schedule

# Parameters whose path contains one of these names are never weight-decayed: decaying norm
# scales pulls them to 0 (not to their neutral 1), and decaying embeddings/biases hurts rare tokens.
NO_DECAY_NAMES = ("embedding", "scale", "bias")


def _path_names(path) -> list[str]:
    names = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                names.append(str(getattr(key, attr)))
                break
    return names


def decay_mask(params: Any) -> Any:
    """True for weights that get weight decay (matrices), False for norms, biases, embeddings."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(name in NO_DECAY_NAMES for name in _path_names(path)), params
    )


def schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup to `lr`, then cosine / linear decay to `lr * min_lr_ratio`, or constant."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    decay_steps = max(total_steps - warmup, 1)
    if cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(peak, floor, decay_steps)
    elif cfg.schedule == "constant":
        after = optax.constant_schedule(peak)
    else:
        raise ValueError(f"unknown schedule {cfg.schedule!r}")
    if warmup == 0:
        return after
    # Warmup starts at lr/warmup (not 0) so step 0 already moves the weights.
    ramp = optax.linear_schedule(peak / warmup, peak, warmup - 1) if warmup > 1 else optax.constant_schedule(peak)
    return optax.join_schedules([ramp, after], [warmup])


def build(cfg: ml_collections.ConfigDict, total_steps: int, trainable: Any = None) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with global-norm clipping and a decay mask; `trainable` (a bool pytree) freezes the rest.

    Frozen leaves get no optimizer state at all (optax.masked), which is what keeps adapter
    training cheap in memory.
    """
    lr = schedule(cfg, total_steps)
    parts = []
    if cfg.clip_norm and cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(
        optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)
    )
    tx = optax.chain(*parts)
    if trainable is not None:
        frozen = jax.tree.map(lambda t: not t, trainable)
        tx = optax.chain(optax.masked(tx, trainable), optax.masked(optax.set_to_zero(), frozen))
    return tx, lr
