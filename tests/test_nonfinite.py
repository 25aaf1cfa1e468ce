"""Non-finite loss or gradients (train.nonfinite): the update is never applied; `skip` counts and
logs it and goes on, `halt` saves diagnostics and exits with status 3 naming the step."""

import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxtune import cli, nonfinite, trainer
from jaxtune.metrics import read_metrics
from tests.helpers import write_config_file, write_sft_jsonl

POISONED_STEP = 3  # 1-based, as logged


@pytest.fixture
def poison(monkeypatch):
    """Makes the train step see NaN weights on step POISONED_STEP, so its loss and every gradient are NaN
    (the guard sits outside and still holds the real state)."""
    real = trainer.step.make_train_step

    def make(*args, **kwargs):
        step = real(*args, **kwargs)

        def poisoned(state, batch, ref_params=None):
            bad = state.step == POISONED_STEP - 1
            params = jax.tree.map(lambda p: jnp.where(bad, p * jnp.nan, p), state.params)
            return step(state.replace(params=params), batch, ref_params)

        return poisoned

    monkeypatch.setattr(trainer.step, "make_train_step", make)


def test_guard_keeps_state_and_names_groups():
    params = {"embed": jnp.ones(3), "head": jnp.ones(2)}

    @flax.struct.dataclass
    class State:
        params: dict
        opt_state: jax.Array

    def step_fn(state, batch, ref=None):
        grads = {"embed": jnp.ones(3), "head": jnp.array([1.0, jnp.inf])}
        new = jax.tree.map(lambda p, g: p - g, state.params, grads)
        return state.replace(params=new, opt_state=state.opt_state + 1), dict(
            loss=jnp.float32(1.0), grad_norm=jnp.float32(jnp.inf), **nonfinite.grad_flags(grads))

    state = State(params=params, opt_state=jnp.int32(0))
    new, metrics = jax.jit(nonfinite.guard(step_fn))(state, {})
    assert float(metrics[nonfinite.FLAG]) == 1.0
    assert all(np.array_equal(new.params[k], params[k]) for k in params) and int(new.opt_state) == 0
    text = nonfinite.describe(7, jax.device_get(metrics), nonfinite.group_names(params))
    assert text.startswith("step 7: loss 1, grad_norm inf; non-finite gradients in head (1 of 2")


@pytest.fixture
def config_file(tmp_path):
    train = write_sft_jsonl(tmp_path / "train.jsonl")
    return write_config_file(tmp_path / "cfg.py", train, """
        c.train.steps = 4
        c.train.checkpoint_every = 2
        c.train.keep_checkpoints = 5
    """)


def _params(workdir, step):
    with ocp.CheckpointManager(workdir / "checkpoints") as m:
        return m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state["params"]


def test_skip_drops_the_update_and_goes_on(poison, config_file, tmp_path, capsys):
    work = tmp_path / "run"
    assert cli.main(["train", "--config", str(config_file), "--workdir", str(work), "--config.train.nonfinite=skip",
                     "--config.train.steps=3"]) == 0
    out = capsys.readouterr().out
    assert f"step {POISONED_STEP}: loss nan" in out and "update skipped (train.nonfinite='skip', 1 so far)" in out
    rows = {r["step"]: r for r in read_metrics(work) if "loss" in r}
    assert np.isfinite(rows[2]["loss"]) and rows[3]["skipped_steps"] == 1
    before, after = _params(work, 2), _params(work, 3)  # step 3's update was not applied
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(after))


@pytest.mark.slow
def test_halt_saves_diagnostics_and_exits_3(poison, config_file, tmp_path, capsys):
    work = tmp_path / "run"
    assert cli.main(["train", "--config", str(config_file), "--workdir", str(work)]) == nonfinite.EXIT_STATUS
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"jaxtune: error: non-finite loss or gradients at step {POISONED_STEP}: loss nan")
    assert "parameter groups" in last and "diagnostics/step_3" in last
    diagnostics = work / "diagnostics" / f"step_{POISONED_STEP}"
    report = json.loads((diagnostics / "report.json").read_text())
    assert report["step"] == POISONED_STEP
    assert set(np.load(diagnostics / "batch.npz")) >= {"inputs", "targets", "loss_mask"}
    saved = ocp.StandardCheckpointer().restore(diagnostics / "state")
    assert np.all([np.isfinite(x).all() for x in jax.tree.leaves(saved["params"])])
    assert sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit()) == [1, 2]
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(_params(work, 2)))  # the last good one loads
