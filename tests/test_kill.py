"""Kill tests: `jaxtune train` is SIGKILLed (between steps, inside an asynchronous save, inside the
very first save), the same command is rerun, and every logged loss and the final parameters equal
an uninterrupted run's bit for bit (CPU, same device count). A partially written checkpoint is
never resumed from. SFT in the default run; the other kill points and LoRA / DPO runs are slow.
"""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxtune import cli
from jaxtune.metrics import read_metrics
from tests.reference_run import STEPS, train_argv, write_config

REPO = Path(__file__).resolve().parents[1]


def _killed(fault: str, argv: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "tests.fault_injection", fault, "--", *argv], env=env,
                          capture_output=True, text=True, timeout=600)


def _steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _final_state(workdir: Path):
    with ocp.CheckpointManager(workdir / "checkpoints") as m:
        return m.restore(STEPS, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state


def _losses(workdir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


def check_kill_and_resume(tmp_path: Path, run: str, fault: str, capsys, reference_run=None) -> None:
    if reference_run is None:  # LoRA / DPO: their own uninterrupted run
        config, reference = write_config(tmp_path, run), tmp_path / "reference"
        assert cli.main(train_argv(config, reference)) == 0
    else:
        config, reference = reference_run
    killed = tmp_path / "killed"

    proc = _killed(fault, train_argv(config, killed))
    assert proc.returncode == -9, proc.stdout + proc.stderr  # really killed, not a clean exit
    kind, _, at = fault.partition(":")
    at = int(at)
    saved = _steps(killed)
    if kind == "kill_in_save":  # the half-written step is not a checkpoint; the one before it is intact
        assert at not in saved and (max(saved) if saved else 0) < at
        assert any(p.name.startswith(f"{at}.orbax-checkpoint-tmp") for p in (killed / "checkpoints").iterdir())
    else:
        assert max(saved) < at

    capsys.readouterr()
    assert cli.main(train_argv(config, killed)) == 0  # the same command
    out = capsys.readouterr().out
    assert (f"resuming from step {max(saved)}" in out) if saved else ("resuming" not in out)
    assert _losses(killed) == _losses(reference)  # every step, bit for bit (JSON keeps all float digits)
    assert sorted(_losses(killed)) == list(range(1, STEPS + 1))
    for a, b in zip(jax.tree.leaves(_final_state(reference)), jax.tree.leaves(_final_state(killed))):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not [p for p in (killed / "checkpoints").iterdir() if "tmp" in p.name]  # cleaned up on reopen


def test_sigkill_in_async_save_resumes_bitwise(tmp_path, capsys, reference_run):
    check_kill_and_resume(tmp_path, "sft", "kill_in_save:4", capsys, reference_run)


@pytest.mark.slow
@pytest.mark.parametrize("run,fault", [
    ("sft", "kill_after_step:3"), ("sft", "kill_in_save:1"),
    ("lora", "kill_in_save:4"), ("lora", "kill_after_step:3"),
    ("dpo", "kill_in_save:4"), ("dpo", "kill_after_step:5"),
])
def test_sigkill_resumes_bitwise(tmp_path, capsys, run, fault, reference_run):
    check_kill_and_resume(tmp_path, run, fault, capsys, reference_run if run == "sft" else None)
