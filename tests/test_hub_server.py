"""The stand-in Hub serves what the real clients ask for: huggingface_hub downloads (snapshot,
single files, resumed ranges, revisions), its errors, uploads, and datasets.load_dataset of a
dataset repo (splits by file name, a config from the README, split slicing, a revision)."""

import io
import json
from pathlib import Path

import pytest

from tests.hub_fixture import cached_repo_folder

README = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
  - split: test
    path: data/test-*
- config_name: small
  data_files:
  - split: train
    path: small/*.parquet
---
# a dataset
"""


def _parquet(rows: dict) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq
    buf = io.BytesIO()
    pq.write_table(pa.table(rows), buf)
    return buf.getvalue()


def test_model_snapshot_revisions_and_resume(hub):
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    first = hub.create_repo("org/model", {"config.json": json.dumps({"a": 1}), "model.safetensors": b"x" * 1000,
                                          "pytorch_model.bin": b"y" * 10, "sub/tok.json": "{}"})
    hub.tag("org/model", "v1")
    second = hub.commit("org/model", {"config.json": json.dumps({"a": 2})})
    path = Path(snapshot_download("org/model", allow_patterns=["*.json", "*.safetensors"]))
    assert path.name == second
    assert sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()) == [
        "config.json", "model.safetensors", "sub/tok.json"]
    assert "pytorch_model.bin" not in hub.fetched("org/model")
    for revision in ("v1", first, first[:7]):
        assert json.loads(Path(hf_hub_download("org/model", "config.json", revision=revision)).read_text()) == {"a": 1}
    assert HfApi().model_info("org/model", revision="v1").sha == first
    refs = HfApi().list_repo_refs("org/model")
    assert [b.name for b in refs.branches] == ["main"] and [t.name for t in refs.tags] == ["v1"]
    # a download cut short resumes from the bytes already there (a Range request)
    blobs = cached_repo_folder(hub_cache(), "org/model") / "blobs"
    import hashlib
    etag = hashlib.sha256(b"z" * 5000).hexdigest()
    hub.commit("org/model", {"model.safetensors": b"z" * 5000})
    blobs.mkdir(parents=True, exist_ok=True)
    (blobs / f"{etag}.incomplete").write_bytes(b"z" * 3000)
    assert Path(hf_hub_download("org/model", "model.safetensors")).read_bytes() == b"z" * 5000
    assert not hub.unhandled


def hub_cache() -> str:
    from huggingface_hub import constants
    return constants.HF_HUB_CACHE


def test_errors_are_the_clients_own(hub, hub_token):
    from huggingface_hub import errors, hf_hub_download, snapshot_download
    hub.create_repo("org/model", {"config.json": "{}"})
    hub.create_repo("org/gated", {"config.json": "{}"}, gated=True)
    hub.create_repo("org/private", {"config.json": "{}"}, private=True)
    with pytest.raises(errors.RepositoryNotFoundError):
        snapshot_download("org/missing")
    with pytest.raises(errors.RepositoryNotFoundError):
        snapshot_download("org/private")
    with pytest.raises(errors.RevisionNotFoundError):
        snapshot_download("org/model", revision="nope")
    with pytest.raises(errors.EntryNotFoundError):
        hf_hub_download("org/model", "missing.json")
    with pytest.raises(errors.GatedRepoError):
        snapshot_download("org/gated")
    assert Path(snapshot_download("org/gated", token=hub_token), "config.json").is_file()
    assert Path(snapshot_download("org/private", token=hub_token), "config.json").is_file()


def test_offline_uses_the_cache(hub, monkeypatch):
    from huggingface_hub import constants, errors, snapshot_download
    sha = hub.create_repo("org/model", {"config.json": "{}"})
    online = snapshot_download("org/model")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert snapshot_download("org/model") == online and Path(online).name == sha
    with pytest.raises(errors.LocalEntryNotFoundError):
        snapshot_download("org/other")


def test_upload_creates_repo_branch_and_commit(hub, hub_token, tmp_path):
    from huggingface_hub import HfApi
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "README.md").write_text("# card\n")
    (tmp_path / "out" / "model.safetensors").write_bytes(b"w" * 2048)
    api = HfApi(token=hub_token)
    assert api.whoami()["name"] == "stand-in"
    api.create_repo("me/pushed", private=True, exist_ok=True)
    api.create_repo("me/pushed", exist_ok=True)
    api.create_branch("me/pushed", branch="dev", exist_ok=True)
    info = api.upload_folder(repo_id="me/pushed", folder_path=tmp_path / "out", revision="dev")
    files = hub.files_at("me/pushed", "dev")
    assert files["model.safetensors"] == b"w" * 2048 and files["README.md"] == b"# card\n"
    assert info.oid == hub.repos[("model", "me/pushed")].branches["dev"]
    assert "model.safetensors" not in hub.files_at("me/pushed", "main")
    with pytest.raises(Exception, match="401"):
        HfApi(token="wrong").create_repo("me/other")


@pytest.mark.slow  # 5 s: datasets prepares four Arrow caches
def test_load_dataset_splits_configs_slicing_revision(hub):
    import datasets
    hub.create_repo("org/ds", {"data/train-00000-of-00001.parquet": _parquet({"text": [f"t{i}" for i in range(10)]}),
                               "data/test-00000-of-00001.parquet": _parquet({"text": ["q0", "q1"]}),
                               "small/part.parquet": _parquet({"text": ["s0", "s1", "s2"]}),
                               "README.md": README}, repo_type="dataset")
    assert datasets.load_dataset("org/ds", split="train[:5]")["text"] == [f"t{i}" for i in range(5)]
    assert datasets.load_dataset("org/ds", split="test")["text"] == ["q0", "q1"]
    assert datasets.load_dataset("org/ds", "small", split="train[1:]")["text"] == ["s1", "s2"]
    old = hub.repos[("dataset", "org/ds")].branches["main"]
    hub.commit("org/ds", {"data/train-00000-of-00001.parquet": _parquet({"text": ["new"]})}, repo_type="dataset")
    assert datasets.load_dataset("org/ds", split="train")["text"] == ["new"]
    assert len(datasets.load_dataset("org/ds", split="train", revision=old)) == 10
    assert not hub.unhandled


def test_jsonl_dataset_repo(hub):
    import datasets
    hub.create_repo("org/lines", {"train.jsonl": "\n".join(json.dumps({"prompt": f"p{i}"}) for i in range(4))},
                    repo_type="dataset")
    assert datasets.load_dataset("org/lines", split="train[-1:]")["prompt"] == ["p3"]


def test_a_subprocess_reaches_the_same_stand_in(hub):
    import os
    import subprocess
    import sys
    sha = hub.create_repo("org/model", {"config.json": "{}"})
    code = "from huggingface_hub import snapshot_download; print(snapshot_download('org/model'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=os.environ)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).name == sha and out.stdout.startswith(os.environ["HF_HUB_CACHE"])
