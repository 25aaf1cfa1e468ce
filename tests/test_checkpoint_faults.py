"""Checkpoint faults: a damaged latest checkpoint falls back to the one before (with a warning naming
it), other model shapes are an error naming the parameter, a changed data config warns, and a save
that fails (disk full, permission denied) stops with a clear error and leaves the last complete
checkpoint loadable."""

import errno
import logging
import shutil

import pytest
from orbax.checkpoint._src.path import atomicity

from jaxtune import checkpoint as checkpoint_lib
from jaxtune import cli
from jaxtune.metrics import read_metrics
from tests.reference_run import train_argv  # the `reference_run` fixture (conftest): 6 steps, checkpoints 1, 2, 4, 6


def _losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


def _largest_file(directory):
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate(step_dir):
    data = _largest_file(step_dir / "state")
    data.write_bytes(data.read_bytes()[:100])


def _empty_iterator_state(step_dir):
    next((step_dir / "data").glob("process_*.json")).write_text("")


@pytest.mark.parametrize("damage", [_truncate, pytest.param(_empty_iterator_state, marks=pytest.mark.slow)])
def test_damaged_latest_checkpoint_falls_back_to_the_previous(reference_run, tmp_path, caplog, capsys, damage):
    config, original = reference_run
    workdir = tmp_path / "run"
    shutil.copytree(original, workdir)
    damage(workdir / "checkpoints" / "6")
    with caplog.at_level(logging.WARNING):
        assert cli.main(train_argv(config, workdir)) == 0
    warning = next(r.getMessage() for r in caplog.records if "is damaged" in r.getMessage())
    assert str(workdir / "checkpoints" / "6") in warning and "falling back to step 4" in warning
    assert "resuming from step 4" in capsys.readouterr().out
    assert len(list((workdir / "corrupt_checkpoints").glob("6-*"))) == 1  # kept for inspection, out of the way
    assert (workdir / "checkpoints" / "6").is_dir()  # saved again by the resumed run
    assert _losses(workdir) == _losses(original)  # steps 5 and 6 redone exactly


def test_every_checkpoint_damaged_is_an_error(reference_run, tmp_path, capsys):
    config, original = reference_run
    workdir = tmp_path / "run"
    shutil.copytree(original, workdir)
    for step in (1, 2, 4, 6):
        _truncate(workdir / "checkpoints" / str(step))
    assert cli.main(train_argv(config, workdir)) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("jaxtune: error: no checkpoint in") and "step 6 (" in last and "step 1 (" in last


def test_other_model_shapes_name_the_parameter(reference_run, tmp_path, capsys):
    config, original = reference_run
    workdir = tmp_path / "run"
    shutil.copytree(original, workdir)
    assert cli.main([*train_argv(config, workdir), "--config.model.num_heads=8", "--config.model.num_kv_heads=8",
                     "--config.train.steps=8"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "checkpoints/6: parameter" in last and "has shape (2, 32, 2, 8) there but (2, 32, 8, 4)" in last


def test_changed_data_config_warns_on_resume():
    saved = {"data": {"train_path": "a.jsonl", "seq_len": 32}, "train": {"steps": 4}}
    current = {"data": {"train_path": "b.jsonl", "seq_len": 32}, "train": {"steps": 8}}
    data_warning, other = checkpoint_lib.resume_warnings(saved, current)
    assert "changed data config: data.train_path: 'a.jsonl' -> 'b.jsonl'" in data_warning
    assert "batches from here on differ" in data_warning
    assert other.endswith("train.steps: 4 -> 8")


def _failing_commit(monkeypatch, step: int, error: OSError):
    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def fail(self):
        if self.get_final().name == str(step):
            raise error
        return await finalize(self)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", fail)


@pytest.mark.slow
@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   PermissionError(errno.EACCES, "Permission denied")], ids=["ENOSPC", "EACCES"])
def test_failed_save_stops_cleanly_and_the_last_checkpoint_resumes(reference_run, tmp_path, monkeypatch, capsys, error):
    config, original = reference_run
    workdir = tmp_path / "run"
    argv = train_argv(config, workdir)
    _failing_commit(monkeypatch, 4, error)
    assert cli.main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"jaxtune: error: saving a checkpoint in {workdir / 'checkpoints'} failed: ")
    assert error.strerror in last and "the last complete checkpoint, step 2, is intact" in last
    monkeypatch.undo()
    assert cli.main(argv) == 0  # the disk has room again: the same command resumes
    assert "resuming from step 2" in capsys.readouterr().out
    assert _losses(workdir) == _losses(original)
