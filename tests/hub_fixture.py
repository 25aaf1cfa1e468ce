"""The stand-in Hub (tests/hub_server.py) for the whole test session, and the `hub` fixture.

Why it starts at conftest import and not in a fixture: `huggingface_hub` reads HF_ENDPOINT,
HF_HOME/HF_HUB_CACHE and HF_HUB_OFFLINE into module constants when it is first imported, and
`datasets` copies them into `datasets.config` (transformers imports both while tests are being
collected). `start_session_hub()` therefore runs first thing in tests/conftest.py: it starts the
server on 127.0.0.1 and points the environment at it, so every import of those libraries in this
process and every subprocess a test starts (the `jaxtune` CLI, 2-process runs) talks to the
stand-in exactly as it would to huggingface.co: no client function is patched, and no test can
reach the real Hub (the endpoint is local; no token is set and the login file lives in a temp dir).

Per test, the `hub` fixture gives an empty stand-in and a fresh cache: it sets HF_HUB_CACHE /
HF_DATASETS_CACHE for subprocesses and, for code in this process, the cache constants the libraries
already read (`huggingface_hub.constants.HF_HUB_CACHE`; `datasets.config.HF_DATASETS_CACHE` and the
paths derived from it). `hub_offline` does the same for HF_HUB_OFFLINE (the constant
`huggingface_hub.constants.HF_HUB_OFFLINE` is what `is_offline_mode()` reads on every call).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

from tests.hub_server import StandInHub

TOKEN = "hf_stand_in_token"  # the token the stand-in accepts for gated/private repos and uploads
_SESSION: StandInHub | None = None


def start_session_hub() -> StandInHub:
    """Start the session's stand-in Hub and point HF_* at it (before huggingface_hub is imported)."""
    global _SESSION
    if _SESSION is None:
        if "huggingface_hub" in sys.modules:
            raise RuntimeError("start_session_hub() must run before huggingface_hub is imported")
        _SESSION = StandInHub(tokens=(TOKEN,)).start()
        home = tempfile.mkdtemp(prefix="stand-in-hf-home-")
        os.environ.update({
            "HF_ENDPOINT": _SESSION.url, "HF_HOME": home, "HF_HUB_CACHE": os.path.join(home, "hub"),
            "HF_DATASETS_CACHE": os.path.join(home, "datasets"), "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0",
            "TRANSFORMERS_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "10", "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
            "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        })
        for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_STORED_TOKENS_PATH"):
            os.environ.pop(name, None)
    return _SESSION


@pytest.fixture
def hub(tmp_path_factory, monkeypatch):
    """The stand-in Hub, empty, with a fresh HF cache for this test (see the module docstring).

    `hub.create_repo("org/name", {"config.json": "..."} or folder)` -> commit sha; `hub.commit`,
    `hub.tag`, `hub.files_at`, `hub.fetched`; `hub.url` is HF_ENDPOINT; `hub_token` is accepted."""
    server = start_session_hub()
    server.reset()
    home = tmp_path_factory.mktemp("hf_home")
    paths = {"HF_HOME": home, "HF_HUB_CACHE": home / "hub", "HF_DATASETS_CACHE": home / "datasets"}
    for name, path in paths.items():
        monkeypatch.setenv(name, str(path))
    for module, name, value in (
        ("huggingface_hub.constants", "HF_HUB_CACHE", str(paths["HF_HUB_CACHE"])),
        ("huggingface_hub.constants", "HF_HOME", str(home)),
        ("datasets.config", "HF_DATASETS_CACHE", paths["HF_DATASETS_CACHE"]),
        ("datasets.config", "DOWNLOADED_DATASETS_PATH", paths["HF_DATASETS_CACHE"] / "downloads"),
        ("datasets.config", "EXTRACTED_DATASETS_PATH", paths["HF_DATASETS_CACHE"] / "downloads" / "extracted"),
        ("datasets.config", "HF_MODULES_CACHE", home / "modules"),
    ):
        if module in sys.modules:  # read at import; the env covers a later import
            monkeypatch.setattr(sys.modules[module], name, value)
    yield server
    server.reset()


@pytest.fixture
def hub_token():
    return TOKEN


@pytest.fixture
def hub_offline(hub, monkeypatch):
    """HF_HUB_OFFLINE=1 for this test: env (subprocesses) and the constants read at import."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for module in ("huggingface_hub.constants", "datasets.config"):
        if module in sys.modules:
            monkeypatch.setattr(sys.modules[module], "HF_HUB_OFFLINE", True)
    return hub


def cached_repo_folder(cache: str | Path, repo_id: str, repo_type: str = "model") -> Path:
    """The cache folder huggingface_hub uses for a repo (models--org--name)."""
    return Path(cache) / f"{repo_type}s--{repo_id.replace('/', '--')}"
