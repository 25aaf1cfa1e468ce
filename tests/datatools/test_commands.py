"""`jaxtune data dedup | decontaminate | filter` end to end through `jaxtune.cli.main`, and their bad inputs."""

import json
import textwrap

import pytest

from jaxtune import cli
from tests.datatools.planted import dedup_set, write_jsonl
from tests.datatools.test_decontaminate import planted


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_dedup_writes_cleaned_files_and_report(tmp_path, capsys):
    records, exact, near = dedup_set()
    a = write_jsonl(tmp_path / "a.jsonl", records)
    b = write_jsonl(tmp_path / "b.jsonl", [records[0], {"instruction": "new", "input": "", "output": "x"}])
    out = tmp_path / "out"
    assert cli.main(["data", "dedup", str(a), str(b), "--out_dir", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("jaxtune: dedup: 52 records in 2 set(s), removed 6 exact and 4 near duplicates, kept 42")
    dropped = set(exact) | set(near)
    assert _lines(out / "a.jsonl") == [r for i, r in enumerate(records) if i + 1 not in dropped]  # as read, no _where
    assert _lines(out / "b.jsonl") == [{"instruction": "new", "input": "", "output": "x"}]
    report = json.loads((out / "dedup_report.json").read_text())
    assert report["sets"]["b"]["removed"] == [{"id": f"{b}:1", "kind": "exact", "duplicate_of": f"{a}:1",
                                               "duplicate_of_set": "a", "jaccard": 1.0}]
    assert report["settings"]["threshold"] == 0.8 and report["outputs"]["a"] == str(out / "a.jsonl")


def _config(tmp_path, train, heldout):
    path = tmp_path / "cfg.py"
    path.write_text(textwrap.dedent(f"""
        from jaxtune import config as config_lib

        def get_config(arg=None):
            c = config_lib.base_config()
            c.data.tasks.alpaca = config_lib.task_config(path={str(train)!r}, format="alpaca")
            c.eval.tasks.heldout = config_lib.eval_task_config(path={str(heldout)!r}, fields={{"prompt": "question",
                "response": "answer"}})
            return c
    """))
    return path


def test_decontaminate_reads_a_configs_tasks_and_eval_sets(tmp_path, capsys):
    train, evals = planted()
    train_path, heldout = write_jsonl(tmp_path / "train.jsonl", train), write_jsonl(tmp_path / "heldout.jsonl", evals)
    extra = write_jsonl(tmp_path / "extra.jsonl", [{"text": train[0]["instruction"]}])
    out = tmp_path / "clean"
    argv = ["data", "decontaminate", "--config", str(_config(tmp_path, train_path, heldout)), "--eval", str(extra),
            "--out_dir", str(out), "--report", str(tmp_path / "r.json")]
    assert cli.main(argv) == 0
    # with --config, data.decontaminate's settings (13-grams, fraction 0 = any shared n-gram, all text) apply
    assert ("4 of 50 training records cover >= 0 of an eval item with 13-grams (all text; 2 eval set(s), 11 examples); "
            "kept 46") in capsys.readouterr().out
    assert len(_lines(out / "alpaca.jsonl")) == 46
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["eval"]["heldout"]["training_records_contaminated"] == 3
    assert report["eval"]["extra"]["eval_ids_matched"] == [f"{extra}:1"]
    # --config overrides apply; --n and --fraction override data.decontaminate
    assert cli.main([*argv, "--config.data.decontaminate.n=12", "--fraction", "0"]) == 0
    assert "5 of 50 training records cover >= 0 of an eval item with 12-grams" in capsys.readouterr().out


def test_filter_and_select_diverse(tmp_path, capsys):
    records = [{"instruction": "say hi", "input": "", "output": "hi"},
               {"instruction": "say nothing", "input": "", "output": " "},
               {"instruction": "repeat", "input": "", "output": "spam\nspam\nspam"},
               {"instruction": "count to three", "input": "", "output": "1 2 3"},
               {"instruction": "say hi please", "input": "", "output": "hi"}]
    path = write_jsonl(tmp_path / "alpaca.jsonl", records)
    out = tmp_path / "f"
    assert cli.main(["data", "filter", str(path), "--out_dir", str(out), "--nonempty", "output",
                     "--max_duplicate_line_fraction", "0.3", "--min_words", "4"]) == 0
    assert "dropped 3 by the filters, kept 2" in capsys.readouterr().out
    assert _lines(out / "alpaca.jsonl") == [records[3], records[4]]
    report = json.loads((out / "filter_report.json").read_text())["sets"]["alpaca"]
    assert [r["reason"].split(":")[0] for r in report["dropped_records"]] == ["words", "nonempty", "duplicate_lines"]
    assert cli.main(["data", "filter", str(path), "--out_dir", str(out), "--select_diverse", "2"]) == 0
    assert "3 not among the 2 most diverse per set, kept 2" in capsys.readouterr().out
    assert len(_lines(out / "alpaca.jsonl")) == 2


BAD = [
    (["dedup", "{tmp}/nope.jsonl"], "nope.jsonl: no such data file"),
    (["dedup", "{bad}"], "bad.jsonl:3: invalid JSON"),
    (["dedup", "{good}", "--fields", "instruction,answer"], "good.jsonl:1: no field 'answer'; available fields: "),
    (["dedup", "{good}", "--threshold", "1.5"], "data dedup: argument --threshold: expected a number in (0, 1], got 1.5"),
    (["dedup", "{good}", "--threshold", "0"], "data dedup: argument --threshold: expected a number in (0, 1], got 0"),
    (["dedup", "{good}", "--workers", "0"], "argument --workers: expected an integer >= 1, got 0"),
    (["dedup", "{tmp}/corrupt.jsonl.gz"], "corrupt.jsonl.gz: cannot be read as gzip JSONL"),
    (["dedup", "{tmp}/corrupt.jsonl.zst"], "corrupt.jsonl.zst: cannot be read as zstd JSONL"),
    (["dedup", "{tmp}/sub"], "sub: a directory, not a data file (expected a JSONL/Parquet file or a 🤗 datasets"),
    (["dedup", "{tmp}/dd"], "dd: a 🤗 DatasetDict folder; name one split's folder"),
    (["dedup", "{tmp}/empty.jsonl"], "empty.jsonl: the file holds no records"),
    (["dedup", "{tmp}/bad.parquet"], "bad.parquet: not a readable Parquet file"),
    (["dedup", "{tmp}/hf"], "data-00000-of-00001.arrow: not a readable Arrow file of a 🤗 datasets folder"),
    (["decontaminate", "{good}", "--eval", "{good}", "--threshold", "2"], "expected a number in [0, 1], got 2"),
    (["decontaminate", "{good}", "--eval", "{good}", "--eval_n", "good"], "--eval_n 'good': expected SET=N"),
    (["decontaminate", "{good}", "--eval", "{good}", "--part", "answers"], "argument --part: invalid choice: 'answers'"),
    (["decontaminate", "{good}", "--eval", "{good}", "--min_words", "-1"], "argument --min_words: expected an integer >= 0"),
    (["decontaminate", "{good}", "--eval", "{sub}/good.jsonl", "--eval_n", "nope=5"],
     "--eval_n names nope, which is not an evaluation set"),
    (["filter", "{good}", "--gopher", "beauty"], "unknown Gopher rule set 'beauty' (known: repetition, quality)"),
    (["filter", "{good}", "--gopher", "quality", "--gopher_threshold", "nope=1"],
     "nope is not a threshold of the Gopher rule sets quality"),
    (["filter", "{good}", "--gopher", "quality", "--gopher_threshold", "min_doc_words=abc"],
     "--gopher_threshold 'min_doc_words=abc': the value is not a number"),
    (["filter", "{good}", "--gopher_threshold", "min_doc_words=5"], "Gopher thresholds given without a Gopher rule set"),
    (["filter", "{good}", "--languages", "en", "--min_language_score", "1.5"], "expected a number in [0, 1], got 1.5"),
    (["dedup", "{good}", "--num_perm", "x"], "argument --num_perm: expected an integer >= 16, got 'x'"),
    (["dedup"], "data dedup: nothing to read; give JSONL files and/or --config"),
    (["dedup", "{good}", "{tmp}/sub/good.jsonl"], "two inputs are named 'good'"),
    (["dedup", "{good}", "--config.seed=1"], "--config.seed=1 given without --config"),
    (["decontaminate", "{good}"], "no evaluation sets to compare against"),
    (["decontaminate", "{good}", "--eval", "{bad}"], "bad.jsonl:3: invalid JSON"),
    (["decontaminate", "{good}", "--eval", "{good}", "--eval_fields", "question"], "good.jsonl:1: no field 'question'"),
    (["decontaminate", "{good}", "--eval_tfds", "no_such_set:test", "--tfds_data_dir", "{tmp}"],
     "tfds dataset 'no_such_set' split 'test'"),
    (["filter", "{good}"], "data filter: no filter given"),
    (["filter", "{good}", "--regex", "output"], "--regex 'output': expected FIELD=PATTERN"),
    (["filter", "{good}", "--regex", "output=("], "regex for field 'output' does not compile"),
    (["filter", "{good}", "--min_words", "5", "--max_words", "2"], "min_words=5 is above max_words=2"),
]


@pytest.mark.parametrize("argv, expected", BAD, ids=[f"{a[0]}-{i}" for i, (a, _) in enumerate(BAD)])
def test_bad_inputs_end_in_one_error_line(tmp_path, capsys, argv, expected):
    good = write_jsonl(tmp_path / "good.jsonl", [{"instruction": "a", "input": "", "output": "b"}] * 2)
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "good.jsonl", [{"x": "y"}])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": "x"}\n{"a": "y"}\n{"a": \n')
    (tmp_path / "corrupt.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00 not gzip at all")
    (tmp_path / "corrupt.jsonl.zst").write_bytes(b"not zstd at all")
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "bad.parquet").write_text("not parquet")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "state.json").write_text('{"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}')
    (tmp_path / "hf" / "data-00000-of-00001.arrow").write_text("not arrow")
    (tmp_path / "dd").mkdir()
    (tmp_path / "dd" / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    names = {"tmp": tmp_path, "good": good, "bad": bad, "sub": tmp_path / "sub"}
    try:
        status = cli.main(["data", *[a.format(**names) for a in argv], "--out_dir", str(tmp_path / "out")])
    except SystemExit as e:  # argparse's usage errors
        status = e.code
    err = capsys.readouterr().err
    assert status == 2
    error_lines = [line for line in err.splitlines() if line.startswith("jaxtune: error: ")]
    assert len(error_lines) == 1 and expected in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing written on a user error


def test_decontaminate_against_a_prepared_tfds_split(tmp_path, capsys):
    tfds = pytest.importorskip("tensorflow_datasets")
    import numpy as np

    train, evals = planted()

    class TinyHeldout(tfds.core.GeneratorBasedBuilder):
        __module__ = "tiny_heldout_builder"  # tfds resolves a dotted module's code path via importlib_resources
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"question": tfds.features.Text(), "answer": tfds.features.Text(), "label": np.int64}))

        def _split_generators(self, dl_manager):
            return {"test": self._generate_examples()}

        def _generate_examples(self):
            for i, e in enumerate(evals):
                yield i, {**e, "label": i}

    TinyHeldout(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()
    path = write_jsonl(tmp_path / "train.jsonl", train)
    assert cli.main(["data", "decontaminate", str(path), "--eval_tfds", "tiny_heldout", "--tfds_data_dir",
                     str(tmp_path / "tfds"), "--out_dir", str(tmp_path / "out"), "--n", "13", "--threshold", "0",
                     "--part", "all"]) == 0
    assert "3 of 50 training records cover >= 0 of an eval item with 13-grams (all text; 1 eval set(s), 10 examples)" \
        in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "decontaminate_report.json").read_text())
    assert report["eval"]["tiny_heldout:test"]["training_records_contaminated"] == 3


def test_compressed_parquet_and_hf_folder_inputs_give_the_same_result(tmp_path, capsys):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    records, exact, near = dedup_set()
    text = "".join(json.dumps(r) + "\n" for r in records).encode()
    (tmp_path / "gz.jsonl.gz").write_bytes(gzip.compress(text))
    (tmp_path / "zst.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(text))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "pq.parquet")
    inputs = [tmp_path / "gz.jsonl.gz", tmp_path / "zst.jsonl.zst", tmp_path / "pq.parquet"]
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "hf"))
    inputs.append(tmp_path / "hf")
    expected = [r for i, r in enumerate(records) if i + 1 not in set(exact) | set(near)]
    for path in inputs:
        out = tmp_path / f"out_{path.name}"
        assert cli.main(["data", "dedup", str(path), "--out_dir", str(out), "--clusters"]) == 0
        assert "removed 5 exact and 4 near duplicates, kept 41" in capsys.readouterr().out
        name = path.name.split(".")[0]
        assert _lines(out / f"{name}.jsonl") == expected
        clusters = _lines(out / "dedup_clusters.jsonl")
        assert sum(len(c["duplicates"]) for c in clusters) == 9


def test_an_output_over_an_input_is_refused(tmp_path, capsys):
    records, _, _ = dedup_set()
    path = write_jsonl(tmp_path / "train.jsonl", records)
    before = path.read_text()
    for argv in (["dedup", str(path), "--out_dir", str(tmp_path)],
                 ["dedup", str(path), "--out_dir", str(tmp_path / "x"), "--report", str(path)],
                 ["filter", str(path), "--out_dir", str(tmp_path / "." / ""), "--min_words", "1"]):
        assert cli.main(["data", *argv]) == 2
        err = capsys.readouterr().err
        assert "jaxtune: error: " in err and f"would overwrite the input {path}" in err, err
    assert path.read_text() == before


def test_filter_gopher_rules_and_language_report_per_filter_counts(tmp_path, capsys):
    prose = ("The committee met on Tuesday to review the budget and to discuss the plans that have been proposed "
             "for the new library with the residents of the town.")
    records = [{"instruction": "Summarise the meeting.", "input": "", "output": prose, "id": "good"},
               {"instruction": "Repeat.", "input": "", "output": "buy now\n" * 12, "id": "spam"},
               {"instruction": "Résume la réunion.", "input": "", "output": "Le comité s'est réuni mardi pour examiner "
                "le budget et discuter des projets proposés pour la nouvelle bibliothèque.", "id": "french"},
               {"instruction": "List.", "input": "", "output": "# # # # # # # # # # # # # # # #", "id": "hashes"}]
    path = write_jsonl(tmp_path / "mixed.jsonl", records)
    out = tmp_path / "f"
    assert cli.main(["data", "filter", str(path), "--out_dir", str(out), "--gopher", "repetition",
                     "--gopher_threshold", "dup_line_frac=0.3", "--languages", "en"]) == 0
    assert "dropped 3 by the filters, kept 1" in capsys.readouterr().out
    assert [r["id"] for r in _lines(out / "mixed.jsonl")] == ["good"]
    report = json.loads((out / "filter_report.json").read_text())
    sets = report["sets"]["mixed"]
    assert sets["dropped_by_filter"] == {"gopher_repetition.dup_line_frac": 1, "language": 1,
                                         "gopher_repetition.top_2_gram": 1}, sets["dropped_by_filter"]
    assert sets["fields_compared"] == {"instruction,input,output": 4}
    assert report["filters"]["gopher_overrides"] == [["dup_line_frac", 0.3]]
