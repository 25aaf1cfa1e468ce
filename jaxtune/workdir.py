"""A run directory that a failed start leaves as it found it.

`jaxtune train` writes into its workdir before all input is known to be good (a tokenizer trained
on the data, metrics and TensorBoard files, an empty checkpoints/ directory). When the command
then stops on a user error before its first checkpoint, `undo_on_user_error` removes exactly what
it added (never an entry that was there before), so fixing the input and rerunning the same command
starts clean instead of resuming from a tokenizer trained on the bad file. Once a checkpoint (or a
non-finite-loss diagnostic) exists the run has made progress, and nothing is removed.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

from jaxtune.errors import UserError

# What a run directory holds, by name: every module takes these names from here.
CHECKPOINTS = "checkpoints"  # orbax steps (checkpoint.py)
DIAGNOSTICS = "diagnostics"  # step_<n>/ of a non-finite loss (nonfinite.py)
TOKENIZER_FILE = "tokenizer.model"  # a tokenizer trained on the run's data (data/datasets.py)
METRICS_FILE = "metrics.jsonl"  # one JSON line per logged step (metrics.py)
TENSORBOARD = "tensorboard"  # TensorBoard event files (metrics.py)
EVAL = "eval"  # step_<n>.json: evaluations during training (trainer/loop.py)
EVAL_RESULTS = "eval_results.json"  # `jaxtune eval --workdir` (cli.py)
HARNESS_RESULTS = "harness_results.json"  # `jaxtune eval --workdir W --harness` (cli.py)
RESPONSES_RESULTS = "responses_results.json"  # `jaxtune eval --workdir W --responses` (cli.py)
SAMPLES = "samples"  # step_<n>.jsonl: RL completions and rewards (objectives/grpo.py)
REFERENCE_LOGPS = "reference_logps"  # precomputed reference log-probs (reference.py)
DATA_SCREEN_REPORT = "data_screen.json"  # what the data screen dropped (datatools/screen.py)
HUB_COMMITS = "hub_commits.json"  # the Hub commit each model id of the run resolved to (loading.py)


def ensure_workdir(workdir: str | Path) -> Path:
    """Creates the workdir (and parents), or a UserError saying why it cannot be used."""
    path = Path(workdir)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"--workdir {workdir}: exists and is not a directory") from None
    except NotADirectoryError:
        raise UserError(f"--workdir {workdir}: cannot be created (a parent is a file, not a directory)") from None
    except OSError as e:
        raise UserError(f"--workdir {workdir}: cannot be created ({e.strerror or e})") from None
    probe = path / ".jaxtune-write-test"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--workdir {workdir}: not writable ({e.strerror or e})") from None
    return path


def has_progress(workdir: Path) -> bool:
    """Whether a run in `workdir` has saved anything worth keeping (a checkpoint step or diagnostics)."""
    checkpoints = workdir / CHECKPOINTS
    saved = checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())
    return saved or (workdir / DIAGNOSTICS).exists()


@contextlib.contextmanager
def undo_on_user_error(workdir: str | Path | None) -> Iterator[None]:
    """On a UserError inside the block, removes what the block added to `workdir` unless it saved progress."""
    if workdir is None:
        yield
        return
    path = Path(workdir)
    existed = path.is_dir()
    before = set(path.iterdir()) if existed else set()
    try:
        yield
    except UserError:
        if path.is_dir() and not has_progress(path):
            added = sorted(set(path.iterdir()) - before) if existed else [path]
            for entry in added:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
        raise
