"""The pre-training data screen: data.decontaminate and data.tasks.<t>.filters applied where sources open."""

import json

import ml_collections
import pytest

from jaxtune import config as config_lib
from jaxtune import loading, validation
from jaxtune.data import datasets
from jaxtune.datatools.screen import Screen
from jaxtune.errors import UserError
from tests.datatools.planted import write_jsonl
from tests.datatools.test_decontaminate import planted
from tests.helpers import tiny_base_config, with_eval_tasks, write_sft_jsonl


def _config(tmp_path, **overrides):
    train, evals = planted()
    train[0]["output"] = ""  # dropped by the filters below
    train[1]["output"] = "   "
    c = tiny_base_config("")
    c.data.tokenizer_vocab_size = 512
    c.data.tasks.alpaca = config_lib.task_config(
        path=str(write_jsonl(tmp_path / "train.jsonl", train)), format="alpaca",
        templates=(("{instruction} =", " {output}"),), filters={"nonempty": ("output",)})
    c.data.decontaminate.enabled = True
    c.eval.tasks.heldout = config_lib.eval_task_config(
        path=str(write_jsonl(tmp_path / "heldout.jsonl", evals)), fields={"prompt": "question", "response": "answer"})
    c.lock()
    for key, value in overrides.items():
        config_lib.set_value(c, key, str(value))
    validation.validate(c)
    return c


def _screen(c):
    """The screen a run builds from its config (objectives.base.data_screen) and hands to the data layer."""
    return Screen.from_config(c.data, c.eval)


def test_training_tasks_lose_filtered_and_contaminated_records_before_the_pipeline(tmp_path, capsys):
    c = _config(tmp_path)
    data = datasets.load_sft_data(loading.data_settings(c), tmp_path / "run", seed=0, screen=_screen(c))
    records = data.tasks[0].records
    kept = [records[i]["_where"].rsplit(":", 1)[1] for i in range(len(records))]
    assert len(records) == 45 and data.mixture.sizes == (45,)  # 50 - 2 filtered - 3 contaminated
    assert not {"1", "2", "5", "18", "31"} & set(kept) and kept == sorted(kept, key=int)  # source order kept
    out = capsys.readouterr().out
    assert "jaxtune: filters: task 'alpaca': dropped 2 of 50 records" in out
    assert "jaxtune: decontamination: task 'alpaca': dropped 3 of 50 records sharing a 13-gram with an eval set " \
           "(heldout: 3)" in out
    report = json.loads((tmp_path / "run" / "data_screen.json").read_text())
    assert report["decontamination"]["alpaca"]["contaminated"] == 3
    assert [e["id"].rsplit(":", 1)[1] for e in report["decontamination"]["alpaca"]["examples"]] == ["5", "18", "31"]
    assert [e["reason"] for e in report["filters"]["alpaca"]["records_dropped"]] == ["nonempty: field 'output' is blank"] * 2
    # The same config gives the same subset (resume, other processes); without the screen, all 50.
    again = datasets.load_sft_data(loading.data_settings(c), tmp_path / "run", seed=0, screen=_screen(c)).tasks[0].records
    assert [again[i] for i in range(len(again))] == [records[i] for i in range(len(records))]
    off = _config(tmp_path, **{"data.decontaminate.enabled": False, "data.tasks.alpaca.filters": {},
                               "data.tasks.alpaca.on_error": "skip"})  # the empty outputs are skipped later
    assert len(datasets.load_sft_data(loading.data_settings(off), tmp_path / "off", seed=0, screen=_screen(off)).tasks[0].records) == 50
    assert not (tmp_path / "off" / "data_screen.json").exists()


@pytest.mark.slow  # ~30 s on 2 CPU cores (compiles a tiny model); the test above is the fast representative
def test_a_tiny_run_is_screened_and_logs_it(tmp_path, capsys):
    from jaxtune import trainer

    c = with_eval_tasks(tiny_base_config(write_sft_jsonl(tmp_path / "train.jsonl", n=32)), tmp_path)
    c.data.decontaminate.enabled = True
    c.data.decontaminate.n = 2  # "reverse: red ..." shares "reverse red" with a held-out question
    c.train.steps = 2
    c.eval.generative = False
    c.lock()
    validation.validate(c)
    trainer.train(c, tmp_path / "run")
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "run" / "data_screen.json").read_text())["decontamination"]["default"]
    assert 0 < report["contaminated"] < 32
    assert f"dropped {report['contaminated']} of 32 records sharing a 2-gram with an eval set" in out


@pytest.mark.parametrize("key, value, message", [
    ("data.decontaminate.fraction", 2.0, "fraction must be in [0, 1]"),
    ("data.decontaminate.n", 0, "n (words per n-gram) must be an integer >= 1"),
    ("data.decontaminate.eval_files", ("",), "data.decontaminate.eval_files' must be a tuple of non-empty strings"),
    ("data.tasks.alpaca.filters", {"min_word": 3}, "'data.tasks.alpaca.filters.min_word' is not a filter; did you mean"),
    ("eval.tasks.heldout.filters", {"min_words": 3}, "filters apply to training tasks"),
])
def test_config_errors_name_the_key(tmp_path, key, value, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        _config(tmp_path, **{key: value})


def test_no_eval_sets_and_generated_sources_are_errors(tmp_path):
    c = _config(tmp_path)
    c.unlock()
    c.eval.tasks = ml_collections.ConfigDict()
    with pytest.raises(UserError, match="data.decontaminate.enabled' is True but the config has no evaluation sets"):
        datasets.load_sft_data(loading.data_settings(c), tmp_path / "run", seed=0, screen=_screen(c))
    q = config_lib.base_config()
    q.data.builtin = "quickstart"
    q.data.decontaminate.enabled = True
    with pytest.raises(UserError, match="generates its own records"):
        validation.validate(q)
    q.data.builtin = ""
    q.objective.type = "grpo"
    with pytest.raises(UserError, match="a GRPO run reads its prompts itself"):
        validation.validate(q)


def test_preference_pairs_are_screened_too(tmp_path, capsys):
    _, evals = planted()
    pairs = [{"prompt": f"question {i} please answer", "chosen": "yes indeed", "rejected": "no"} for i in range(12)]
    pairs[3]["prompt"] = evals[0]["question"]  # a held-out question as a training prompt
    c = tiny_base_config(str(write_jsonl(tmp_path / "pairs.jsonl", pairs)))
    c.objective.type = "dpo"
    c.data.tokenizer_vocab_size = 512
    c.data.templates = (("{prompt}", "{response}"),)
    c.data.decontaminate.enabled = True
    c.data.decontaminate.eval_files = (str(write_jsonl(tmp_path / "heldout.jsonl", evals)),)
    c.lock()
    validation.validate(c)
    data = datasets.load_preference_data(loading.data_settings(c), tmp_path / "run", unpaired=False, eval_cfg=c.eval,
                                         screen=_screen(c))
    assert len(data.tasks[0].records) == 11 and data.mixture.sizes == (11,)
    assert "dropped 1 of 12 records sharing a 13-gram with an eval set (file:heldout: 1)" in capsys.readouterr().out
