"""Determinism: the batches do not depend on how the data is read (data.worker_count,
data.read_threads), and the same config and seed give the same losses bit for bit.

Bitwise equality holds on one backend with the same device count and mesh. Across device counts
or meshes the reductions are ordered differently, so losses agree to float32 rounding only:
tests/test_trainer.py::test_presets_on_8_devices_match_one_device holds them to rtol 2e-5.
"""

import numpy as np
import pytest

from jaxtune import loading, trainer
from jaxtune.data import datasets
from jaxtune.metrics import read_metrics
from tests.helpers import tiny_config


def _batches(config, workdir, n=6):
    data = datasets.load_sft_data(loading.data_settings(config), workdir, seed=config.seed)
    dataset, _ = datasets.train_dataset(data, config.data, batch_size=config.train.global_batch_size, seed=config.seed)
    it = iter(dataset)
    return [{k: np.asarray(v) for k, v in next(it).items()} for _ in range(n)]


@pytest.mark.parametrize("reading", [
    {"data.read_threads": 4},
    pytest.param({"data.worker_count": 2}, marks=pytest.mark.slow),  # spawns worker processes
    pytest.param({"data.worker_count": 2, "data.read_threads": 2, "data.prefetch": 2}, marks=pytest.mark.slow),
], ids=["read_threads", "worker_count", "both"])
def test_reading_settings_do_not_change_the_batches(tmp_path, reading):
    base = _batches(tiny_config(tmp_path), tmp_path / "w")  # 0 workers, 0 threads
    other = _batches(tiny_config(tmp_path, **reading), tmp_path / "w")
    assert len(base) == len(other)
    for a, b in zip(base, other):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_same_config_and_seed_same_losses_bitwise(tmp_path):
    """(The default run covers this too: tests/test_kill.py compares a resumed run with a fresh one bitwise.)"""
    config = tiny_config(tmp_path, **{"train.steps": 5})
    trainer.train(config, tmp_path / "a")
    trainer.train(config, tmp_path / "b")
    losses = [{r["step"]: r["loss"] for r in read_metrics(tmp_path / w) if "loss" in r} for w in "ab"]
    assert losses[0] == losses[1] and len(losses[0]) == 5
