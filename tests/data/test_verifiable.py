"""The built-in verifiable task set and the GSM8K reader."""

import json

import pytest

from jaxtune.data.builtin import verifiable
from jaxtune.data.gsm8k import read_gsm8k
from jaxtune.errors import UserError
from jaxtune.rewards import RewardSet


def test_solutions_earn_full_reward_and_wrong_answers_do_not():
    records = verifiable.generate_records(200, seed=3)
    fields = {k: [r[k] for r in records] for k in ("answer", "constraints")}
    rewards = RewardSet.from_specs(["math", "instructions"])
    prompts = [r["prompt"] for r in records]
    totals, parts = rewards(prompts, [r["solution"] for r in records], fields)
    assert totals == [1.0] * len(records)
    assert {r["task"] for r in records} == {"arithmetic", "constraints"}
    wrong = [r["solution"] + " 99" if r["task"] == "arithmetic" else r["solution"] + " EXTRA, Words" for r in records]
    wrong = [w.replace("####", "") if r["task"] == "arithmetic" else w for w, r in zip(wrong, records)]
    totals, _ = rewards(prompts, wrong, fields)
    assert max(totals) < 1.0


def test_splits_are_disjoint_deterministic_and_answers_nonnegative():
    train = verifiable.generate_records(2000, split="train", seed=0)
    heldout = verifiable.generate_records(300, split="heldout", seed=0)
    assert verifiable.generate_records(50, split="train", seed=0) == train[:50]
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}
    arithmetic = [r for r in train if r["task"] == "arithmetic"]
    assert all(int(r["answer"]) >= 0 for r in arithmetic)
    assert any("Then" in r["prompt"] and r["prompt"].count("Then") == 2 for r in arithmetic)  # multi-step
    corpus = list(verifiable.tokenizer_corpus(num_examples=40))
    assert len(corpus) == 80 and verifiable.generate_records(1, split="heldout")[0]["prompt"] in corpus
    with pytest.raises(ValueError, match="unknown split"):
        verifiable.generate_records(1, split="test")
    with pytest.raises(ValueError, match="unknown families"):
        verifiable.generate_records(1, families=("poetry",))


def test_gsm8k_reader(tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"question": "Natalia sold 48 clips, then half as many. How many in all?",
         "answer": "She sold 48/2 = <<48/2=24>>24 later.\n48+24 = <<48+24=72>>72\n#### 72", "id": 7},
        {"question": "Big?", "answer": "Yes.\n#### 1,000"},
    ]) + "\n")
    records = read_gsm8k(path)
    assert [r["answer"] for r in records] == ["72", "1000"]
    assert records[0]["id"] == 7 and records[0]["prompt"].startswith("Natalia")
    assert RewardSet.from_specs(["math"])([r["prompt"] for r in records], ["#### 72", "1000"],
                                          {"answer": [r["answer"] for r in records]})[0] == [1.0, 1.0]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "42"}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl:1: field 'answer' does not end with '#### "):
        read_gsm8k(bad)
    bad.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl:1: expected a non-empty string field 'answer'"):
        read_gsm8k(bad)


def test_sft_data_source_renders_worked_solutions(tmp_path):
    from jaxtune import config as config_lib, loading
    from jaxtune.data.datasets import load_sft_data
    from jaxtune.data.examples import ExampleBuilder

    c = config_lib.base_config()
    c.data.builtin = "verifiable"
    c.data.verifiable_families = ("arithmetic",)
    c.data.templates = (("{prompt} A:", " {solution}"),)
    c.data.num_train_examples, c.data.num_eval_examples = 50, 10
    data = load_sft_data(loading.data_settings(c), tmp_path, seed=0)
    assert {r["task"] for r in data.tasks[0].records} == {"arithmetic"} and len(data.eval_records) == 10
    builder = ExampleBuilder(data.tasks[0], 0, data.tokenizer, seq_len=128, seed=0)
    prompt, target = builder.render(data.tasks[0].records[0], 0)
    assert prompt.endswith(" A:") and target.endswith("#### " + data.tasks[0].records[0]["answer"])
    from jaxtune.data.pipeline import render_eval_set

    rendered = render_eval_set(data.eval_records, data.eval_templates, seed=0)
    assert rendered[0]["task"] == "arithmetic" and rendered[0]["answer"].startswith(" ")
    c.data.verifiable_families = ("poetry",)
    with pytest.raises(UserError, match="data.verifiable_families"):
        load_sft_data(loading.data_settings(c), tmp_path, seed=0)
