"""Inputs and outputs of the data tools: named record sets from files or a config, cleaned JSONL out.

A `RecordSet` is one training task or evaluation set: its raw records (as the source yields them,
each with a `_where` label "file:line" that reports use as the record's id), in source order.
Records are written back as they were read (minus `_where`), so a cleaned file keeps its format
(Alpaca, Self-Instruct, chat, any field names) and can replace the original in `data.tasks`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import ml_collections

from jaxtune.data.sources import open_source
from jaxtune.errors import UserError


@dataclasses.dataclass
class RecordSet:
    name: str  # task / eval set name, or the file's stem
    records: list[dict]
    origin: str  # where it was read from (a path, "tfds name[split]")


class KeptSets:
    """Mixin of a cleaning result with `sets` and `kept` (per set name: the indices kept, in order)."""

    def kept_records(self, name: str) -> list[dict]:
        records = next(s.records for s in self.sets if s.name == name)
        return [records[i] for i in self.kept[name]]


def read_all(source) -> list[dict]:
    """Every record of a random-access source, in order (bad records raise, naming file and line)."""
    return [source[i] for i in range(len(source))]


def _kind(path: str) -> str:
    return "json" if path.endswith(".json") else "parquet" if path.endswith(".parquet") else "jsonl"


def read_files(paths: Sequence[str]) -> list[RecordSet]:
    """JSONL files (one JSON object per line; `.json` arrays and `.parquet` by extension). Sets are
    named after the file's stem; two inputs with the same stem are an error (their outputs would clash)."""
    sets = []
    for path in paths:
        name = Path(path).stem
        if any(s.name == name for s in sets):
            raise UserError(f"{path}: two inputs are named {name!r}; their cleaned files would overwrite each other")
        sets.append(RecordSet(name, read_all(open_source(_kind(path), path)), path))
    return sets


def read_tfds(specs: Sequence[str], data_dir: str = "") -> list[RecordSet]:
    """TFDS splits given as "name:split" (default split "test"), read through the data sources (no download)."""
    sets = []
    for spec in specs:
        name, _, split = spec.partition(":")
        if not name:
            raise UserError(f"--eval_tfds {spec!r}: expected NAME[:SPLIT], e.g. glue/mrpc:validation")
        split = split or "test"
        sets.append(RecordSet(f"{name}:{split}", read_all(open_source("tfds", name, split=split, data_dir=data_dir)),
                              f"tfds {name}[{split}]"))
    return sets


def _task_set(name: str, t: ml_collections.ConfigDict, where: str) -> RecordSet:
    source = open_source(t.source, t.path, split=t.split, data_dir=t.data_dir, where=where)
    origin = f"tfds {t.path}[{t.split}]" if t.source == "tfds" else t.path
    return RecordSet(name, read_all(source), origin)


def config_train_sets(config: ml_collections.ConfigDict) -> list[RecordSet]:
    """The training tasks of a config, in config order: data.tasks, else data.train_path."""
    d = config.data
    if d.tasks:
        return [_task_set(name, t, f"data.tasks.{name}") for name, t in d.tasks.items()]
    if not d.builtin and d.train_path:
        return [RecordSet("train", read_all(open_source("jsonl", d.train_path, where="data.train_path")), d.train_path)]
    raise UserError(f"--config: no training data files to read (data.builtin={d.builtin!r} and data.tasks is empty)")


def record_id(record: dict) -> str:
    return str(record.get("_where", "record"))


def clean(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "_where"}


def write_jsonl(path: Path, records: Iterable[dict]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(clean(record), ensure_ascii=False) + "\n")
            count += 1
    return count


def write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
