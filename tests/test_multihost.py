"""Multi-process runs on one machine: 2 CPU processes x 2 devices (gloo collectives) against 1 process x 4.

Every process is a real `python -m jaxtune.cli` subprocess started with --coordinator_address on a
free local port, exactly as on a pod (one process per host). The single-process reference runs in
this process on 4 of its 8 fake devices, with the same config: the losses must agree per step.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import pytest

from jaxtune import config as config_lib
from jaxtune import trainer
from jaxtune.metrics import read_metrics
from tests.helpers import write_preference_jsonl, write_sft_jsonl

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5
PROCESS_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
                XLA_FLAGS="--xla_force_host_platform_device_count=2")


def launch(args: list[str], num_processes: int = 2) -> list[subprocess.Popen]:
    """`jaxtune ARGS` as `num_processes` cooperating processes (stdout+stderr captured per process)."""
    port = _free_port()
    return [
        subprocess.Popen(
            [sys.executable, "-m", "jaxtune.cli", *args, "--coordinator_address", f"localhost:{port}",
             "--num_processes", str(num_processes), "--process_id", str(i)],
            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
        for i in range(num_processes)
    ]


def wait(procs: list[subprocess.Popen], timeout: float = PROCESS_TIMEOUT_S) -> tuple[list[int], list[str]]:
    deadline = time.time() + timeout
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=max(1.0, deadline - time.time()))[0])
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return [p.returncode for p in procs], outs


def run_cli(args: list[str], num_processes: int = 2) -> list[str]:
    codes, outs = wait(launch(args, num_processes))
    assert codes == [0] * num_processes, "\n\n".join(outs)
    return outs


def _config_file(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "cfg.py"
    path.write_text(textwrap.dedent('''
        """jaxtune train --config cfg.py --workdir W"""
        from tests.helpers import tiny_base_config

        def get_config(arg=None):
            c = tiny_base_config({train!r})
            c.mesh.rules = "fsdp"
            c.mesh.data = 2
            c.mesh.fsdp = 2
            c.data.shards = 2  # the same packed batches for 1 or 2 processes
            c.train.steps = 4
            c.train.checkpoint_every = 2
            c.train.async_checkpoints = False
    ''').format(train=str(tmp_path / "train.jsonl")) + textwrap.indent(textwrap.dedent(body), " " * 4) + "    return c\n")
    return path


def _reference_run(config_file: Path, workdir: Path, overrides: list[str] = ()):
    """The same config in this process, on 4 devices."""
    config = config_lib.load_config(str(config_file), list(overrides))
    return trainer.train(config, workdir, devices=jax.devices()[:4])


def _losses(workdir: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_metrics(workdir) if "loss" in row}


def _assert_same_losses(workdir: Path, reference: Path) -> None:
    got, want = _losses(workdir), _losses(reference)
    assert sorted(got) == sorted(want) and want, (got, want)
    worst = max(abs(got[s] - want[s]) for s in want)
    assert worst <= TOLERANCE, (got, want)


@pytest.fixture
def sft_config(tmp_path):
    write_sft_jsonl(tmp_path / "train.jsonl")
    return _config_file(tmp_path, "")


def test_two_processes_match_one_packed_sft(sft_config, tmp_path):
    """The default-suite representative: packed SFT, fsdp x data mesh over 2 processes; one process
    writes metrics/console, a multi-host checkpoint, a tokenizer trained once."""
    outs = run_cli(["train", "--config", str(sft_config), "--workdir", str(tmp_path / "multi")])
    _reference_run(sft_config, tmp_path / "single")
    _assert_same_losses(tmp_path / "multi", tmp_path / "single")
    assert "jaxtune: done: 4 steps" in outs[0] and "jaxtune: done" not in outs[1]
    assert "step 4:" not in outs[1]
    assert sorted(int(p.name) for p in (tmp_path / "multi" / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
