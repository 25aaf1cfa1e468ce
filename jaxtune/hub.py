"""Hugging Face Hub model ids wherever a model directory is accepted: the one place they resolve.

`org/name` or `org/name@revision` (a branch, tag or commit) names a Hub repo; a local path that
exists wins, and anything that looks like a path (`./x`, `/x`, `gs://x`, more than one `/`) stays
one. A repo is downloaded with `huggingface_hub` into its standard cache (HF_HOME / HF_HUB_CACHE;
resumable, with a progress bar; HF_TOKEN or the stored login; HF_HUB_OFFLINE=1 uses the cache),
and only the files jaxtune reads: `MODEL_FILES` / `TOKENIZER_FILES` at the repo's top level, never
`.bin`/`.pth`/`.gguf` weights or subfolders (onnx/, original/, ...).

Multi-host: process 0 resolves the revision to a commit and downloads it; the others wait for
that commit through the coordination service (`distributed.share`) and then fetch exactly that
commit into their own cache (on a shared cache the snapshot is already complete, and nothing is
downloaded twice). No device is touched here, so it runs before any backend starts.

A run pins what it resolved (`resolve(..., commit=...)`): loading.py records the commits in the
workdir and passes them back on resume. Every Hub failure is a UserError naming the repo.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from jaxtune import distributed
from jaxtune.errors import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json")
MODEL_FILES = ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
               *TOKENIZER_FILES)
_ONLY_TOP_LEVEL = ("*/*",)  # fnmatch's * also matches "/": this skips every file in a subfolder
_PYTORCH_WEIGHTS = (".bin", ".pth", ".pt", ".ckpt")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """A downloaded repo revision: the local folder and the commit it holds."""

    ref: str  # as the user wrote it
    repo_id: str
    revision: str  # as requested ("main" when none)
    commit: str
    path: Path


_pins: dict[str, str] = {}  # ref -> the commit this process uses for it (one per ref per run)
_folders: dict[tuple[str, str, str], Path] = {}  # (repo id, commit, what) -> snapshot folder


def is_hub_id(ref: str | os.PathLike | None) -> bool:
    """Whether `ref` names a Hub repo: `org/name[@revision]` that is not an existing local path."""
    if not ref:
        return False
    text = os.fspath(ref)
    if "://" in text or text.startswith(("/", ".", "~")) or Path(text).exists():
        return False
    return _REPO_ID.fullmatch(text.split("@", 1)[0]) is not None


def parse(ref: str) -> tuple[str, str]:
    """`org/name@revision` -> (repo id, revision); no revision: "main"."""
    repo_id, _, revision = ref.partition("@")
    return repo_id, revision or "main"


def local_path(ref: str, what: str = "model", *, commit: str | None = None) -> str:
    """`ref` as a local path: itself when it is not a Hub id, else its downloaded snapshot folder."""
    return str(resolve(ref, what, commit=commit).path) if is_hub_id(ref) else ref


def resolve(ref: str, what: str = "model", *, commit: str | None = None) -> Snapshot:
    """Downloads `ref` (what="model": weights + config + tokenizer; "tokenizer": the tokenizer files)
    at `commit` when given (a run's recorded one), else at the commit this process already pinned
    `ref` to, else at its revision (resolved by process 0 for all: module docstring). The commit
    is then pinned, so every later use of `ref` in this process reads the same files."""
    repo_id, revision = parse(ref)
    if commit is not None and not _COMMIT.fullmatch(commit):
        raise UserError(f"{repo_id}: recorded commit {commit!r} is not a 40-character commit hash")
    commit = commit or _pins.get(ref)
    if commit is None or (repo_id, commit, what) not in _folders:
        first: dict[str, Path] = {}

        def download_first() -> str:
            first["folder"] = _download(repo_id, commit or revision, what)
            return first["folder"].name  # a snapshot folder is named by its commit

        agreed = distributed.share(download_first, f"hub/{repo_id}")
        # The other processes fetch that commit (from a shared cache: nothing to fetch).
        _folders[(repo_id, agreed, what)] = first.get("folder") or _download(repo_id, agreed, what)
        commit = agreed
    _pins[ref] = commit
    return Snapshot(ref, repo_id, revision, commit, _folders[(repo_id, commit, what)])


def _download(repo_id: str, revision: str, what: str) -> Path:
    """The snapshot folder of `repo_id` at `revision` holding the files `what` needs (Hub errors -> UserError)."""
    import huggingface_hub
    from huggingface_hub import constants, errors

    patterns = list(MODEL_FILES if what == "model" else TOKENIZER_FILES)
    offline = constants.HF_HUB_OFFLINE
    try:
        folder = Path(huggingface_hub.snapshot_download(
            repo_id, revision=revision, allow_patterns=patterns, ignore_patterns=list(_ONLY_TOP_LEVEL)))
    except errors.GatedRepoError:
        raise UserError(f"{repo_id} is a gated repo: accept its terms on its Hub page, then log in with "
                        "`hf auth login` or set HF_TOKEN to a token of that account") from None
    except errors.RepositoryNotFoundError:
        raise UserError(f"{repo_id}: no such repo on the Hugging Face Hub ({constants.ENDPOINT}), "
                        "and no such local directory (a private repo needs `hf auth login` or HF_TOKEN)") from None
    except errors.RevisionNotFoundError:
        raise UserError(f"{repo_id}@{revision}: the repo has no branch, tag or commit {revision!r}") from None
    except errors.LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE=1 is set" if offline else "the Hub cannot be reached"
        raise UserError(f"{repo_id}@{revision}: not in the local Hugging Face cache "
                        f"({constants.HF_HUB_CACHE}) and {why}; download it once online") from None
    except errors.HfHubHTTPError as e:
        raise UserError(f"{repo_id}@{revision}: the Hub answered {_first_line(e)}") from None
    if what == "model" and not any(folder.glob("*.safetensors")):  # config and tokenizer only: nothing large
        raise _no_weights(repo_id, revision, offline)
    return folder


def _no_weights(repo_id: str, revision: str, offline: bool) -> UserError:
    """The error for a snapshot without safetensors: a repo with only PyTorch pickles says so."""
    if not offline:
        import huggingface_hub

        info = huggingface_hub.HfApi().model_info(repo_id, revision=revision)
        pickles = [s.rfilename for s in info.siblings or []
                   if "/" not in s.rfilename and s.rfilename.endswith(_PYTORCH_WEIGHTS)]
        if pickles:
            return UserError(f"{repo_id}@{revision}: has only PyTorch .bin/.pth weights ({', '.join(pickles[:3])}), "
                             "no *.safetensors; jaxtune reads safetensors only (convert the weights with "
                             "transformers' save_pretrained(safe_serialization=True), or pick a repo that has them)")
    return UserError(f"{repo_id}@{revision}: no *.safetensors weights at the repo's top level (jaxtune reads "
                     "safetensors only)")


def _first_line(error: Exception) -> str:
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
