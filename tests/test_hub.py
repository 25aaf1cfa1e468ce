"""Hugging Face Hub model ids (jaxtune/hub.py, loading.pin_hub_ids) against the stand-in Hub
(tests/hub_server.py): the real huggingface_hub client downloads, nothing is patched."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune import cli, hub as hub_lib, models, sharding
from jaxtune.data.tokenizers import load_tokenizer, train_sentencepiece
from jaxtune.errors import UserError
from tests.helpers import write_sft_jsonl


@pytest.fixture(autouse=True)
def _fresh_pins(monkeypatch):
    """Each test starts with no Hub id pinned (pins live for a process, i.e. one command)."""
    monkeypatch.setattr(hub_lib, "_pins", {})
    monkeypatch.setattr(hub_lib, "_folders", {})


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    """A tiny Llama as a Hugging Face folder (config, safetensors, sentencepiece tokenizer) plus files
    jaxtune never reads (a .bin, a README, an onnx/ subfolder)."""
    root = tmp_path_factory.mktemp("tiny_hf")
    texts = [json.loads(line)["prompt"] + " " + json.loads(line)["response"]
             for line in write_sft_jsonl(root / "train.jsonl").read_text().splitlines()]
    folder = root / "model"
    folder.mkdir()
    train_sentencepiece(texts, folder / "tokenizer", vocab_size=280)
    vocab = load_tokenizer(folder / "tokenizer.model").vocab_size
    config = models.get_config("llama", "tiny", vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=2,
                               num_heads=4, num_kv_heads=2, max_position_embeddings=128)
    model = models.build(config)  # random weights without compiling an init (shapes from eval_shape)
    shapes = sharding.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: (rng.standard_normal(a.shape) * 0.05).astype(a.dtype), shapes)
    models.save_pretrained(config, params, folder)
    (folder / "tokenizer.vocab").unlink(missing_ok=True)
    return folder


def _extras() -> dict:
    return {"pytorch_model.bin": b"pickle", "README.md": "# tiny\n", "onnx/model.safetensors": b"onnx",
            "generation_config.json": json.dumps({"eos_token_id": 2})}


def test_hub_ids_and_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub_lib.is_hub_id("org/name") and hub_lib.is_hub_id("org/name@v1.0") and hub_lib.is_hub_id("o/n@refs/pr/1")
    assert hub_lib.parse("org/name") == ("org/name", "main") and hub_lib.parse("org/n@dev") == ("org/n", "dev")
    for local in ("./org/name", "/abs/x", "a/b/c", "gs://bucket/x", "name", "", None):
        assert not hub_lib.is_hub_id(local)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert not hub_lib.is_hub_id("org/name")  # a local path that exists wins
    assert hub_lib.local_path("org/name") == "org/name"


def test_downloads_only_what_jaxtune_reads_and_pins_revisions(hub, tiny_hf):
    first = hub.create_repo("org/tiny", tiny_hf)
    hub.commit("org/tiny", _extras())
    hub.tag("org/tiny", "v1", first)  # no generation_config.json there
    snapshot = hub_lib.resolve("org/tiny")
    files = sorted(p.name for p in snapshot.path.iterdir())
    assert files == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.model"], files
    assert sorted(hub.fetched("org/tiny")) == files
    assert snapshot.commit == hub.repos[("model", "org/tiny")].branches["main"] != first
    assert hub_lib.resolve("org/tiny@v1").commit == first
    hub.commit("org/tiny", {"config.json": "{}"})  # main moves on: this process keeps its pinned commit
    assert hub_lib.resolve("org/tiny").commit == snapshot.commit
    assert hub_lib.resolve("org/tiny", commit=first).path.name == first


def test_errors_name_the_repo(hub, hub_token, tiny_hf, monkeypatch):
    from huggingface_hub import constants
    hub.create_repo("org/tiny", tiny_hf)
    hub.create_repo("org/gated", tiny_hf, gated=True)
    hub.create_repo("org/pickles", {"config.json": (tiny_hf / "config.json").read_text(), "pytorch_model.bin": b"x"})
    cases = {
        "org/missing": r"org/missing: no such repo on the Hugging Face Hub .* HF_TOKEN",
        "org/tiny@nope": r"org/tiny@nope: the repo has no branch, tag or commit 'nope'",
        "org/gated": r"org/gated is a gated repo: .*hf auth login.* HF_TOKEN",
        "org/pickles": r"org/pickles@main: has only PyTorch .bin/.pth weights \(pytorch_model.bin\)",
    }
    for ref, message in cases.items():
        with pytest.raises(UserError, match=message):
            hub_lib.resolve(ref)
    assert hub.fetched("org/pickles") == ["config.json"]  # refused before any weights
    monkeypatch.setenv("HF_TOKEN", hub_token)  # the token users set (or their stored login)
    assert (hub_lib.resolve("org/gated").path / "model.safetensors").is_file()
    cached = hub_lib.resolve("org/tiny").path
    monkeypatch.setattr(hub_lib, "_pins", {})
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # HF_HUB_OFFLINE=1 (read at import)
    requests = len(hub.requests)
    assert hub_lib.resolve("org/tiny").path == cached and len(hub.requests) == requests
    hub.create_repo("org/never", tiny_hf)
    with pytest.raises(UserError, match=r"org/never@main: not in the local Hugging Face cache .* HF_HUB_OFFLINE=1"):
        hub_lib.resolve("org/never")


def test_pin_hub_ids_records_and_reuses_commits(hub, tiny_hf, tmp_path):
    from jaxtune import config as config_lib
    from jaxtune import loading, workdir as workdir_lib
    first = hub.create_repo("org/tiny", tiny_hf)
    config = config_lib.base_config()
    config.model.hf_dir, config.data.tokenizer = "org/tiny", "org/tiny@main"
    config.objective.type = "grpo"
    config.objective.grpo = dict(rewards=("math", "reward_model:org/rm"))
    hub.create_repo("org/rm", tiny_hf)
    assert loading.hub_ids(config) == {"org/tiny": "model", "org/tiny@main": "tokenizer", "org/rm": "model"}
    recorded = loading.pin_hub_ids(config, tmp_path)
    assert json.loads((tmp_path / workdir_lib.HUB_COMMITS).read_text()) == recorded
    assert recorded["org/tiny"] == {"repo": "org/tiny", "revision": "main", "commit": first}
    assert loading.hf_dir(config).endswith(first)
    assert loading.tokenizer_path(config).name == first  # data.tokenizer: the snapshot's tokenizer files
    assert (loading.tokenizer_path(config) / "tokenizer.model").is_file()
    hub.commit("org/tiny", {"config.json": "{}"})  # main moves; a new process resumes the run
    hub_lib._pins.clear()
    assert loading.pin_hub_ids(config, tmp_path)["org/tiny"]["commit"] == first
    assert loading.hf_dir(config).endswith(first)
    hub_lib._pins.clear()  # a new run (another workdir) takes the new main
    (tmp_path / "other").mkdir()
    assert loading.pin_hub_ids(config, tmp_path / "other")["org/tiny"]["commit"] != first


@pytest.mark.slow  # trains twice, exports and reloads a model
def test_model_id_lora_export_push_generate(hub, hub_token, tiny_hf, tmp_path, monkeypatch, capsys):
    """configs/sft_lora.py:hf_dir=ORG/NAME trains from the Hub on a Hub dataset id (source_kind=hf);
    a resume after main moved keeps the recorded commit; the merged export (with its card) pushed to the Hub and loaded back by its id
    gives the logits of the same folder loaded locally."""
    from jaxtune import inference, workdir as workdir_lib
    first = hub.create_repo("org/tiny", tiny_hf)
    hub.create_repo("org/sft-data", {"train.jsonl": write_sft_jsonl(tmp_path / "train.jsonl").read_text()},
                    repo_type="dataset")
    workdir = tmp_path / "run"
    args = ["train", "--config", "configs/sft_lora.py:hf_dir=org/tiny", "--workdir", str(workdir),
            "--config.data.source_kind=hf", "--config.data.train_path=org/sft-data", "--config.data.templates=(('{prompt} =', ' {response}'),)",
            "--config.data.seq_len=32", "--config.train.global_batch_size=8", "--config.model.dtype=float32",
            "--config.peft.base_dtype=", "--config.model.remat_policy=none", "--config.train.checkpoint_every=2",
            "--config.train.progress_bar=false", "--config.mesh.rules=dp"]
    assert cli.main([*args, "--config.train.steps=2"]) == 0
    recorded = json.loads((workdir / workdir_lib.HUB_COMMITS).read_text())
    assert recorded["org/tiny"]["commit"] == first
    hub.commit("org/tiny", {"config.json": "{}"})  # a broken main: the resumed run must not read it
    hub_lib._pins.clear()  # a new process
    assert cli.main([*args, "--config.train.steps=3"]) == 0
    assert "resuming from step 2" in capsys.readouterr().out
    assert json.loads((workdir / workdir_lib.HUB_COMMITS).read_text()) == recorded
    monkeypatch.setenv("HF_TOKEN", hub_token)
    merged = tmp_path / "merged"
    assert cli.main(["export", "--workdir", str(workdir), "--merged", str(merged), "--push_to_hub", "me/tiny-sft",
                     "--private"]) == 0
    card = (merged / "README.md").read_text()
    assert "base_model: org/tiny" in card and first in card and "library_name: transformers" in card
    assert "org/sft-data" in card  # the run's Hub dataset
    assert hub.files_at("me/tiny-sft").keys() >= {p.name for p in merged.iterdir()}
    assert hub.repos[("model", "me/tiny-sft")].private
    hub_lib._pins.clear()
    from_hub, local = inference.from_hf_dir("me/tiny-sft"), inference.from_hf_dir(str(merged))
    tokens = jnp.asarray([from_hub.tokenizer.encode("reverse: cat dog =")], jnp.int32)
    np.testing.assert_array_equal(np.asarray(from_hub.model.apply({"params": from_hub.params}, tokens)),
                                  np.asarray(local.model.apply({"params": local.params}, tokens)))


def test_cli_errors_are_one_line_naming_the_repo(hub, capsys):
    hub.create_repo("org/pickles", {"config.json": "{}", "pytorch_model.bin": b"x"})
    for ref, expected in (("org/missing", "org/missing: no such repo"), ("org/pickles@main", "has only PyTorch")):
        assert cli.main(["generate", "--hf_dir", ref, "--prompt", "hi"]) == 2
        err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("Fetching ")]
        assert len(err) == 1 and err[0].startswith("jaxtune: error: ") and expected in err[0], err  # (+ progress bar)


_TWO_PROCESSES = """
import sys
from jax._src import xla_bridge
from jaxtune import distributed, hub
distributed.initialize(distributed.Settings(sys.argv[1], 2, int(sys.argv[2])))
snapshot = hub.resolve("org/tiny")
print(snapshot.commit, snapshot.path, xla_bridge.backends_are_initialized())
"""


@pytest.mark.parametrize("shared_cache", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_two_processes_agree_on_the_commit(hub, tiny_hf, tmp_path, shared_cache):
    """Process 0 resolves main once and shares the commit through the coordination service; the
    other process fetches exactly that commit (own cache) or nothing (shared cache), and no device
    backend has started while they did."""
    import os
    import subprocess
    import sys

    from tests.test_multihost import REPO, _env, _free_port
    sha = hub.create_repo("org/tiny", tiny_hf)
    address = f"localhost:{_free_port()}"
    procs = []
    for i in range(2):
        cache = tmp_path / ("cache" if shared_cache else f"cache{i}")
        procs.append(subprocess.Popen([sys.executable, "-c", _TWO_PROCESSES, address, str(i)], cwd=REPO,
                                      env=dict(_env(), HF_HUB_CACHE=str(cache)), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    lines = [out.split() for out, _ in outputs]
    assert [line[0] for line in lines] == [sha, sha]
    assert all(line[2] == "False" for line in lines)  # downloads before any device backend starts
    lookups = [p for m, p in hub.requests if m == "GET" and p.startswith("/api/models/org/tiny/revision/")]
    assert lookups == ["/api/models/org/tiny/revision/main"]  # the revision is resolved once, by process 0
    fetched = hub.fetched("org/tiny")
    files = ["config.json", "model.safetensors", "tokenizer.model"]
    assert sorted(fetched) == sorted(files * (1 if shared_cache else 2))  # once on a shared cache, else per process
    assert all(f"/resolve/{sha}/" in p for m, p in hub.requests if m == "GET" and "/resolve/" in p)
    assert os.path.isfile(os.path.join(lines[1][1], "model.safetensors"))


def test_model_card_and_push_errors(hub, hub_token, tmp_path, monkeypatch):
    import yaml

    from jaxtune import config as config_lib
    from jaxtune import publish, workdir as workdir_lib
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / workdir_lib.HUB_COMMITS).write_text(json.dumps({"org/base@v1": {"repo": "org/base", "revision": "v1",
                                                                                  "commit": "a" * 40}}))
    (workdir / workdir_lib.METRICS_FILE).write_text('{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 1.25}\n')
    config = config_lib.base_config()
    config.model.hf_dir, config.peft.method, config.train.steps = "org/base@v1", "lora", 2
    config.data.tasks = {"chat": config_lib.task_config(source="jsonl", path="x.jsonl")}
    card = publish.model_card(config, str(workdir), kind="peft", step=2)
    meta = yaml.safe_load(card.split("---")[1])
    assert meta == {"library_name": "peft", "base_model": "org/base", "tags": ["jaxtune", "sft", "lora"]}
    assert f"at commit `{'a' * 40}`" in card and "| loss | 1.2500 |" in card and "| peft | lora |" in card
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "README.md").write_text(card)
    with pytest.raises(UserError, match=r"--push_to_hub me/x: .*hf auth login.* HF_TOKEN"):
        publish.push(str(folder), "me/x")  # no token
    with pytest.raises(UserError, match="expected a Hub repo id"):
        publish.push(str(folder), "me/x@dev")
    monkeypatch.setenv("HF_TOKEN", hub_token)
    assert publish.push(str(folder), "me/x", revision="dev").endswith(hub.repos[("model", "me/x")].branches["dev"])
    assert hub.files_at("me/x", "dev")["README.md"].decode() == card


def test_convert_a_hub_id_names_its_commit(hub, tiny_hf, tmp_path):
    from jaxtune import checkpoint
    sha = hub.create_repo("org/tiny", tiny_hf)
    assert cli.main(["convert", "--hf_dir", "org/tiny", "--out", str(tmp_path / "orbax")]) == 0
    assert json.loads((tmp_path / "orbax/checkpoints/0/config/metadata").read_text())["model"]["hf_dir"] \
        == f"org/tiny@{sha}"
