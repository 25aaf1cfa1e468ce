"""Reward functions loaded by name or module path and summed with weights."""

import pytest

from jaxtune.errors import UserError
from jaxtune.rewards import RewardSet, load_reward_fn, math_answer


def length_penalty(prompts, completions, **fields):
    return [-len(c) / 10 for c in completions]


def wrong_length(prompts, completions, **fields):
    return [1.0]


def not_finite(prompts, completions, **fields):
    return [float("nan")] * len(completions)


def test_weighted_sum_and_parts():
    rewards = RewardSet.from_specs(["math", "tests.rewards.test_reward_set:length_penalty"], [2.0, 0.5])
    totals, parts = rewards(["q", "q"], ["#### 4", "#### 5"], {"answer": ["4", "4"], "id": [0, 1]})
    assert rewards.names == ["math", "length_penalty"]
    assert parts == {"math": [1.0, 0.0], "length_penalty": [-0.6, -0.6]}
    assert totals == pytest.approx([2.0 - 0.3, -0.3])


def test_dotted_path_and_builtins():
    assert load_reward_fn("math") is math_answer
    assert load_reward_fn("tests.rewards.test_reward_set.length_penalty") is length_penalty


@pytest.mark.parametrize("specs, weights, message", [
    ([], (), "at least one"),
    (["math"], [1.0, 2.0], "1 reward functions but 2 weights"),
    (["no_such_module_xyz:f"], (), "cannot import module"),
    (["tests.rewards.test_reward_set:missing"], (), "no callable 'missing'"),
    (["nonsense"], (), "expected a built-in"),
    (["math", "math"], (), "share a name"),
])
def test_bad_specs(specs, weights, message):
    with pytest.raises(UserError, match=message):
        RewardSet.from_specs(specs, weights)


@pytest.mark.parametrize("spec, fields, message", [
    ("math", {"question": ["q"]}, "records have fields \\['question'\\]"),
    ("tests.rewards.test_reward_set:wrong_length", {}, "returned 1 rewards for 2"),
    ("tests.rewards.test_reward_set:not_finite", {}, "non-finite"),
])
def test_bad_reward_outputs(spec, fields, message):
    rewards = RewardSet.from_specs([spec])
    with pytest.raises(UserError, match=message):
        rewards(["q", "q"], ["a", "b"], {k: v * 2 for k, v in fields.items()})


def test_not_applicable_rewards_count_as_zero_in_the_sum():
    rewards = RewardSet.from_specs(["math", "instructions"])
    fields = {"answer": ["4", None], "constraints": [None, [{"type": "lowercase"}]]}
    totals, parts = rewards(["q", "p"], ["#### 4", "all lower"], fields)
    assert parts == {"math": [1.0, None], "instructions": [None, 1.0]}
    assert totals == [1.0, 1.0]


def test_reward_model_spec_loads_a_run_or_an_hf_directory(tmp_path, monkeypatch):
    """The spec routes a run directory and an HF directory to jaxtune.scoring.reward_fn (stood in for
    here; tests/test_reward_training.py checks the real scorer against transformers)."""
    from jaxtune import scoring

    calls = []
    monkeypatch.setattr(scoring, "reward_fn", lambda workdir=None, *, hf_dir=None: calls.append((workdir, hf_dir)) or (
        lambda prompts, completions, **fields: [float(len(c)) for c in completions]))
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hf").mkdir()
    rewards = RewardSet.from_specs([f"reward_model:{tmp_path / 'run'}"])
    assert rewards.names == ["reward_model"]
    assert rewards(["p"], ["abc"], {})[0] == [3.0]
    load_reward_fn(f"reward_model:{tmp_path / 'hf'}")
    assert calls == [(str(tmp_path / "run"), None), (None, str(tmp_path / "hf"))]
    with pytest.raises(UserError, match="is not a directory"):
        load_reward_fn(f"reward_model:{tmp_path / 'missing'}")
