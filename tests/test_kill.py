"""Kill tests: `jaxtune train` is SIGKILLed (between steps, inside an asynchronous save, inside the
very first save), the same command is rerun, and every logged loss and the final parameters equal
an uninterrupted run's bit for bit (CPU, same device count). A partially written checkpoint is
never resumed from. SFT in the default run; the other kill points and LoRA / DPO runs are slow.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxtune import cli
from jaxtune.metrics import read_metrics
from tests.helpers import write_preference_jsonl, write_sft_jsonl

REPO = Path(__file__).resolve().parents[1]
STEPS = 6  # checkpoints at 1 (orbax saves the first step), 2, 4 and 6

RUNS = {
    "sft": "",
    "lora": "c.peft.method = 'lora'",
    "dpo": textwrap.dedent('''
        c.objective.type = 'preference'
        c.objective.reference = 'copy'
        c.data.train_path = PAIRS
        c.data.templates = (('{prompt}', '{response}'),)
        c.optim.lr = 1e-3
    '''),
}


def _config(tmp_path: Path, run: str) -> Path:
    train = write_sft_jsonl(tmp_path / "train.jsonl")
    pairs = write_preference_jsonl(tmp_path / "pairs.jsonl", 48)
    path = tmp_path / "cfg.py"
    path.write_text(textwrap.dedent(f'''
        from tests.helpers import tiny_base_config
        PAIRS = {str(pairs)!r}

        def get_config(arg=None):
            c = tiny_base_config({str(train)!r})
            c.train.steps = {STEPS}
            c.train.checkpoint_every = 2
            c.train.keep_checkpoints = 10
    ''') + textwrap.indent(RUNS[run], " " * 4) + "\n    return c\n")
    return path


def _train_argv(config: Path, workdir: Path) -> list[str]:
    return ["train", "--config", str(config), "--workdir", str(workdir)]


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


def check_kill_and_resume(tmp_path: Path, run: str, fault: str, capsys) -> None:
    config = _config(tmp_path, run)
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert cli.main(_train_argv(config, reference)) == 0

    proc = _killed(fault, _train_argv(config, killed))
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
    assert cli.main(_train_argv(config, killed)) == 0  # the same command
    out = capsys.readouterr().out
    assert (f"resuming from step {max(saved)}" in out) if saved else ("resuming" not in out)
    assert _losses(killed) == _losses(reference)  # every step, bit for bit (JSON keeps all float digits)
    assert sorted(_losses(killed)) == list(range(1, STEPS + 1))
    for a, b in zip(jax.tree.leaves(_final_state(reference)), jax.tree.leaves(_final_state(killed))):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not [p for p in (killed / "checkpoints").iterdir() if "tmp" in p.name]  # cleaned up on reopen


def test_sigkill_in_async_save_resumes_bitwise(tmp_path, capsys):
    check_kill_and_resume(tmp_path, "sft", "kill_in_save:4", capsys)


@pytest.mark.slow
@pytest.mark.parametrize("run,fault", [
    ("sft", "kill_after_step:3"), ("sft", "kill_in_save:1"),
    ("lora", "kill_in_save:4"), ("lora", "kill_after_step:3"),
    ("dpo", "kill_in_save:4"), ("dpo", "kill_after_step:5"),
])
def test_sigkill_resumes_bitwise(tmp_path, capsys, run, fault):
    check_kill_and_resume(tmp_path, run, fault, capsys)
