"""Multi-process settings (flags, environment, cluster detection) and the single-process no-ops.

The real multi-process runs (2 CPU processes with gloo collectives) are in tests/test_multihost.py.
"""

import argparse

import pytest

from jaxtune import cli, distributed, validation
from jaxtune.errors import UserError
from tests.helpers import tiny_config


def _args(**kw):
    return argparse.Namespace(**{"coordinator_address": None, "num_processes": None, "process_id": None, **kw})


def test_flags_win_over_environment():
    env = {"JAX_COORDINATOR_ADDRESS": "h0:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert distributed.settings_from(_args(), env) == distributed.Settings("h0:1234", 4, 3)
    assert distributed.settings_from(_args(process_id=1), env) == distributed.Settings("h0:1234", 4, 1)
    assert not distributed.settings_from(_args(), {}).explicit
    with pytest.raises(UserError, match="JAX_NUM_PROCESSES='two'"):
        distributed.settings_from(_args(), {"JAX_NUM_PROCESSES": "two"})


@pytest.mark.parametrize("settings, message", [
    (distributed.Settings(None, 0, None), "--num_processes must be >= 1"),
    (distributed.Settings("h:1", 2, 2), r"--process_id must be in 0..1"),
    (distributed.Settings(None, 2, 0), "needs --coordinator_address"),
    (distributed.Settings("h:1", 2, None), "needs --process_id"),
    (distributed.Settings("h0", 2, 0), "expected HOST:PORT"),
])
def test_settings_that_cannot_start_are_user_errors(settings, message):
    with pytest.raises(UserError, match=message):
        distributed.validate(settings, cluster=None)


def test_cluster_supplies_what_the_flags_leave_out():
    distributed.validate(distributed.Settings(None, 2, None), cluster="slurm")


def test_slurm_with_several_tasks_is_detected(monkeypatch):
    slurm = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert distributed.detected_cluster() == "slurm"
    monkeypatch.setenv("SLURM_NTASKS", "1")  # one task: nothing to initialise
    assert distributed.detected_cluster() is None


def test_one_process_is_a_no_op():
    assert distributed.initialize(distributed.Settings()) is False
    assert distributed.initialize(distributed.Settings("h:1", 1, 0)) is False  # --num_processes 1
    assert not distributed.is_multiprocess()
    assert distributed.share(lambda: {"step": 3}, "x") == {"step": 3}
    distributed.agree({"a": 1}, "config")
    distributed.barrier("b")
    ran = []
    distributed.on_first_process(lambda: ran.append(1), "once")
    assert ran == [1]
    distributed.fail_all("nothing to tell", 2)  # returns: the caller reports as usual


def test_cli_flag_errors_are_one_line(tmp_path, capsys):
    code = cli.main(["train", "--config", "configs/quickstart.py", "--workdir", str(tmp_path), "--num_processes", "2"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["jaxtune: error: --num_processes 2 needs --coordinator_address and --process_id too (or run under "
                   "SLURM, Open MPI or on a TPU pod, where they are detected)"]


def test_data_shards_must_split_over_processes(tmp_path):
    c = tiny_config(tmp_path, **{"data.shards": 3, "train.global_batch_size": 6})
    with pytest.raises(UserError, match="'data.shards' \\(3\\) must be a multiple of the process count 2"):
        validation.validate_for_devices(c, {"data": 2, "fsdp": 1, "tensor": 1}, process_count=2)
    with pytest.raises(UserError, match="'data.shards' must be >= 0"):
        tiny_config(tmp_path, **{"data.shards": -1})
