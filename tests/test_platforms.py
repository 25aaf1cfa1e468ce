"""jaxtune commands on a machine without TPUs, with libtpu installed (the `tpu`/`test` extras) and
JAX_PLATFORMS unset: no libtpu start-up noise, and `plan --topology` still compiles for a TPU."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxtune import platforms

REPO = Path(__file__).resolve().parents[1]
LIBTPU_NOISE = ("TPU accelerator type", "libtpu", "INVALID_ARGUMENT", "TPU worker", "host bounds")

pytestmark = [
    pytest.mark.skipif(platforms.accelerators_visible(), reason="this machine has a TPU or GPU"),
    pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed (the tpu extra)"),
]


def _jaxtune(*args: str) -> subprocess.CompletedProcess:
    """`jaxtune ARGS` as a user starts it: no JAX_PLATFORMS (tests/conftest.py sets it for this process)."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    # Another process holding libtpu's lock file would keep libtpu from starting, and so hide its noise.
    env.update(PYTHONPATH=str(REPO), ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    return subprocess.run([sys.executable, "-m", "jaxtune.cli", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def test_a_command_that_starts_jax_prints_only_its_own_error():
    proc = _jaxtune("plan", "--config", "configs/quickstart.py", "--config.mesh.data=3")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "jaxtune: error: config keys mesh.data x mesh.fsdp x mesh.tensor = 3, but there are 1 devices; "
        "set one axis to -1 to fill"]


@pytest.mark.slow  # a TPU compile in a fresh process (~20 s of CPU)
def test_plan_for_a_tpu_topology_compiles_quietly():
    proc = _jaxtune("plan", "--config", "configs/sft_llama.py:tiny", "--topology", "v5e-4", "--config.mesh.rules=fsdp",
                    "--config.mesh.fsdp=-1", "--config.mesh.data=1", "--config.model.num_layers=1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not [line for line in proc.stderr.splitlines() if any(n in line for n in LIBTPU_NOISE)], proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["device_kind"] == "TPU v5 lite" and summary["devices"] == 4 and summary["fits"]
