"""`eval.harness` during training: lm-evaluation-harness tasks scored with the run's other evaluations."""

import json

import pytest

from jaxtune import trainer
from jaxtune.metrics import read_metrics
from tests import helpers

pytest.importorskip("lm_eval")


def write_reverse_task(directory):
    """A local lm-eval multiple-choice task on the tiny runs' reverse-the-words data (no download)."""
    directory.mkdir(parents=True, exist_ok=True)
    docs = directory / "docs.jsonl"
    docs.write_text("".join(json.dumps({"q": f"reverse: {a} {b} =", "choices": [f" {b} {a}", f" {a} {b}"], "label": 0})
                            + "\n" for a, b in [("cat", "dog"), ("sun", "moon"), ("red", "blue")]))
    (directory / "rev_mc.yaml").write_text(
        f"task: rev_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {docs}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_target: label\ndoc_to_choice: choices\n"
        "target_delimiter: ''\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return directory


def test_harness_tasks_are_evaluated_during_training(tmp_path):
    tasks = write_reverse_task(tmp_path / "tasks")
    c = helpers.tiny_config(tmp_path, **{"train.steps": 2, "train.checkpoint_every": 2, "train.eval_every": 2,
                                         "eval.harness": "rev_mc", "eval.harness_include": str(tasks),
                                         "eval.batch_size": 4, "eval.show_examples": 0})
    trainer.train(c, tmp_path / "run")
    rows = [r for r in read_metrics(tmp_path / "run") if "eval/harness/rev_mc/acc" in r]
    assert rows and rows[-1]["step"] == 2
    assert all(0.0 <= r["eval/harness/rev_mc/acc"] <= 1.0 and "eval/harness/rev_mc/acc_norm" in r for r in rows)
