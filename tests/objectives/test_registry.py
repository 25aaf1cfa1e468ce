"""The objective registry and interface: names and old spellings, config sections, and the
"how to add an objective" example of jaxtune/objectives/__init__.py run through the real train step."""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxtune.objectives
from jaxtune import config as config_lib
from jaxtune import validation
from jaxtune import objectives, trainer
from jaxtune.errors import UserError
from jaxtune.objectives import base


def test_names_aliases_and_unknown():
    assert {"sft", "dpo", "kto"} <= set(objectives.names())
    assert objectives.get("preference") is objectives.get("dpo")  # configs saved before `dpo`
    with pytest.raises(UserError, match="objective.type' is 'dpoo'; expected one of .*dpo.*kto.*sft"):
        validation.validate(_config(**{"objective.type": "dpoo"}))


def test_old_spellings_build_the_same_objective():
    old = objectives.build(_config(**{"objective.type": "preference", "objective.dpo.loss_type": "kto"}))
    new = objectives.build(_config(**{"objective.type": "dpo", "objective.dpo.loss_type": "kto_pair"}))
    assert type(old) is type(new) and old.loss_name() == new.loss_name() == "kto_pair"
    assert old.describe() == new.describe()


def test_each_objective_owns_its_section_shown_only_when_selected():
    """An SFT config carries no GRPO or DPO keys; selecting an objective brings its section, with the
    same key names in two sections being two settings (objective.dpo.beta, objective.grpo.beta)."""
    sft = _config()
    assert sft.objective.to_dict() == {"type": "sft", "sft": {}}
    grpo = _config(**{"objective.type": "grpo", "data.builtin": "verifiable", "objective.grpo.beta": 0.04})
    assert set(grpo.objective) == {"type", "grpo"} and grpo.objective.grpo.beta == 0.04
    assert {"num_generations", "rewards", "format", "prompt_template"} <= set(grpo.objective.grpo)
    dpo = _config(**{"objective.type": "dpo", "objective.dpo.beta": 0.2})
    assert set(dpo.objective) == {"type", "dpo"} and dpo.objective.dpo.beta == 0.2
    sections = base.config_sections().sections()
    assert set(sections) == set(objectives.names()) and "beta" not in sections["reward"]


def test_typed_config_file_arguments(tmp_path):
    assert config_lib.parse_arg("llama3.2-1b,steps=3") == {"variant": "llama3.2-1b", "steps": "3"}
    assert config_lib.parse_arg("tiny,rank=4,lr=1e-3", variant="x", rank=16, lr=0.1, bf16=False) == {
        "variant": "tiny", "rank": 4, "lr": 1e-3, "bf16": False}
    with pytest.raises(UserError, match="argument 'rank=four': expected an integer"):
        config_lib.parse_arg("rank=four", rank=16)
    with pytest.raises(UserError, match=r"--config configs/sft_lora.py:rnak=4: unknown arguments \['rnak'\].*'rank'"):
        validation.load_config("configs/sft_lora.py:rnak=4", ["data.train_path=x.jsonl"], needs_data=False)


def _config(**overrides):
    c = config_lib.base_config()
    c.data.train_path = "unused.jsonl"
    validation.apply_overrides(c, [f"{key}={value}" for key, value in overrides.items()])
    return c


def _readme_example() -> str:
    """The code block of the package docstring's "How to add an objective"."""
    doc = jaxtune.objectives.__doc__
    block = doc.split("How to add an objective", 1)[1].split("::\n", 1)[1]
    lines = []
    for line in block.splitlines():
        if line.strip() and not line.startswith("    "):
            break
        lines.append(line)
    return textwrap.dedent("\n".join(lines))


@pytest.fixture
def focal():
    namespace = {}
    exec(compile(_readme_example(), "objectives/__init__.py example", "exec"), namespace)
    yield namespace["Focal"]
    del base._REGISTRY["focal"]


def test_the_documented_example_objective_trains_with_exact_accumulation(focal):
    """The docstring's focal objective: registered, configured (its key, its check), and stepped by
    the generic train step; accumulating 2 micro-batches equals the full batch (the step normalises)."""
    assert "focal" in objectives.names()
    c = _config(**{"objective.type": "focal"})
    assert c.objective.focal.gamma == 2.0
    with pytest.raises(UserError, match="'objective.focal.gamma' must be >= 0"):
        validation.validate(_config(**{"objective.type": "focal", "objective.focal.gamma": -1.0}), needs_data=False)
    objective = objectives.build(c)
    assert isinstance(objective, focal)

    rng = np.random.default_rng(0)
    vocab, b, t = 11, 4, 6
    batch = {"inputs": rng.integers(0, vocab, (b, t)), "targets": rng.integers(0, vocab, (b, t)),
             "loss_mask": (rng.random((b, t)) > 0.3).astype(np.int32), "segment_ids": np.ones((b, t), np.int32),
             "positions": np.tile(np.arange(t), (b, 1))}
    batch = {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}

    def bigram(params, tokens, positions, segment_ids, frozen=None, rngs=None):
        return params["w"][tokens]

    params = {"w": jax.random.normal(jax.random.key(0), (vocab, vocab))}
    tx = optax.sgd(0.1)
    state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    sft = objectives.build(_config())
    zero = objectives.build(_config(**{"objective.type": "focal", "objective.focal.gamma": 0.0}))

    @jax.jit  # one compile for everything
    def run(state, batch):
        steps = [trainer.make_train_step(objective, bigram, tx, optax.constant_schedule(0.1), accum=a) for a in (1, 2)]
        losses = [trainer.make_loss_fn(o, bigram)(state.params, batch, o.weight(batch))[0] for o in (sft, zero)]
        return [step(state, batch) for step in steps], losses

    ((one, m1), (two, m2)), (sft_loss, zero_loss) = run(state, batch)
    np.testing.assert_allclose(np.asarray(two.params["w"]), np.asarray(one.params["w"]), rtol=1e-5, atol=1e-7)
    assert float(m2["loss"]) == pytest.approx(float(m1["loss"]), rel=1e-5)
    assert float(m1["trained_tokens"]) == float(batch["loss_mask"].sum())  # a total, not divided by itself
    assert float(zero_loss) == pytest.approx(float(sft_loss), rel=1e-6)  # gamma=0 is SFT's cross-entropy
    assert "focal" in objectives.base.config_sections().defaults


def test_a_run_builds_its_objective_once_and_keeps_what_load_data_stored(tmp_path):
    """The trainer builds the run's objective once and passes that instance down (setup, loop,
    hooks): state an objective keeps in `load_data` is still there in `start` and every `next_batch`."""
    from jaxtune.objectives.sft import SFT
    from tests.helpers import tiny_config

    built, seen = [], []

    @base.register("_built_once_test")
    class Counting(SFT):
        def __init__(self, config):
            super().__init__(config)
            built.append(self)

        def load_data(self, workdir):
            data = super().load_data(workdir)
            self.loaded = data  # what an objective reading its own records would keep
            return data

        def start(self, run):
            assert run.data is self.loaded and run.setup.objective is self
            super().start(run)

        def next_batch(self, state, data_iter, rng):
            seen.append(self.loaded)
            return super().next_batch(state, data_iter, rng)

    try:
        config = tiny_config(tmp_path, **{"objective.type": "_built_once_test", "train.steps": 2,
                                          "train.checkpoint_every": 2})
        trainer.train(config, tmp_path / "run")
    finally:
        del base._REGISTRY["_built_once_test"]
    assert len(built) == 1 and len(seen) == 2 and all(d is built[0].loaded for d in seen)
