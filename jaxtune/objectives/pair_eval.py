"""Held-out preference evaluation: a pair objective's loss and rewards on pairs it never trains on.

The sets come from data.eval_path and the eval.tasks whose metric is 'preference'
(data/datasets.preference_eval_sets): padded [N, 2, T] pairs in source order. Each is scored by
the policy and by the reference model (the same reference as training: the start weights, a PEFT
run's base without its adapters, or none for reference-free losses), and the objective's own
per-pair loss gives TRL's eval metrics over all N pairs at once: `loss`, `rewards/accuracies`,
`rewards/margins`, `rewards/chosen`, `rewards/rejected`, `logps/*` (under `<task>/...` for an
eval task). The reference's numbers never change, so they are computed once per run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

Scores = tuple[np.ndarray, np.ndarray]  # (summed log p [N, 2], trained-token counts [N, 2])


def pair_metrics(pair_losses: Callable, logps: np.ndarray, lengths: np.ndarray, ref: np.ndarray,
                 arrays: Mapping[str, np.ndarray]) -> dict[str, float]:
    """The objective's mean loss and its metrics over all N pairs of one eval set."""
    batch = {k: jnp.asarray(v) for k, v in arrays.items() if np.ndim(v) == 1}  # per-pair keys (index, label)
    losses, metrics = pair_losses(jnp.asarray(logps), jnp.asarray(lengths), jnp.asarray(ref), batch)
    return {"loss": float(jnp.mean(losses)), **{k: float(v) for k, v in metrics.items()}}


def evaluate_pair_sets(eval_sets: Sequence[Any], policy_scores: Callable[[Mapping[str, np.ndarray]], Scores],
                       reference_logps: Callable[[Any], np.ndarray], pair_losses: Callable) -> dict[str, float]:
    """Metrics of every held-out pair set (`datasets.PairEvalSet`), named `<metric>` for data.eval_path
    and `<task>/<metric>` for an eval task."""
    scores: dict[str, float] = {}
    for s in eval_sets:
        logps, lengths = policy_scores(s.arrays)
        prefix = f"{s.name}/" if s.name else ""
        for key, value in pair_metrics(pair_losses, logps, lengths, reference_logps(s), s.arrays).items():
            scores[prefix + key] = value
    return scores
