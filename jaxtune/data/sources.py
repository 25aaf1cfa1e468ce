"""Random-access record sources (Grain `RandomAccessDataSource` protocol: __len__ + __getitem__)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from jaxtune.errors import UserError


class JsonlSource:
    """A JSONL file read lazily by line offset, so a large file never sits in memory.

    Each record must be a JSON object; a malformed line is reported with its file and line number
    the moment it is read. Reads use `os.pread` (no shared file position), so Grain's reader
    threads can fetch records concurrently. Picklable (Grain workers reopen the file).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: no such data file (expected a JSONL file, one JSON object per line)")
        offsets, lengths, line_numbers = [], [], []
        with self.path.open("rb") as f:
            position = 0
            for number, line in enumerate(f, start=1):
                if line.strip():
                    offsets.append(position)
                    lengths.append(len(line))
                    line_numbers.append(number)
                position += len(line)
        if not offsets:
            raise UserError(f"{self.path}: the file holds no records")
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._lengths = np.asarray(lengths, dtype=np.int64)
        self._line_numbers = np.asarray(line_numbers, dtype=np.int64)
        self._fd: int | None = None

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: int) -> dict:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        raw = os.pread(self._fd, int(self._lengths[index]), int(self._offsets[index]))
        where = f"{self.path}:{int(self._line_numbers[index])}"
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise UserError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(record, dict):
            raise UserError(f"{where}: expected a JSON object, found {type(record).__name__}")
        record.setdefault("_where", where)
        return record

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fd"] = None
        return state

    def __repr__(self) -> str:
        return f"JsonlSource({str(self.path)!r}, records={len(self)})"
