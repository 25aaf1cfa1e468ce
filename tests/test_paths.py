"""gs:// paths go through etils.epath wherever a path is accepted.

`fake_gcs` points epath's gs:// backend at a local directory (fsspec's local filesystem with
gs://bucket/x -> ROOT/bucket/x) and runs from another directory: code that opened a gs:// string with
pathlib or open() would write `gs:/bucket/...` under the current directory instead, and read nothing.
Orbax checkpoints (tensorstore's own gs:// driver) and TensorBoard (tensorboardX's) are not covered.
"""

import json
import os

import numpy as np
import pytest
from etils.epath import backend as epath_backend
from fsspec.implementations.local import LocalFileSystem

from jaxtune import config as config_lib
from jaxtune import evaluate, inference, loading, metrics, models, paths, reference, validation
from jaxtune.data import chat, datasets
from jaxtune.data.tokenizers import load_tokenizer
from jaxtune.errors import UserError


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    root = tmp_path / "gcs"
    root.mkdir()

    class FakeGCS(LocalFileSystem):
        @classmethod
        def _strip_protocol(cls, path):
            path = os.fspath(path)
            if path.startswith("gs://"):
                path = os.path.join(root, path[len("gs://"):])
            return super()._strip_protocol(path)

    fs = FakeGCS()
    monkeypatch.setattr(epath_backend.fsspec_backend, "fs", lambda path: fs)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield root
    assert not any(cwd.iterdir()), f"something wrote gs:// paths as local files: {list(cwd.rglob('*'))}"


def test_absolute_keeps_uris():
    assert str(paths.absolute("gs://bucket/run")) == "gs://bucket/run"
    assert str(paths.absolute("runs/x")) == os.path.join(os.getcwd(), "runs/x")
    assert paths.is_remote("gs://b/x") and not paths.is_remote("/b/x")


def _write(uri: str, text: str) -> str:
    path = paths.path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return uri


def test_data_templates_and_trained_tokenizer_on_gcs(fake_gcs):
    records = [{"word": w, "upper": w.upper()} for w in ("cat", "dog", "sun", "moon", "tree", "bird") * 20]
    _write("gs://bucket/data/train.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    _write("gs://bucket/templates.json", json.dumps({"upper": [["Uppercase: {word}", "{upper}"]]}))
    _write("gs://bucket/data/eval.jsonl", json.dumps(records[0]) + "\n")
    c = config_lib.base_config()
    c.data.train_path, c.data.eval_path = "gs://bucket/data/train.jsonl", "gs://bucket/data/eval.jsonl"
    c.data.templates = (("Uppercase: {word}", "{upper}"),)
    c.data.tokenizer_vocab_size = 300
    data = datasets.load_sft_data(loading.data_settings(c), "gs://bucket/run", seed=0)
    assert (fake_gcs / "bucket/run/tokenizer.model").is_file()  # trained into the gs:// workdir
    assert data.eval_records[0]["word"] == "cat"
    for location in ("gs://bucket/run/tokenizer.model", "gs://bucket/run"):  # a file, or a dir holding one
        assert load_tokenizer(location).encode("cat dog") == data.tokenizer.encode("cat dog")
    again = datasets.load_sft_data(loading.data_settings(c), "gs://bucket/run", seed=0)  # the cached tokenizer is reused
    assert again.tokenizer.vocab_size == data.tokenizer.vocab_size
    c.data.tokenizer = "gs://bucket/run/tokenizer.model"
    c.data.eval_path = ""
    c.data.tasks.upper = config_lib.task_config(path="gs://bucket/data/train.jsonl", templates="gs://bucket/templates.json:upper")
    mixed = datasets.load_sft_data(loading.data_settings(c), "gs://bucket/other", seed=0)
    assert mixed.tokenizer.vocab_size == data.tokenizer.vocab_size and len(mixed.tasks[0].records) == len(records)
    c.data.tokenizer = "gs://bucket/missing.model"
    with pytest.raises(UserError, match="gs://bucket/missing.model does not exist"):
        datasets.load_sft_data(loading.data_settings(c), "gs://bucket/other", seed=0)


@pytest.mark.slow  # builds, saves and loads a model
def test_hf_dir_on_gcs(fake_gcs, tmp_path):
    cfg = models.get_config("llama", "tiny", vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=2,
                            num_heads=4, num_kv_heads=2)
    model = models.build(cfg)
    import jax
    import jax.numpy as jnp

    from jaxtune import sharding
    from jaxtune.data.tokenizers import train_sentencepiece

    params = sharding.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    local_tok = tmp_path / "tok"
    local_tok.mkdir()
    train_sentencepiece(["the cat sat on the mat", "a dog ran"] * 50, local_tok / "tokenizer", vocab_size=300)
    models.save_pretrained(model, params, "gs://bucket/hf", tokenizer_dir=str(local_tok))
    assert (fake_gcs / "bucket/hf/config.json").is_file() and (fake_gcs / "bucket/hf/tokenizer.model").is_file()
    loaded = inference.load(workdir=None, hf_dir="gs://bucket/hf")
    np.testing.assert_array_equal(np.asarray(loaded.params["embed"]["embedding"]), np.asarray(params["embed"]["embedding"]))
    assert loaded.tokenizer.encode("the cat") == load_tokenizer(local_tok / "tokenizer.model").encode("the cat")
    with pytest.raises(UserError, match="--hf_dir gs://bucket/nothing: no such directory"):
        inference.load(workdir=None, hf_dir="gs://bucket/nothing")


def test_metrics_and_eval_results_on_gcs(fake_gcs):
    seen = []
    writer = metrics.MetricsWriter("gs://bucket/run", tensorboard=False, on_write=seen.append)
    for step in (1, 2, 3):
        writer.write(step, {"loss": 1.0 / step})
    writer.close()
    assert [r["step"] for r in metrics.read_metrics("gs://bucket/run")] == [1, 2, 3] and len(seen) == 3
    writer = metrics.MetricsWriter("gs://bucket/run", resume_step=2, tensorboard=False)  # a resume drops later rows
    writer.write(3, {"loss": 0.5})
    writer.close()
    assert [(r["step"], r["loss"]) for r in metrics.read_metrics("gs://bucket/run")] == [(1, 1.0), (2, 0.5), (3, 0.5)]
    evaluate.write_results("gs://bucket/run/eval/step_3.json", {"exact_match": 0.5}, step=3)
    assert json.loads((fake_gcs / "bucket/run/eval/step_3.json").read_text())["metrics"] == {"exact_match": 0.5}


def test_chat_template_mc_set_and_reference_table_on_gcs(fake_gcs):
    _write("gs://bucket/chat.jinja", "{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    assert chat.resolve_template("gs://bucket/chat.jinja").startswith("{% for m in messages %}")
    _write("gs://bucket/hf/tokenizer_config.json", json.dumps({"chat_template": "{{ messages[0]['content'] }}"}))
    assert chat.resolve_template("gs://bucket/hf") == "{{ messages[0]['content'] }}"
    _write("gs://bucket/mc.jsonl", json.dumps({"prompt": "2+2?", "options": ["3", "4"], "answer": "4"}) + "\n")
    c = config_lib.base_config()
    c.data.builtin = "quickstart"
    c.eval.mc_path = "gs://bucket/mc.jsonl"
    validation.validate(c)
    assert evaluate.load_multiple_choice("gs://bucket/mc.jsonl")[0]["answer"] == 1
    c.eval.mc_path = "gs://bucket/none.jsonl"
    with pytest.raises(UserError, match="eval.mc_path': gs://bucket/none.jsonl does not exist"):
        validation.validate(c)
    table = np.arange(6, dtype=np.float32).reshape(3, 2)
    paths.path("gs://bucket/run/reference_logps").mkdir(parents=True)
    reference._save_atomic(paths.path("gs://bucket/run/reference_logps/logps.npy"), table)
    np.testing.assert_array_equal(np.load(fake_gcs / "bucket/run/reference_logps/logps.npy"), table)
