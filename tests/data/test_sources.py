"""Sources (JSONL/JSON/Parquet/ArrayRecord/TFDS), field mapping, Alpaca/Self-Instruct/chat formats, bad input."""

import json
import pickle

import numpy as np
import pytest

from jaxtune.data.formats import TaskRecords, map_fields
from jaxtune.data.sources import SourceError, open_source
from jaxtune.errors import UserError

ROWS = [{"sentence1": f"premise {i}", "sentence2": f"hypothesis {i}", "label": i % 3} for i in range(5)]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _fields(source):
    return [{k: v for k, v in source[i].items() if k != "_where"} for i in range(len(source))]


def test_file_sources_read_the_same_records(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from array_record.python import array_record_module

    _write_jsonl(tmp_path / "d.jsonl", ROWS)
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    writer = array_record_module.ArrayRecordWriter(str(tmp_path / "d.array_record"), "group_size:1")
    for r in ROWS:
        writer.write(json.dumps(r).encode())
    writer.close()
    for kind in ("jsonl", "json", "parquet", "array_record"):
        source = open_source(kind, str(tmp_path / f"d.{kind}"))
        assert _fields(source) == ROWS, kind
        assert _fields(pickle.loads(pickle.dumps(source))) == ROWS, kind  # Grain workers unpickle sources
    assert open_source("parquet", str(tmp_path / "d.parquet"))[2]["_where"].endswith("d.parquet: row 2")
    with pytest.raises(UserError, match="unknown source 'csv'"):
        open_source("csv", str(tmp_path / "d.csv"))
    with pytest.raises(UserError, match="no such data file"):
        open_source("parquet", str(tmp_path / "missing.parquet"))


def test_gs_style_paths_go_through_epath(tmp_path, monkeypatch):
    """Remote paths are read through etils.epath (here a local file behind a fake scheme)."""
    from jaxtune.data import sources

    _write_jsonl(tmp_path / "d.jsonl", ROWS)

    class FakeRemote:
        def __init__(self, path):
            self.local = tmp_path / str(path).split("/")[-1]

        def is_file(self):
            return self.local.is_file()

        def read_bytes(self):
            return self.local.read_bytes()

    monkeypatch.setattr(sources, "_epath", FakeRemote)
    source = open_source("jsonl", "gs://bucket/d.jsonl")
    assert _fields(source) == ROWS and source[1]["_where"] == "gs://bucket/d.jsonl:2"


def test_tfds_source_without_tensorflow(tmp_path):
    import sys

    tfds = pytest.importorskip("tensorflow_datasets")

    class TinyNli(tfds.core.GeneratorBasedBuilder):
        __module__ = "tiny_nli_builder"  # tfds resolves a dotted module's code path via importlib_resources
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict(
                {"sentence1": tfds.features.Text(), "sentence2": tfds.features.Text(), "label": np.int64})
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, row in enumerate(ROWS):
                yield i, row

    TinyNli(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    source = open_source("tfds", "tiny_nli", split="train", data_dir=str(tmp_path))
    records = sorted(_fields(source), key=lambda r: r["sentence1"])
    assert records == ROWS  # bytes decoded to str, numpy ints to int
    assert "tensorflow" not in sys.modules
    records = TaskRecords(source, fields={"premise": "sentence1", "hypothesis": "sentence2"})
    assert {records[0]["premise"], records[0]["hypothesis"]} <= {r["sentence1"] for r in ROWS} | {r["sentence2"] for r in ROWS}
    with pytest.raises(UserError, match="tfds dataset 'no_such_set'"):
        open_source("tfds", "no_such_set", data_dir=str(tmp_path))


def test_field_mapping_renames_and_reads_nested():
    record = {"ctx": "c", "answers": {"text": ["first", "second"]}, "_where": "f:1"}
    out = map_fields(record, {"context": "ctx", "answer": "answers.text.0"})
    assert out["context"] == "c" and out["answer"] == "first" and "ctx" not in out
    with pytest.raises(SourceError, match=r"f:1: field mapping names 'question'.*available fields: answers, ctx"):
        map_fields(record, {"q": "question"})


def test_alpaca_and_self_instruct_formats(tmp_path):
    alpaca = _write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Add", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi", "input": "", "output": "hi"},
        {"instruction": "Bad", "output": 7},
    ])
    records = TaskRecords(open_source("jsonl", str(alpaca)), fmt="alpaca")
    assert records[0]["prompt"] == "Add\n\n2 and 3" and records[0]["response"] == "5"
    assert records[1]["prompt"] == "Say hi"
    with pytest.raises(SourceError, match=r"a\.jsonl:3: field 'output' is a int; expected text"):
        records[2]
    si = _write_jsonl(tmp_path / "s.jsonl", [
        {"instruction": "Classify", "instances": [{"input": "x", "output": "A"}, {"input": "y", "output": "B"}]},
        {"instruction": "Broken", "instances": []},
        {"instruction": "Write", "instances": [{"input": "", "output": "text"}]},
    ])
    with pytest.raises(SourceError, match=r"s\.jsonl:2: field 'instances' must be a non-empty list"):
        TaskRecords(open_source("jsonl", str(si)), fmt="self_instruct")
    records = TaskRecords(open_source("jsonl", str(si)), fmt="self_instruct", on_error="skip")
    assert len(records) == 3 and records.skipped_at_open == 1
    assert [records[i]["response"] for i in range(3)] == ["A", "B", "text"]
    assert records[1]["prompt"] == "Classify\n\ny" and records[1]["_where"].endswith("s.jsonl:1 instance 1")


def test_chat_format_checks_messages(tmp_path):
    path = _write_jsonl(tmp_path / "c.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "user", "content": "hi"}]},
        {"messages": [{"role": "robot", "content": "x"}]},
        {"messages": [{"role": "user", "content": ["x"]}]},
    ])
    records = TaskRecords(open_source("jsonl", str(path)), fmt="chat")
    assert records[0]["messages"][1]["content"] == "hello"
    for i, message in [(1, "no assistant message"), (2, "role 'robot'"), (3, r"content must be text")]:
        with pytest.raises(SourceError, match=message):
            records[i]


def test_bad_records_error_or_are_skipped(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"q": "a"}\n{"q": \n{"q": "\xff"}\n')
    strict = TaskRecords(open_source("jsonl", str(path)))
    with pytest.raises(UserError, match=r"d\.jsonl:2: invalid JSON"):
        strict[1]
    with pytest.raises(UserError, match=r"d\.jsonl:3: not valid UTF-8"):
        strict[2]
    lenient = TaskRecords(open_source("jsonl", str(path)), on_error="skip")
    assert lenient[0]["q"] == "a" and "_error" in lenient[1] and "_error" in lenient[2]
