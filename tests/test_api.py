"""jaxtune's Python API (jaxtune/api.py): what the notebooks call. The notebooks test the whole flow."""

import jax
import numpy as np
import pytest

import jaxtune
from jaxtune import optim, sharding, trainer
from jaxtune.errors import UserError

TINY = {"model.hidden_size": 32, "model.intermediate_size": 64, "model.num_layers": 2, "data.num_train_examples": 200,
        "train.progress_bar": False}


def test_load_config_takes_a_dict_or_key_value_strings():
    config = jaxtune.load_config("configs/quickstart.py", {"train.steps": 7, "optim.lr": 1e-3, "train.progress_bar": False})
    assert (config.train.steps, config.optim.lr, config.train.progress_bar) == (7, 1e-3, False)
    assert jaxtune.load_config("configs/quickstart.py", ["train.steps=7"]).train.steps == 7
    with pytest.raises(UserError, match="did you mean 'train.steps'"):
        jaxtune.load_config("configs/quickstart.py", {"train.step": 7})


@pytest.mark.slow  # trains the quickstart tokenizer and compiles the model (quickstart.ipynb covers the call by default)
def test_starting_model_is_what_training_starts_from(tmp_path):
    config = jaxtune.load_config("configs/quickstart.py", TINY)
    start = jaxtune.starting_model(config, str(tmp_path))
    assert (tmp_path / "tokenizer.model").is_file()  # trained now, reused by train()
    model = trainer.models.build(trainer.model_config_from(config, vocab_size=start.tokenizer.vocab_size))
    mesh = sharding.build_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    tx, _ = optim.build(config.optim, config.train.steps)
    with jax.set_mesh(mesh), trainer.nn.logical_axis_rules(sharding.rules("dp")):
        _, _, init = trainer.plan_state(model, tx, mesh, sharding.rules("dp"), seq_len=8)
        initial = init(jax.random.key(config.seed)).params
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(initial), jax.device_get(start.params))
    assert len(start.generate(["Give it in uppercase: cat", "Q: count a b"], max_new_tokens=3)) == 2


def test_load_config_with_tasks_replaces_data_tasks(tmp_path):
    """`jaxtune.load_config(..., tasks=...)`: a task (e.g. a Hub dataset) instead of data.train_path,
    set before the checks (a config without data would fail them)."""
    import jaxtune
    from jaxtune.config import task_config

    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    config = jaxtune.load_config("configs/sft_lora.py", {"train.steps": 1},
                                 tasks={"train": task_config(path=str(data), templates=(("{prompt}", "{response}"),))})
    assert list(config.data.tasks) == ["train"] and config.data.tasks.train.path == str(data)
    with pytest.raises(UserError, match=r"data\.train_path"):
        jaxtune.load_config("configs/sft_lora.py", {"train.steps": 1})
