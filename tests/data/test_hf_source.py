"""🤗 `datasets` as a source (source='hf'): local dataset folders (save_to_disk output, a folder of
data files with configs), a Hub dataset id (the stand-in Hub, tests/hub_server.py, through the real
`datasets` client), split slicing, and the Grain pipeline reading them exactly as it reads the same
records from JSONL (shuffled, 2 shards, resumed). The datasets cache is the test session's own
temporary one (tests/hub_fixture.py)."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxtune import cli
from jaxtune.batch import BATCH_KEYS
from jaxtune.config import task_config
from jaxtune.data import datasets as datasets_lib
from jaxtune.data.pipeline import build_dataset
from jaxtune.data.sources import open_task_source
from jaxtune.errors import UserError
from tests.data.test_pipeline import CharTokenizer
from tests.helpers import write_config_file

datasets = pytest.importorskip("datasets")

ROWS = [{"prompt": f"question {i}?", "completion": " " + "x" * (1 + i % 5), "source": f"s{i % 3}"} for i in range(40)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    saved = root / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                          "test": datasets.Dataset.from_list(ROWS[:4])}).save_to_disk(str(saved))
    files = root / "files"  # a folder of data files whose README names two configs, as Hub datasets do
    for config in ("short", "long"):
        (files / config).mkdir(parents=True)
        rows = [{**r, "prompt": f"{config}: {r['prompt']}"} for r in ROWS]
        pq.write_table(pa.Table.from_pylist(rows), files / config / "train.parquet")
    (files / "README.md").write_text(
        "---\nconfigs:\n" + "".join(f"- config_name: {c}\n  data_files:\n  - split: train\n    path: {c}/train.parquet\n"
                                    for c in ("short", "long")) + "---\n")
    jsonl = root / "same.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return {"saved": saved, "files": files, "jsonl": jsonl}


def test_save_to_disk_folder_with_split_slicing_reads_rows_from_the_arrow_files(folders):
    source = open_task_source(task_config(source="hf", path=str(folders["saved"]), split="train[:25%]"))
    assert len(source) == 10
    assert {k: v for k, v in source[3].items() if k != "_where"} == ROWS[3]
    assert source[3]["_where"].endswith("(split 'train[:25%]') record 3")
    assert source.dataset.cache_files  # memory-mapped Arrow files, not rows held in Python
    both = open_task_source(task_config(source="hf", path=str(folders["saved"]), split="train[38:]+test[:1]"))
    assert [both[i]["prompt"] for i in range(len(both))] == [ROWS[38]["prompt"], ROWS[39]["prompt"], ROWS[0]["prompt"]]


def test_data_file_folder_with_a_config_and_split_slicing(folders):
    source = open_task_source(task_config(source="hf", path=str(folders["files"]), name="long", split="train[10:20]"))
    assert len(source) == 10
    assert source[0]["prompt"] == "long: " + ROWS[10]["prompt"] and source[0]["source"] == ROWS[10]["source"]
    assert "config 'long'" in source[0]["_where"]
    chosen = open_task_source(task_config(source="hf", path=str(folders["files"]), data_files={"train": "short/train.parquet"},
                                          split="train[-1:]"))
    assert [chosen[i]["prompt"] for i in range(len(chosen))] == ["short: " + ROWS[-1]["prompt"]]


def test_an_eval_task_reads_a_split_of_a_dataset_folder(folders):
    from jaxtune.config import eval_task_config
    from jaxtune.eval_tasks import load_eval_task

    task = load_eval_task("held", eval_task_config(source="hf", path=str(folders["saved"]), split="test"), seed=0)
    assert [(e["prompt"], e["answer"]) for e in task.examples] == [(r["prompt"], r["completion"]) for r in ROWS[:4]]


def test_decontamination_reads_a_dataset_split_as_the_eval_set(folders):
    from jaxtune.config import base_config
    from jaxtune.datatools import screen

    data = base_config().data
    data.source_kind, data.eval_path, data.eval_split = "hf", str(folders["saved"]), "test"
    (held,) = screen.config_eval_sets(data, None)
    assert held.name == "data.eval_path" and [r["prompt"] for r in held.records] == [r["prompt"] for r in ROWS[:4]]


@pytest.mark.parametrize("settings, message", [
    (dict(path="files", name="medium"), r"config 'medium'.*cannot open.*'medium' not found"),
    (dict(path="saved", split="validation"), r"split 'validation'.*Unknown split"),
    (dict(path="saved", split="train[:10%"), r"bad split|Unrecognized"),
    (dict(path="saved", name="short"), "save_to_disk folder, which has no configs"),
    (dict(path="./missing/folder"), "no such folder, and not a Hub dataset id"),
])
def test_bad_dataset_settings_name_the_dataset(folders, settings, message):
    path = settings.pop("path")
    path = str(folders[path]) if path in folders else path
    with pytest.raises(UserError, match=message):
        open_task_source(task_config(source="hf", path=path, **settings))


README = """---
configs:
- config_name: short
  data_files:
  - split: train
    path: short/train.jsonl
- config_name: long
  data_files:
  - split: train
    path: long/train.jsonl
  - split: test
    path: long/test.jsonl
---
"""


def _lines(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_hub_dataset_id_with_a_config_split_slicing_and_a_pinned_revision(hub):
    first = hub.create_repo("org/sft", {"README.md": README, "short/train.jsonl": _lines(ROWS[:4]),
                                        "long/train.jsonl": _lines(ROWS), "long/test.jsonl": _lines(ROWS[:2])},
                            repo_type="dataset")
    source = open_task_source(task_config(source="hf", path="org/sft", name="long", split="train[:25%]+test[1:]"))
    assert [source[i]["prompt"] for i in range(len(source))] == [r["prompt"] for r in ROWS[:10] + ROWS[1:2]]
    assert source[0]["_where"] == "hf dataset 'org/sft' (config 'long', split 'train[:25%]+test[1:]') record 0"
    hub.commit("org/sft", {"long/train.jsonl": _lines(ROWS[:1])}, repo_type="dataset")
    assert len(open_task_source(task_config(source="hf", path="org/sft", name="long"))) == 1
    pinned = open_task_source(task_config(source="hf", path="org/sft", name="long", revision=first))
    assert len(pinned) == len(ROWS)
    with pytest.raises(UserError, match=r"hf dataset 'org/missing' \(split 'train'\): cannot open: DatasetNotFoundError"):
        open_task_source(task_config(source="hf", path="org/missing"))


@pytest.mark.slow  # 7 s: two datasets preparations and an offline lookup
def test_offline_a_hub_dataset_opens_from_the_cache_only(hub, monkeypatch):
    import huggingface_hub

    hub.create_repo("org/lines", {"train.jsonl": _lines(ROWS[:8])}, repo_type="dataset")
    assert len(open_task_source(task_config(source="hf", path="org/lines", split="train[:4]"))) == 4
    for module in (huggingface_hub.constants, datasets.config):  # HF_HUB_OFFLINE=1 (read at import)
        monkeypatch.setattr(module, "HF_HUB_OFFLINE", True)
    assert len(open_task_source(task_config(source="hf", path="org/lines", split="train[:4]"))) == 4
    with pytest.raises(UserError, match=r"hf dataset 'org/other' \(split 'train'\): cannot open"):
        open_task_source(task_config(source="hf", path="org/other"))


def _batches(task, *, process_index, n, state=None):
    spec = datasets_lib.task_spec("t", task)
    ds, _ = build_dataset([spec], CharTokenizer(), seq_len=48, batch_size=2, seed=3, packing=True,
                          process_index=process_index, process_count=2)
    it = iter(ds)
    if state is not None:
        it.set_state(state)
    return [next(it) for _ in range(n)], it


def test_hf_source_batches_equal_jsonl_shuffled_sharded_and_resumed(folders):
    hf = task_config(source="hf", path=str(folders["saved"]), split="train")
    jsonl = task_config(path=str(folders["jsonl"]))
    for process in (0, 1):
        expected, _ = _batches(jsonl, process_index=process, n=6)
        got, _ = _batches(hf, process_index=process, n=6)
        assert all(np.array_equal(a[k], b[k]) for a, b in zip(expected, got) for k in BATCH_KEYS)
        _, it = _batches(hf, process_index=process, n=3)
        resumed, _ = _batches(hf, process_index=process, n=3, state=it.get_state())
        assert all(np.array_equal(a[k], b[k]) for a, b in zip(expected[3:], resumed) for k in BATCH_KEYS)
    first, _ = _batches(hf, process_index=0, n=2)
    second, _ = _batches(hf, process_index=1, n=2)
    assert not np.array_equal(first[0]["inputs"], second[0]["inputs"])  # each process reads its own shard


def test_a_record_that_fits_no_format_is_one_error_line(tmp_path, capsys):
    data = tmp_path / "qa"
    datasets.Dataset.from_list([{"question": "q", "answer": "a"}] * 4).save_to_disk(str(data))
    config = write_config_file(tmp_path / "bad.py", "", f"""
        c.data.source_kind = "hf"
        c.data.train_path = {str(data)!r}
        c.data.templates = (("{{prompt}}", "{{response}}"),)
    """)
    assert cli.main(["train", "--config", str(config), "--workdir", str(tmp_path / "run")]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("jaxtune: error:")]
    assert len(lines) == 1
    assert f"hf dataset {str(data)!r} (split 'train') record 0" in lines[0]
    for shape in ("fields (answer, question) fit none", "'messages'", "'prompt' + 'completion'", "'text'"):
        assert shape in lines[0], shape
