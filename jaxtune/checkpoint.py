"""One orbax CheckpointManager per workdir: train state + Grain iterator state + config (+ the
objective's host-side state, e.g. PPO's adaptive KL coefficient, when it has one).

Saves are asynchronous; orbax writes each step into a temporary directory and renames it only
when complete, so a run killed mid-save leaves the previous checkpoint intact and the next run
resumes from it (the leftover temporary directory is removed when the manager opens). Restores go
straight into the target shardings.

Faults: a latest checkpoint that does not restore (damaged or truncated files) is reported, moved
to `WORKDIR/corrupt_checkpoints/`, and the one before it is used; a checkpoint saved for other
model shapes is a UserError naming the first mismatching parameter; a save that fails (disk full,
permission denied) is a UserError naming the last complete checkpoint, which stays loadable.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from jaxtune import paths
from jaxtune import workdir as workdir_lib
from jaxtune.errors import UserError

log = logging.getLogger(__name__)
OBJECTIVE_ITEM = "objective"  # the checkpoint item of Objective.checkpoint_state


class Checkpointer:
    def __init__(self, workdir: str | Path, *, every: int, keep: int, use_async: bool = True):
        self.directory = paths.absolute(workdir) / workdir_lib.CHECKPOINTS
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=every,
            enable_async_checkpointing=use_async,
            create=True,
            cleanup_tmp_directories=True,  # what a killed save left behind
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any, config: dict, *, force: bool = False,
             objective_state: dict | None = None) -> bool:
        """Saves when `step` is on the interval (or `force`); returns whether a save started."""
        if step in self._manager.all_steps():  # e.g. the final step fell on the interval
            return False
        if getattr(state, "frozen", None) is not None:  # a LoRA base is never saved (config points to it)
            state = state.replace(frozen=None)
        args = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config)}
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        if objective_state is not None:
            args[OBJECTIVE_ITEM] = ocp.args.JsonSave(objective_state)
        with self._save_errors():
            return self._manager.save(step, args=ocp.args.Composite(**args), force=force)

    @contextlib.contextmanager
    def _save_errors(self) -> Iterator[None]:
        """An OSError from a save (this one, or an earlier asynchronous one surfacing now) -> UserError."""
        try:
            yield
        except Exception as e:
            cause = _os_error(e)
            if cause is None:
                raise
            self._manager.reload()
            last = self._manager.latest_step()
            kept = f"the last complete checkpoint, step {last}, is intact" if last is not None else "no checkpoint was completed"
            raise UserError(f"saving a checkpoint in {self.directory} failed: {cause}; {kept}. Free space or fix "
                            "the permissions, then rerun the same command to resume") from None

    def restore_latest(self, abstract_state: Any, data_iterator: Any) -> tuple[int, Any] | None:
        """(step, state) of the newest checkpoint that restores, or None when there is none.

        A checkpoint saved for other model shapes is a UserError; one that fails to restore is
        reported, moved to `corrupt_checkpoints/` and the next older one tried.
        """
        def restore(step: int) -> Any:
            check_shapes(self.directory / str(step), abstract_state)
            return self.restore(step, abstract_state, data_iterator)

        found = restore_newest(self._manager.all_steps(), restore, self.directory, on_damaged=self._quarantine)
        return found

    def _quarantine(self, step: int) -> None:
        """Moves a damaged step out of the manager's sight (kept for inspection), so it is neither
        resumed from nor in the way when training saves that step again."""
        if jax.process_index() == 0:
            target = self.directory.parent / "corrupt_checkpoints" / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), str(target))
            log.warning("moved the damaged checkpoint to %s", target)
        self._manager.reload()

    def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> Any:
        """Restores the state into `abstract_state`'s shardings and the iterator in place."""
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        return self._manager.restore(step, args=ocp.args.Composite(**args)).state

    def saved_config(self, step: int) -> dict | None:
        return saved_config(self._manager, step)

    def objective_state(self, step: int) -> dict | None:
        """The objective's host-side state saved with `step` (Checkpointer.save), None when absent."""
        if not (self.directory / str(step) / OBJECTIVE_ITEM).exists():
            return None
        return self._manager.restore(step, args=ocp.args.Composite(**{OBJECTIVE_ITEM: ocp.args.JsonRestore()}))[
            OBJECTIVE_ITEM]

    def wait(self) -> None:
        with self._save_errors():
            self._manager.wait_until_finished()

    def close(self) -> None:
        with self._save_errors():
            self._manager.wait_until_finished()
        self._manager.close()


def _os_error(error: BaseException) -> OSError | None:
    """The OSError behind `error` (orbax and tensorstore may wrap it), or None."""
    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, OSError):
            return error
        error = error.__cause__ or error.__context__
        seen += 1
    return None


def restore_newest(steps, restore: Callable[[int], Any], directory: Path,
                   on_damaged: Callable[[int], None] | None = None) -> tuple[int, Any] | None:
    """(step, restore(step)) for the newest step that restores, trying older steps after a failure.

    A UserError from `restore` (e.g. a shape mismatch) is the user's to fix and propagates; any other
    failure means a damaged checkpoint: it is logged as a warning naming it, `on_damaged(step)` runs,
    and the next older step is tried. None when there are no steps; a UserError when none restores.
    """
    failures = []
    for step in sorted(steps, reverse=True):
        try:
            return step, restore(step)
        except UserError:
            raise
        except Exception as e:  # tensorstore, JSON and pytree errors from damaged files
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            failures.append(f"step {step} ({reason})")
            older = [s for s in steps if s < step]
            then = f"falling back to step {max(older)}" if older else "no older checkpoint"
            log.warning("checkpoint %s is damaged and cannot be restored (%s); %s", directory / str(step), reason, then)
            if on_damaged is not None:
                on_damaged(step)
    if failures:
        raise UserError(f"no checkpoint in {directory} can be restored: {'; '.join(failures)}; move the directory "
                        "away to start over")
    return None


def _dotted(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def check_shapes(step_dir: Path, abstract_state: Any) -> None:
    """A UserError naming the first parameter whose saved shape differs from this run's model.

    Unreadable metadata raises the underlying error (a damaged checkpoint, see restore_newest).
    """
    metadata = ocp.StandardCheckpointer().metadata(step_dir / "state")
    tree = getattr(metadata, "item_metadata", metadata)
    saved = {_dotted(path): tuple(m.shape) for path, m in jax.tree_util.tree_flatten_with_path(tree)[0]
             if hasattr(m, "shape")}
    current = {"params." + _dotted(path): tuple(x.shape)
               for path, x in jax.tree_util.tree_flatten_with_path(abstract_state.params)[0]}
    saved_params = {k for k in saved if k.startswith("params.")}
    for name, shape in current.items():
        shown = name.removeprefix("params.").replace(".", "/")
        if name not in saved:
            raise UserError(f"checkpoint {step_dir}: has no parameter {shown} (shape {shape}) that this config's model "
                            "has; resume with the config the run was trained with, or use a new --workdir")
        if saved[name] != shape:
            raise UserError(f"checkpoint {step_dir}: parameter {shown} has shape {saved[name]} there but {shape} in "
                            "this config's model; resume with the config the run was trained with, or use a new --workdir")
    extra = sorted(saved_params - set(current))
    if extra:
        raise UserError(f"checkpoint {step_dir}: has parameter {extra[0].removeprefix('params.').replace('.', '/')} "
                        "that this config's model does not; resume with the config the run was trained with")


def saved_config(manager: ocp.CheckpointManager, step: int) -> dict | None:
    """The config saved beside a step's state (with a LoRA run's `peft_base`), None when absent."""
    try:
        return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
    except Exception:  # older or foreign checkpoints without a config item
        return None


def latest_saved_config(workdir: str | Path) -> dict | None:
    """The config saved with a run's latest checkpoint; None without checkpoints or a saved config."""
    directory = paths.absolute(workdir) / workdir_lib.CHECKPOINTS
    if not directory.is_dir():
        return None
    with ocp.CheckpointManager(directory) as manager:
        step = manager.latest_step()
        return None if step is None else saved_config(manager, step)


def latest_checkpoint(workdir: str | Path, command: str) -> tuple[Path, int]:
    """A run's checkpoints directory and latest step, or a UserError naming the command."""
    directory = paths.absolute(workdir) / workdir_lib.CHECKPOINTS
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
    directory = paths.absolute(workdir) / workdir_lib.CHECKPOINTS
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
    # A partial restore leaves params the checkpoint does not hold as their abstract target.
    missing = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(restored["params"])
               if not isinstance(x, jax.Array)]
    if missing:
        raise UserError(f"config key 'model.init_from': the checkpoint at {directory / str(step)} has no "
                        f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} (a different model?)")
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


def resume_warnings(saved: dict, current: dict) -> list[str]:
    """What a resumed run should be told about config changes since the checkpoint.

    Changes under `data` get their own warning: the restored data position counts records of the
    old data, so the batches after the resume are not those an uninterrupted run would have seen
    (and records may be repeated or skipped). Other changes (steps, lr, ...) are listed as they are.
    """
    changed = config_differences(saved, current)
    data = [c for c in changed if c.startswith("data.")]
    other = [c for c in changed if not c.startswith("data.")]
    warnings = []
    if data:
        warnings.append("resuming with a changed data config: " + "; ".join(data) + ". The data position restored "
                        "from the checkpoint refers to the old data, so the batches from here on differ from an "
                        "uninterrupted run (records may repeat or be skipped); use a new --workdir to start over")
    if other:
        warnings.append("resuming with a config that differs from the checkpoint's: " + "; ".join(other))
    return warnings
