"""Whole runs of the preference pipeline: packed pairs (padding-free DPO) and held-out pair evaluation."""

import math

import pytest

import json

from jaxtune import cli
from jaxtune import config as config_lib
from jaxtune import validation
from jaxtune import trainer
from jaxtune.metrics import read_metrics
from tests.helpers import write_preference_jsonl
from tests.test_preference_training import dpo_config, files  # noqa: F401 (the module's data fixture)


@pytest.mark.slow  # one tiny DPO run with three held-out evaluations, then `jaxtune eval` of it
def test_packed_dpo_with_precomputed_reference_and_held_out_pairs(files, tmp_path):  # noqa: F811
    held_out = write_preference_jsonl(tmp_path / "held_out.jsonl", 10, start=700)
    task = write_preference_jsonl(tmp_path / "task.jsonl", 6, start=900)
    config = dpo_config(files, **{"data.packing": True, "data.max_pairs_per_row": 4, "objective.dpo.reference": "precomputed",
                                  "data.eval_path": held_out, "train.eval_every": 1, "train.steps": 2})
    with config.unlocked():
        config.eval.tasks.pairs_task = config_lib.eval_task_config("preference", path=str(task))
    validation.validate(config)
    trainer.train(config, tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    train = {r["step"]: r for r in rows if "loss" in r}
    evals = {r["step"]: r for r in rows if "eval/loss" in r}
    # Step 0: the policy is the reference, so DPO's loss is ln 2 with zero rewards, packed or not.
    assert train[1]["loss"] == pytest.approx(math.log(2.0), abs=1e-6)
    assert train[1]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert sorted(evals) == [0, 1, 2]
    assert evals[0]["eval/loss"] == pytest.approx(math.log(2.0), abs=1e-6)
    assert evals[0]["eval/rewards/accuracies"] == 0.0 and evals[0]["eval/pairs_task/rewards/margins"] == 0.0
    for key in ("eval/rewards/accuracies", "eval/rewards/margins", "eval/pairs_task/loss", "eval/logps/chosen"):
        assert math.isfinite(evals[2][key]), key
    assert evals[2]["eval/rewards/margins"] != 0.0  # two updates moved the policy away from the reference
    # `jaxtune eval` of the finished run: the same held-out numbers, its reference rebuilt from the start weights.
    assert cli.main(["eval", "--workdir", str(tmp_path / "run")]) == 0
    results = json.loads((tmp_path / "run" / "eval_results.json").read_text())["metrics"]
    for key in ("loss", "rewards/accuracies", "rewards/margins", "pairs_task/loss"):
        assert results[key] == pytest.approx(evals[2][f"eval/{key}"], rel=1e-4, abs=1e-6), key
