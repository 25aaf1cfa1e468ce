"""Non-finite losses and gradients: never applied, always reported (config `train.nonfinite`).

`guard(step_fn)` wraps the jitted train step. When the step's loss, gradient norm or any
parameter's gradient is not finite, the update is not applied: parameters and optimizer state
stay as they were (the step counter still advances, so the schedule and data stay in line), and
the metrics carry `nonfinite` (1.0) plus a per-parameter flag vector naming the groups whose
gradients were non-finite. The loop reads `nonfinite` every step (one scalar) and then either
skips on (`skip`: counted and logged) or halts (`halt`: `save_diagnostics` writes the pre-step
state, the offending batch and a report to WORKDIR/diagnostics/step_N, and `NonFiniteError`
ends the command with exit status 3, naming the step and the cause).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune import workdir as workdir_lib
from jaxtune.errors import UserError

FLAG = "nonfinite"
GROUPS_KEY = "nonfinite_groups"  # per-leaf flags; popped from the metrics before logging
EXIT_STATUS = 3
POLICIES = ("halt", "skip")  # train.nonfinite


class NonFiniteError(UserError):
    """A halted run: the step, what was non-finite and where the diagnostics are."""

    exit_status = EXIT_STATUS


def grad_flags(grads: Any) -> dict[str, jax.Array]:
    """{GROUPS_KEY: bool[n_leaves]}: which gradient leaves hold a NaN or an infinity."""
    return {GROUPS_KEY: jnp.stack([~jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])}


def group_names(params: Any) -> list[str]:
    """Readable names of the parameter leaves, in `jax.tree.leaves` order (e.g. 'layers/attn/q/kernel')."""
    def name(path) -> str:
        return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)

    return [name(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def guard(step_fn: Callable) -> Callable:
    """step_fn(state, batch, ref) -> (state, metrics) that never applies a non-finite update."""

    @functools.wraps(step_fn)  # keeps the step's name (compile logs, profiles say "train_step")
    def guarded(state, batch, ref_params=None):
        new_state, metrics = step_fn(state, batch, ref_params)
        metrics = dict(metrics)
        groups = metrics.get(GROUPS_KEY, jnp.zeros((0,), bool))
        finite = jnp.isfinite(metrics["loss"]) & ~jnp.any(groups)
        if "grad_norm" in metrics:
            finite &= jnp.isfinite(metrics["grad_norm"])
        kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                            (new_state.params, new_state.opt_state), (state.params, state.opt_state))
        metrics[FLAG] = (~finite).astype(jnp.float32)
        return new_state.replace(params=kept[0], opt_state=kept[1]), metrics

    return guarded


def describe(step: int, metrics: dict, names: list[str], limit: int = 5) -> str:
    """'step 7: loss nan, grad_norm nan; non-finite gradients in embed/embedding, ... (3 of 9 groups)'."""
    groups = np.asarray(metrics.get(GROUPS_KEY, np.zeros((0,), bool)))
    bad = [n for n, flag in zip(names, groups) if flag]
    values = ", ".join(f"{k} {float(metrics[k]):g}" for k in ("loss", "grad_norm") if k in metrics)
    where = (f"non-finite gradients in {', '.join(bad[:limit])}{', ...' if len(bad) > limit else ''} "
             f"({len(bad)} of {len(names)} parameter groups)") if bad else "gradients finite"
    return f"step {step}: {values}; {where}"


def save_diagnostics(workdir: Path, step: int, state: Any, batch: dict, report: str) -> Path:
    """WORKDIR/diagnostics/step_N: the state before the failing update (orbax), the batch (npz), a report."""
    import orbax.checkpoint as ocp

    directory = Path(workdir).absolute() / workdir_lib.DIAGNOSTICS / f"step_{step}"
    directory.mkdir(parents=True, exist_ok=True)
    if getattr(state, "frozen", None) is not None:
        state = state.replace(frozen=None)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / "state", state, force=True)
        ckptr.wait_until_finished()
    if jax.process_index() == 0:
        np.savez(directory / "batch.npz", **{k: np.asarray(v) for k, v in batch.items()})
        (directory / "report.json").write_text(json.dumps({"step": step, "report": report}, indent=1) + "\n")
    return directory
