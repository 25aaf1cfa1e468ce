"""Inputs and outputs of the data tools: named record sets from files or a config, cleaned JSONL out.

A `RecordSet` is one training task or evaluation set: its raw records (as the source yields them,
each with a `_where` label "file:line" that reports use as the record's id), in source order.
Records are written back as they were read (minus `_where`), so a cleaned file keeps its format
(Alpaca, Self-Instruct, chat, any field names) and can replace the original in `data.tasks`.
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import ml_collections

from jaxtune.data.sources import _plain_record, open_source, open_task_source, parse_json_record
from jaxtune.errors import UserError


@dataclasses.dataclass
class RecordSet:
    name: str  # task / eval set name, or the file's stem
    records: Iterable[dict]  # a list, or a re-iterable stream (FileRecords, SourceRecords) read in order
    origin: str  # where it was read from (a path, "tfds name[split]")
    paths: tuple[str, ...] = ()  # local files it was read from (an output must never overwrite them)


class KeptSets:
    """Mixin of a cleaning result with `sets` and `kept` (per set name: the indices kept, in order)."""

    def kept_records(self, name: str) -> Iterator[dict]:
        """The kept records of a set, streamed from its source in order."""
        records = next(s.records for s in self.sets if s.name == name)
        wanted = iter(self.kept[name])
        target = next(wanted, None)
        for i, record in enumerate(records):
            if target is None:
                return
            if i == target:
                yield record
                target = next(wanted, None)


@dataclasses.dataclass
class Selection(KeptSets):
    """Records chosen from each set by index (a filter's survivors)."""

    sets: list[RecordSet]
    kept: dict[str, list[int]]


class SourceRecords:
    """A random-access data source (jaxtune.data.sources) iterated in order, one record at a time."""

    def __init__(self, source):
        self.source = source

    def __iter__(self) -> Iterator[dict]:
        return (self.source[i] for i in range(len(self.source)))

    def __len__(self) -> int:
        return len(self.source)


COMPRESSED = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}


def _open_text_bytes(path: Path):
    """A binary stream of the file, decompressed by its extension (.gz, .zst/.zstd)."""
    kind = COMPRESSED.get(path.suffix)
    if kind == "gzip":
        import gzip

        return gzip.open(path, "rb")
    if kind == "zstd":
        import io

        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(path.open("rb"), closefd=True))
    return path.open("rb")


def _jsonl_records(path: Path) -> Iterator[dict]:
    try:
        with _open_text_bytes(path) as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    yield parse_json_record(line, f"{path}:{number}")
    except UserError:
        raise
    except Exception as e:  # OSError/EOFError of a corrupt .gz, ZstdError of a corrupt .zst
        if isinstance(e, (OSError, EOFError, zlib.error)) or type(e).__name__ == "ZstdError":
            raise UserError(f"{path}: cannot be read as {COMPRESSED.get(path.suffix, 'plain')} JSONL: {e}") from None
        raise


def _parquet_records(path: Path) -> Iterator[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        row = 0
        for batch in batches:
            for record in batch.to_pylist():
                yield _plain_record(record, f"{path}: row {row}")
                row += 1
    except (OSError, pa.ArrowException) as e:
        raise UserError(f"{path}: not a readable Parquet file: {e}") from None


def _arrow_files(folder: Path) -> list[Path]:
    """The Arrow files of a 🤗 `datasets` folder written by `save_to_disk` (state.json lists them)."""
    if (folder / "dataset_dict.json").exists():
        splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
        raise UserError(f"{folder}: a 🤗 DatasetDict folder; name one split's folder, e.g. "
                        f"{folder / (splits[0] if splits else 'train')} (splits: {', '.join(splits) or 'none'})")
    state = folder / "state.json"
    if not state.exists():
        raise UserError(f"{folder}: a directory, not a data file (expected a JSONL/Parquet file or a 🤗 datasets "
                        "folder written by save_to_disk, with state.json)")
    return [folder / f["filename"] for f in json.loads(state.read_text()).get("_data_files", [])]


def _arrow_records(folder: Path) -> Iterator[dict]:
    import pyarrow as pa

    row = 0
    for path in _arrow_files(folder):
        try:
            with pa.memory_map(str(path)) as source:
                for batch in pa.ipc.open_stream(source):  # save_to_disk writes the Arrow streaming format
                    for record in batch.to_pylist():
                        yield _plain_record(record, f"{folder}[{row}]")
                        row += 1
        except (OSError, pa.ArrowException) as e:
            raise UserError(f"{path}: not a readable Arrow file of a 🤗 datasets folder: {e}") from None


def _json_records(path: Path) -> Iterator[dict]:
    source = open_source("json", str(path))
    return (source[i] for i in range(len(source)))


def file_kind(path: Path) -> str:
    """jsonl (also .gz/.zst compressed), json (one array), parquet, or hf (a 🤗 datasets folder)."""
    if path.is_dir():
        return "hf"
    name = path.name
    for suffix in COMPRESSED:
        name = name.removesuffix(suffix)
    return "json" if name.endswith(".json") else "parquet" if name.endswith(".parquet") else "jsonl"


class FileRecords:
    """The records of a local file or 🤗 datasets folder, streamed in order each time it is iterated,
    so a large input never sits in memory (a file with no records is an error)."""

    def __init__(self, path: str):
        self.path = Path(path)
        if not self.path.exists():
            raise UserError(f"{path}: no such data file")
        self.kind = file_kind(self.path)
        if self.kind == "hf":
            _arrow_files(self.path)  # checks the folder now, not when first read

    def __iter__(self) -> Iterator[dict]:
        reader = {"jsonl": _jsonl_records, "json": _json_records, "parquet": _parquet_records,
                  "hf": _arrow_records}[self.kind]
        count = 0
        for record in reader(self.path):
            count += 1
            yield record
        if not count:
            raise UserError(f"{self.path}: the file holds no records")


def set_name(path: str) -> str:
    """A file's name without its data extensions (train.jsonl.gz -> train)."""
    name = Path(path).name
    for suffix in (*COMPRESSED, ".jsonl", ".json", ".parquet"):
        name = name.removesuffix(suffix)
    return name or Path(path).name


def read_files(paths: Sequence[str]) -> list[RecordSet]:
    """JSONL files (one JSON object per line; .gz/.zst compressed too), `.json` arrays, `.parquet`, and
    🤗 datasets folders, streamed. Sets are named after the file's name without extensions; two inputs
    with the same name are an error (their outputs would clash)."""
    sets = []
    for path in paths:
        name = set_name(path)
        if any(s.name == name for s in sets):
            raise UserError(f"{path}: two inputs are named {name!r}; their cleaned files would overwrite each other")
        sets.append(RecordSet(name, FileRecords(path), path, (path,)))
    return sets


def read_tfds(specs: Sequence[str], data_dir: str = "") -> list[RecordSet]:
    """TFDS splits given as "name:split" (default split "test"), read through the data sources (no download)."""
    sets = []
    for spec in specs:
        name, _, split = spec.partition(":")
        if not name:
            raise UserError(f"--eval_tfds {spec!r}: expected NAME[:SPLIT], e.g. glue/mrpc:validation")
        split = split or "test"
        sets.append(RecordSet(f"{name}:{split}", SourceRecords(open_source("tfds", name, split=split, data_dir=data_dir)),
                              f"tfds {name}[{split}]"))
    return sets


def _task_set(name: str, t: ml_collections.ConfigDict, where: str) -> RecordSet:
    source = open_task_source(t, where)
    origin = f"tfds {t.path}[{t.split}]" if t.source == "tfds" else t.path
    return RecordSet(name, SourceRecords(source), origin, () if t.source == "tfds" else (t.path,))


def config_train_sets(config: ml_collections.ConfigDict) -> list[RecordSet]:
    """The training tasks of a config, in config order: data.tasks, else data.train_path."""
    d = config.data
    if d.tasks:
        return [_task_set(name, t, f"data.tasks.{name}") for name, t in d.tasks.items()]
    if not d.builtin and d.train_path:
        return [RecordSet("train", SourceRecords(open_source(
            d.source_kind, d.train_path, split=d.split, name=d.name, revision=d.revision, where="data.train_path")),
                          d.train_path, (d.train_path,))]
    raise UserError(f"--config: no training data files to read (data.builtin={d.builtin!r} and data.tasks is empty)")


def record_id(record: dict) -> str:
    return str(record.get("_where", "record"))


def clean(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "_where"}


def refuse_overwrite(outputs: Iterable[Path], sets: Iterable[RecordSet]) -> None:
    """An output that is one of the inputs (same file, through any path) would destroy it: refused."""
    inputs = {}
    for s in sets:
        for p in s.paths:
            if Path(p).exists():
                inputs[Path(p).resolve()] = p
    for out in outputs:
        target = Path(out).resolve()
        if target in inputs:
            raise UserError(f"{out}: this output would overwrite the input {inputs[target]}; choose another --out_dir")


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
