"""Paths users give: workdirs, data files, tokenizers, Hugging Face dirs, template and chat-template files.

Each is an `etils.epath.Path`, so `gs://bucket/...` (and s3://, ...) works wherever a local path does:
reads and writes go through fsspec (`gcsfs` for gs://, the `gcs` extra). Orbax checkpoints reach
gs:// through tensorstore, TensorBoard events through tensorboardX (google-cloud-storage).
Config files (`--config x.py`) are Python modules and stay local.
"""

from __future__ import annotations

import os

from etils import epath


def path(p: str | os.PathLike) -> epath.Path:
    """`p` as an epath.Path (a local path or a URI such as gs://bucket/dir)."""
    return epath.Path(p)


def is_remote(p: str | os.PathLike) -> bool:
    return "://" in os.fspath(p)


def absolute(p: str | os.PathLike) -> epath.Path:
    """A local path made absolute (relative to the current directory); a URI unchanged.

    (`epath.Path("gs://b/x").absolute()` would glue the current directory in front of the URI.)
    """
    return path(p) if is_remote(p) else path(p).absolute()
