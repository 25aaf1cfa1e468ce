"""One orbax CheckpointManager per workdir: train state + Grain iterator state + config.

Saves are asynchronous; orbax writes each step into a temporary directory and renames it only
when complete, so a run killed mid-save leaves the previous checkpoint intact and the next run
resumes from it. Restores go straight into the target shardings.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from jaxtune import paths
from jaxtune.errors import UserError

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, workdir: str | Path, *, every: int, keep: int, use_async: bool = True):
        self.directory = paths.absolute(workdir) / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=every,
            enable_async_checkpointing=use_async,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any, config: dict, *, force: bool = False) -> bool:
        """Saves when `step` is on the interval (or `force`); returns whether a save started."""
        if step in self._manager.all_steps():  # e.g. the final step fell on the interval
            return False
        if getattr(state, "frozen", None) is not None:  # a LoRA base is never saved (config points to it)
            state = state.replace(frozen=None)
        args = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config)}
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self._manager.save(step, args=ocp.args.Composite(**args), force=force)

    def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> Any:
        """Restores the state into `abstract_state`'s shardings and the iterator in place."""
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        return self._manager.restore(step, args=ocp.args.Composite(**args)).state

    def saved_config(self, step: int) -> dict | None:
        return saved_config(self._manager, step)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def saved_config(manager: ocp.CheckpointManager, step: int) -> dict | None:
    """The config saved beside a step's state (with a LoRA run's `peft_base`), None when absent."""
    try:
        return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
    except Exception:  # older or foreign checkpoints without a config item
        return None


def latest_checkpoint(workdir: str | Path, command: str) -> tuple[Path, int]:
    """A run's checkpoints directory and latest step, or a UserError naming the command."""
    directory = paths.absolute(workdir) / "checkpoints"
    if not directory.is_dir():
        raise UserError(f"{command}: {workdir} has no checkpoints/ directory (train a model there first)")
    with ocp.CheckpointManager(directory) as manager:
        step = manager.latest_step()
    if step is None:
        raise UserError(f"{command}: no checkpoint in {directory}")
    return directory, int(step)


def local_target(state_dir: str | Path) -> Any | None:
    """Several processes: the saved tree's shapes on this process's first device, so each process
    restores the whole tree for itself (generate, eval: every process runs the same computation
    locally, like the base a PEFT run re-creates on the host). None in one process (orbax then
    restores as saved)."""
    if jax.process_count() == 1:
        return None
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)  # "no step metadata file" in an item directory: expected
    try:
        tree = ocp.StandardCheckpointer().metadata(Path(state_dir).absolute()).item_metadata.tree
    finally:
        absl_log.setLevel(level)
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)


def restore_params(workdir: str | Path, abstract_params: Any) -> Any:
    """The params of the latest checkpoint in another run's workdir (model.init_from), into their shardings.

    Only the params are read (a partial restore): that run's optimizer state may have any shape.
    """
    directory = paths.absolute(workdir) / "checkpoints"
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False, read_only=True)) \
        if directory.is_dir() else None
    step = manager.latest_step() if manager is not None else None
    if step is None:
        raise UserError(f"config key 'model.init_from': no checkpoint in {directory} (expected the workdir of a jaxtune run)")
    target = {"params": abstract_params}
    restore = ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
    )
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=restore)).state
    except (ValueError, KeyError) as e:
        raise UserError(
            f"config key 'model.init_from': the checkpoint at {directory / str(step)} does not match this model "
            f"({type(e).__name__}: {str(e)[:300]})"
        ) from None
    finally:
        manager.close()
    return restored["params"]


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs that carry the target sharding, the form orbax restores into."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between the checkpoint's config and this run's."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            diffs.extend(config_differences(a, b, name + "."))
        elif a != b:
            diffs.append(f"{name}: {a!r} -> {b!r}")
    return diffs
