"""notebooks/*.ipynb execute top to bottom on CPU, with tiny settings injected after their parameters cell.

The first cell installs jaxtune only where it is not importable, so here (PYTHONPATH = this checkout)
nothing is installed or downloaded. A cell that raises fails the test with the cell's traceback.
"""

import json
import os
import pathlib
import re

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


def execute(name: str, workdir: pathlib.Path, **params):
    """Runs notebooks/<name> in `workdir` with `params` assigned after its parameters cell; returns it."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}: expected one cell tagged 'parameters'"
    declared = nb.cells[tagged[0]].source
    for key in params:  # a misspelt parameter would silently do nothing
        assert f"\n{key} =" in "\n" + declared, f"{name}: no parameter {key} in its parameters cell"
    injected = "\n".join(f"{key} = {value!r}" for key, value in params.items())
    nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(injected, metadata={"tags": ["injected-parameters"]}))
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                         resources={"metadata": {"path": str(workdir)}})
        client.execute()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return nb


def outputs_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", "") if out.output_type == "stream" else json.dumps(out.get("data", {})))
    return "\n".join(parts)


@pytest.mark.parametrize("name", ["quickstart.ipynb", "lora_sft.ipynb", "preference.ipynb"])
def test_notebook_is_colab_ready(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    assert "pip" in first_code.source and 'find_spec("jaxtune") is None' in first_code.source  # installs, else skips
    if name != "quickstart.ipynb":  # the Hub is the main path; the offline fallback is what the tests run
        assert "JAXTUNE_PIP_SPEC" in first_code.source
        params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", [])).source
        assert re.search(r'^MODEL_ID = "[\w.-]+/[\w.-]+"', params, re.M) and re.search(r'^DATASET_ID = "trl-lib/', params, re.M)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit notebooks without outputs"


QUICKSTART_TINY = {
    "model.hidden_size": 64, "model.intermediate_size": 128, "model.num_layers": 2, "data.seq_len": 64,
    "data.num_train_examples": 2000, "data.num_eval_examples": 8, "train.global_batch_size": 8, "train.log_every": 4,
    "eval.batch_size": 8, "eval.max_new_tokens": 6, "eval.show_examples": 0, "eval.loss": False, "train.checkpoint_every": 100,
}


def test_quickstart_notebook(tmp_path):
    nb = execute("quickstart.ipynb", tmp_path, WORKDIR="runs/qs", STEPS=12, MAX_SECONDS=0, NUM_SHOWN=8,
                 OVERRIDES=QUICKSTART_TINY)
    text = outputs_text(nb)
    assert "12 steps in" in text and "held-out exact match: 0.0% before ->" in text
    assert "image/png" in text  # the live loss plot was drawn
    rows = [json.loads(line) for line in (tmp_path / "runs/qs/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [4, 8, 12]
    assert (tmp_path / "runs/qs/checkpoints/12").is_dir()


@pytest.mark.slow
def test_lora_sft_notebook(tmp_path):
    nb = execute("lora_sft.ipynb", tmp_path, MODEL_ID="", DATASET_ID="", STEPS=6, NUM_RECORDS=200, RANK=4,
                 OVERRIDES={"model.hidden_size": 64, "model.intermediate_size": 128, "model.num_layers": 2,
                            "train.log_every": 3, "train.global_batch_size": 8})
    text = outputs_text(nb)
    assert "6 steps, final loss" in text
    adapter = tmp_path / "runs/lora/peft_adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    assert (adapter / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_preference_notebook(tmp_path):
    nb = execute("preference.ipynb", tmp_path, MODEL_ID="", DATASET_ID="", NUM_PAIRS=64, SFT_STEPS=4, DPO_STEPS=4,
                 OVERRIDES={"train.global_batch_size": 8})
    text = outputs_text(nb)
    assert "SFT: 4 steps" in text and "rewards/margins" in text
    rows = [json.loads(line) for line in (tmp_path / "runs/preference/dpo/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "rewards/margins" in r] == [4]
