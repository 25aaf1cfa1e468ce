import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune import sharding, trainer
from jaxtune.metrics import read_metrics
from tests.helpers import tiny_config, tiny_mixture_config


def _losses(workdir):
    return {row["step"]: row["loss"] for row in read_metrics(workdir) if "loss" in row}


def test_trains_and_writes_outputs(tmp_path):
    c = tiny_config(tmp_path, **{"train.steps": 12, "optim.lr": 1e-2})
    summary = trainer.train(c, tmp_path / "run")
    losses = _losses(tmp_path / "run")
    assert sorted(losses) == list(range(1, 13))
    assert losses[12] < losses[1]
    rows = read_metrics(tmp_path / "run")
    assert {"loss", "accuracy", "trained_tokens", "grad_norm", "lr"} <= set(rows[0])
    assert (tmp_path / "run" / "tokenizer.model").is_file()
    assert any((tmp_path / "run" / "tensorboard").iterdir())
    assert (tmp_path / "run" / "checkpoints" / "12").is_dir()
    assert summary.steps == 12 and not summary.stopped_early


def test_resume_after_kill_reproduces_losses(tmp_path):
    """Simulated SIGKILL: the last checkpoint is lost, the rerun resumes from the one before."""
    c = tiny_config(tmp_path, **{"train.steps": 6, "train.checkpoint_every": 3})
    full = tmp_path / "full"
    trainer.train(c, full)
    reference = _losses(full)

    interrupted = tmp_path / "interrupted"
    shutil.copytree(full, interrupted)
    shutil.rmtree(interrupted / "checkpoints" / "6")  # killed before the final save completed
    summary = trainer.train(c, interrupted)
    resumed = _losses(interrupted)
    assert summary.steps == 6
    assert sorted(resumed) == list(range(1, 7))  # rows past step 3 were rewritten, not duplicated
    assert max(abs(resumed[s] - reference[s]) for s in range(1, 7)) <= 1e-6


def test_resume_mid_run_equals_uninterrupted(tmp_path):
    """Stop after the first step (time budget exhausted), then resume to the end."""
    c = tiny_config(tmp_path, **{"train.steps": 6, "train.checkpoint_every": 100})
    trainer.train(c, tmp_path / "full")
    reference = _losses(tmp_path / "full")

    stopped = tiny_config(tmp_path, **{"train.steps": 6, "train.checkpoint_every": 100, "train.max_seconds": 1e-9})
    first = trainer.train(stopped, tmp_path / "split")
    assert not first.stopped_early and first.steps == 1  # a time budget ends the run normally
    second = trainer.train(c, tmp_path / "split")
    resumed = _losses(tmp_path / "split")
    assert second.steps == 6
    assert max(abs(resumed[s] - reference[s]) for s in range(1, 7)) <= 1e-6


def test_mixture_resumes_mid_mixture_exactly(tmp_path, capsys):
    """A FLAN-templated task + a chat task, capped: a stopped-and-resumed run equals an uninterrupted one."""
    c = tiny_mixture_config(tmp_path, **{"train.steps": 4, "train.checkpoint_every": 100})
    trainer.train(c, tmp_path / "full")
    out = capsys.readouterr().out
    assert "nli: 53.85% of examples (40 records)" in out and "chat: 46.15%" in out  # 35 : 30 after the cap
    assert "packing efficiency" in out and "chat:" in out.split("jaxtune: data (this process):")[1]
    reference = _losses(tmp_path / "full")
    stopped = tiny_mixture_config(tmp_path, **{"train.steps": 4, "train.checkpoint_every": 100, "train.max_seconds": 1e-9})
    trainer.train(stopped, tmp_path / "split")
    trainer.train(c, tmp_path / "split")
    resumed = _losses(tmp_path / "split")
    assert max(abs(resumed[s] - reference[s]) for s in range(1, 5)) <= 1e-6


def test_grad_accumulation_matches_full_batch(tmp_path):
    base = trainer.train(tiny_config(tmp_path, **{"train.steps": 4}), tmp_path / "a")
    accum = trainer.train(
        tiny_config(tmp_path, **{"train.steps": 4, "train.grad_accum_steps": 4, "mesh.data": 2}), tmp_path / "b",
        devices=jax.devices()[:2],
    )
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    np.testing.assert_allclose([a[s] for s in a], [b[s] for s in a], rtol=2e-5)


@pytest.mark.parametrize(
    "mesh",
    [
        # fsdp_tp (every axis in use) is the default-run representative; dp and fsdp run with -m slow.
        pytest.param({"mesh.rules": "dp", "mesh.data": 8}, marks=pytest.mark.slow),
        pytest.param({"mesh.rules": "fsdp", "mesh.data": 2, "mesh.fsdp": 4}, marks=pytest.mark.slow),
        {"mesh.rules": "fsdp_tp", "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2},
    ],
    ids=["dp", "fsdp", "fsdp_tp"],
)
def test_presets_on_8_devices_match_one_device(tmp_path, mesh):
    assert jax.device_count() == 8, "tests/conftest.py sets 8 host devices"
    steps = {"train.steps": 4}
    trainer.train(tiny_config(tmp_path, **steps, **{"mesh.data": 1}), tmp_path / "one", devices=jax.devices()[:1])
    trainer.train(tiny_config(tmp_path, **steps, **mesh), tmp_path / "eight")
    one, eight = _losses(tmp_path / "one"), _losses(tmp_path / "eight")
    np.testing.assert_allclose([eight[s] for s in one], [one[s] for s in one], rtol=2e-5)


def test_state_is_sharded_by_preset(tmp_path):
    """fsdp+tp shards weight matrices: no device holds a full replica of a sharded weight."""
    from jax.sharding import PartitionSpec

    from jaxtune import sharding

    mesh = sharding.build_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    spec = sharding.spec_for((64, 128), ("embed", "mlp"), mesh, sharding.rules("fsdp_tp"))
    assert spec == PartitionSpec("fsdp", "tensor")
    # an indivisible dimension falls back to replication instead of failing
    spec = sharding.spec_for((63, 128), ("embed", "mlp"), mesh, sharding.rules("fsdp_tp"))
    assert spec == PartitionSpec(None, "tensor")
    assert sharding.spec_for((64, 128), ("embed", "mlp"), mesh, sharding.rules("dp")) == PartitionSpec()


def test_sharded_init_never_materialises_full_replicas():
    import flax.linen as nn
    from jax.sharding import PartitionSpec

    from jaxtune import models, optim, sharding
    from jaxtune.config import base_config

    model = models.build(models.get_config("llama", "tiny", vocab_size=64, hidden_size=32, num_heads=4, num_kv_heads=2, intermediate_size=64))
    tx, _ = optim.build(base_config().optim, 10)
    mesh = sharding.build_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = sharding.rules("fsdp_tp")
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        _, shardings, init = trainer.plan_state(model, tx, mesh, rules, seq_len=16)
        state = init(jax.random.key(0))
    q = state.params["layers"]["attn"]["q_proj"]["kernel"]  # [layers, embed, heads, head_dim]
    assert q.sharding.spec == PartitionSpec(None, "fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (q.shape[0], q.shape[1] // 2, q.shape[2] // 2, q.shape[3])
    mu = jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
    adam = [x for x in mu if hasattr(x, "mu")][0]
    assert adam.mu["layers"]["attn"]["q_proj"]["kernel"].sharding.spec == q.sharding.spec  # optimizer state follows
    assert state.params["embed"]["embedding"].sharding.spec == PartitionSpec("tensor", "fsdp")


def test_next_batch_may_give_host_rows_or_global_arrays():
    """What an objective's next_batch returns becomes the step's global batch: host rows (this
    process's share) or jax.Arrays made on the devices (rollouts), placed in the batch shardings."""
    from jaxtune.trainer import loop

    mesh = sharding.build_mesh({"data": 8, "fsdp": 1, "tensor": 1})
    shardings = {"segment_ids": sharding.batch_sharding(mesh, 2), "advantages": sharding.batch_sharding(mesh, 1)}
    host = {"segment_ids": np.tile([1, 1, 0], (8, 1)).astype(np.int32), "advantages": np.arange(8, dtype=np.float32)}
    device = {k: jnp.asarray(v) for k, v in host.items()}
    for batch in (host, device):
        placed = loop.global_batch(batch, shardings)
        assert all(placed[k].sharding == shardings[k] for k in shardings)
        np.testing.assert_array_equal(np.asarray(placed["advantages"]), host["advantages"])
        assert loop.batch_tokens(batch) == 16
