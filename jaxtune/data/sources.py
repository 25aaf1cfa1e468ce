"""Random-access record sources (Grain `RandomAccessDataSource` protocol: __len__ + __getitem__).

Every source yields plain dicts of Python values (str, int, float, bool, lists, dicts) plus a
`_where` label ("file:line", "file:row 7", ...) that errors and skip counts use. Paths may be local
or any `etils.epath` location such as `gs://bucket/file.jsonl`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from jaxtune.errors import UserError

# Where a task's records come from (a task's `source` key): the one list of source kinds.
SOURCE_KINDS = ("jsonl", "json", "parquet", "array_record", "tfds", "hf")


class SourceError(UserError):
    """A record that cannot be read or does not have the expected shape (subject to `on_error`)."""


def _is_remote(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def _epath(path: str | os.PathLike):
    from etils import epath

    return epath.Path(path)


def _exists(path: str | os.PathLike) -> bool:
    return _epath(path).is_file() if _is_remote(path) else Path(path).is_file()


def decode_json(raw: bytes, where: str, *, error: type[Exception] | None = None, whole_file: bool = False):
    """JSON from UTF-8 bytes; errors name `where` and the position (line too for a whole file)."""
    error = error or SourceError
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise error(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        position = f"line {e.lineno}, column {e.colno}" if whole_file else f"column {e.colno}"
        raise error(f"{where}: invalid JSON: {e.msg} ({position})") from None


def parse_json_record(raw: bytes, where: str) -> dict:
    """One JSON object from bytes, with errors naming `where` (file:line or record)."""
    record = decode_json(raw, where)
    if not isinstance(record, dict):
        raise SourceError(f"{where}: expected a JSON object, found {type(record).__name__}")
    record.setdefault("_where", where)
    return record


class JsonlSource:
    """A JSONL file read lazily by line offset, so a large file never sits in memory.

    Each record must be a JSON object; a malformed line is reported with its file and line number
    the moment it is read. Reads use `os.pread` (no shared file position), so Grain's reader
    threads can fetch records concurrently. Picklable (Grain workers reopen the file).
    """

    def __init__(self, path: str | Path):
        self.path = str(path) if _is_remote(path) else Path(path)
        if not _exists(self.path):
            what = "a directory, not a data file" if Path(str(self.path)).is_dir() else "no such data file"
            raise UserError(f"{self.path}: {what} (expected a JSONL file, one JSON object per line)")
        # Remote files (gs://...) are read once into memory; local ones by offset.
        self._data: bytes | None = _epath(self.path).read_bytes() if _is_remote(self.path) else None
        offsets, lengths, line_numbers = [], [], []
        lines = self._data.splitlines(keepends=True) if self._data is not None else self.path.open("rb")
        position = 0
        for number, line in enumerate(lines, start=1):
            if line.strip():
                offsets.append(position)
                lengths.append(len(line))
                line_numbers.append(number)
            position += len(line)
        if self._data is None:
            lines.close()
        if not offsets:
            raise UserError(f"{self.path}: the file holds no records")
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._lengths = np.asarray(lengths, dtype=np.int64)
        self._line_numbers = np.asarray(line_numbers, dtype=np.int64)
        self._fd: int | None = None

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: int) -> dict:
        start, length = int(self._offsets[index]), int(self._lengths[index])
        if self._data is not None:
            raw = self._data[start : start + length]
        else:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY)
            raw = os.pread(self._fd, length, start)
        return parse_json_record(raw, f"{self.path}:{int(self._line_numbers[index])}")

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fd"] = None
        return state

    def __repr__(self) -> str:
        return f"JsonlSource({str(self.path)!r}, records={len(self)})"


class JsonSource:
    """A JSON file holding one array of objects (or {"data": [...]}, the SQuAD/HF export shape)."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        if not _exists(path):
            raise UserError(f"{path}: no such data file (expected a JSON array of objects)")
        raw = _epath(path).read_bytes()
        data = decode_json(raw, str(path), error=UserError, whole_file=True)
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list) or not data:
            raise UserError(f"{path}: expected a non-empty JSON array of objects, found {type(data).__name__}")
        self._records = data

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        record = self._records[index]
        where = f"{self.path}: record {index}"
        if not isinstance(record, dict):
            raise SourceError(f"{where}: expected a JSON object, found {type(record).__name__}")
        return {**record, "_where": where}


def plain(value: Any) -> Any:
    """Numpy/bytes values (Parquet, TFDS) as plain Python: text as str, arrays as lists."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return [plain(v) for v in value.tolist()] if value.dtype.kind in "OSU" else value.tolist()
    if isinstance(value, np.generic):
        return plain(value.item())
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def _plain_record(record: dict, where: str) -> dict:
    try:
        out = {k: plain(v) for k, v in record.items()}
    except UnicodeDecodeError as e:
        raise SourceError(f"{where}: a text field is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    out["_where"] = where
    return out


class ParquetSource:
    """A Parquet file; rows are read column-wise on demand."""

    def __init__(self, path: str | Path):
        import pyarrow.parquet as pq

        self.path = str(path)
        if not _exists(path):
            raise UserError(f"{path}: no such data file (expected a Parquet file)")
        try:
            with _epath(path).open("rb") as f:
                self._table = pq.read_table(f)
        except Exception as e:  # pyarrow raises ArrowInvalid and friends
            raise UserError(f"{path}: not a readable Parquet file: {e}") from None
        if self._table.num_rows == 0:
            raise UserError(f"{path}: the file holds no records")

    def __len__(self) -> int:
        return self._table.num_rows

    def __getitem__(self, index: int) -> dict:
        row = self._table.slice(int(index), 1).to_pylist()[0]
        return _plain_record(row, f"{self.path}: row {index}")


def _expand_glob(path: str) -> list[str]:
    if not any(c in path for c in "*?["):
        return [path]
    pattern = _epath(path)
    return sorted(str(p) for p in pattern.parent.glob(pattern.name))


class ArrayRecordSource:
    """ArrayRecord files whose records are UTF-8 JSON objects (one example each)."""

    def __init__(self, path: str | Path):
        import grain

        paths = _expand_glob(str(path))
        if not paths or not all(_exists(p) for p in paths):
            raise UserError(f"{path}: no such ArrayRecord file")
        self.path = str(path)
        self._source = grain.sources.ArrayRecordDataSource(paths)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        return parse_json_record(self._source[index], f"{self.path}: record {index}")


class TfdsSource:
    """A TensorFlow Datasets split through `tfds.data_source` (ArrayRecord; no TensorFlow needed)."""

    def __init__(self, name: str, *, split: str, data_dir: str = ""):
        import tensorflow_datasets as tfds

        self.name, self.split = name, split
        try:
            self._source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
        except Exception as e:  # tfds raises many types for unknown names, splits and formats
            raise UserError(
                f"tfds dataset {name!r} split {split!r} (data_dir={data_dir or 'default'}): cannot open: {e}"
            ) from None

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        return _plain_record(self._source[index], f"tfds {self.name}[{self.split}] record {index}")


def open_source(kind: str, path: str, *, split: str = "train", data_dir: str = "", where: str = "", name: str = "",
                revision: str = "", data_files: Any = None) -> Any:
    """The source of one task: `kind` is one of SOURCE_KINDS; for tfds `path` is the dataset name, for
    hf a Hub dataset id or a local dataset folder (`name` its config, `split` with slicing, `revision`,
    `data_files`: data/hf_source.py)."""
    label = f"{where}: " if where else ""
    if not path:
        raise UserError(f"{label}no path given for a {kind!r} source")
    if kind == "jsonl":
        return JsonlSource(path)
    if kind == "json":
        return JsonSource(path)
    if kind == "parquet":
        return ParquetSource(path)
    if kind == "array_record":
        return ArrayRecordSource(path)
    if kind == "tfds":
        return TfdsSource(path, split=split, data_dir=data_dir)
    if kind == "hf":
        from jaxtune.data.hf_source import HfSource

        return HfSource(path, name=name, split=split, revision=revision, data_files=data_files)
    raise UserError(f"{label}unknown source {kind!r}; expected one of {', '.join(SOURCE_KINDS)}")


def open_task_source(task: Any, where: str = "") -> Any:
    """The source a task's settings (a `task_config`) name: source kind, path, split and the kind's own keys."""
    return open_source(task.source, task.path, split=task.split, data_dir=task.data_dir, where=where,
                       name=task.get("name", ""), revision=task.get("revision", ""),
                       data_files=task.get("data_files", None))
