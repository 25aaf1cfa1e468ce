"""Self-Instruct mechanics on canned completions (FakeSampler): parsing, filters, classification
and instance order, the similarity invariant, resumability, and that the output loads as a data task."""

import json

import pytest

from jaxtune.config import task_config
from jaxtune.data.datasets import task_spec
from jaxtune.data.examples import ExampleBuilder
from jaxtune.datatools import self_instruct as si
from jaxtune.datatools.rouge import rouge_l
from jaxtune.errors import UserError
from tests.datatools.fakes import FakeSampler, write_seed_file

SETTINGS = si.Settings(batch_size=3, num_seed_examples=2, num_machine_examples=2, seed=5)


@pytest.fixture
def seeds(tmp_path):
    return si.read_seed_tasks(str(write_seed_file(tmp_path / "seeds.jsonl")))


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _untimed(report):
    return [{k: v for k, v in line.items() if k != "sampler_seconds"} for line in _lines(report)]


def test_parsing_of_lists_labels_and_instances():
    text = " Write a poem about cats.\n10. Translate this sentence.\n11) Sum two numbers\n12. Unfinished"
    assert si.parse_instructions(text, truncated=True) == ["Write a poem about cats.", "Translate this sentence.",
                                                           "Sum two numbers"]
    assert len(si.parse_instructions(text, truncated=False)) == 4
    assert si.parse_instances(" 2 + 2\nOutput: 4\nExample 2\nInput:\nOutput: 0\n\nTask: other") == [("2 + 2", "4"), ("", "0")]
    assert si.parse_instances(" no output marker") == []
    assert si.parse_classification_instances(" yes\nInput: I agree\nClass label: no\nInput: never") == [
        ("I agree", "yes"), ("never", "no")]
    assert si.parse_classification_instances("Class label: yes\nInput: ok") == [("ok", "yes")]  # a chat reply
    assert si.parse_instances("Example 1\nInput: x\nOutput: y") == [("x", "y")]
    assert si.parse_instructions("9. Sort a list.\n10. Name a color.", truncated=False) == ["Sort a list.", "Name a color."]
    assert si.parse_classification(" Yes, it is") and not si.parse_classification(" No")
    assert si.clean_instances([("a", "b"), ("a", "b"), ("x", "x"), ("y", ""), ("c", "d")], 5) == [("a", "b"), ("c", "d")]
    assert si.clean_instances([("a", "b"), ("c", "d")], 1) == [("a", "b")]


@pytest.mark.parametrize("instruction, reason", [
    ("Hi there", "too_short"),
    (" ".join(["word"] * 151), "too_long"),
    ("Draw a cat for me", "blacklisted_keyword"),
    ("Describe the images below", "blacklisted_keyword"),
    ("Tell me how to go to the station", "blacklisted_keyword"),
    ("... and then continue the story", "starts_with_punctuation"),
    ("Écris un poème sur la mer", "starts_non_english"),
    ("Explain roadmaps and mapping to a child", None),  # "map" only as a whole word
    ("Write a haiku about autumn", None),
])
def test_rejection_reasons(instruction, reason):
    assert si.rejection_reason(instruction, si.Settings()) == reason


def test_prompts_hold_the_examples_and_end_where_the_model_continues(seeds):
    prompt = si.instruction_prompt(["First task.", "Second\ntask."])
    assert prompt.endswith("1. First task.\n2. Second task.\n3.")
    assert si.instance_prompt(seeds[:1], "New task").endswith("Task: New task\nExample 1\nInput:")
    assert "Class label: positive\nInput: I loved it" in si.classification_instance_prompt(seeds[1:2], "T")
    cls = si.classification_prompt(si._classification_demos(seeds), "T")
    assert "Classification: Yes" in cls and "Classification: No" in cls and cls.endswith("Task: T\nClassification:")


def test_loop_filters_orders_instances_and_loads_as_a_data_task(tmp_path, seeds):
    out = tmp_path / "si.jsonl"
    sampler = FakeSampler()
    result = si.generate(sampler, seeds, output=str(out), num_instructions=12, settings=SETTINGS)
    records = _lines(out)
    instructions = list(dict.fromkeys(r["instruction"] for r in records))
    assert result.instructions == len(instructions) >= 12 and result.records == len(records)
    # Every kept instruction is below the threshold against the seeds and all earlier kept ones.
    pool = [t.instruction for t in seeds]
    for text in instructions:
        assert max(rouge_l(p, text) for p in pool) < 0.7
        pool.append(text)
    assert all(si.rejection_reason(t, SETTINGS) is None for t in instructions)
    for r in records:  # provenance: the closest text at the check (a seed, a kept or a same-batch candidate)
        assert r["most_similar"] != r["instruction"]
        assert r["max_rouge_l"] == round(rouge_l(r["most_similar"], r["instruction"]), 4) < 0.7
    report = _lines(tmp_path / "si.jsonl.report.jsonl")
    assert report[0]["command"] == "self-instruct" and [b["batch"] for b in report[1:]] == list(range(len(report) - 1))
    dropped = {k for b in report[1:] for k in b["dropped"]}
    assert {"blacklisted_keyword", "similar_to_pool", "no_valid_instance"} <= dropped
    assert sum(b["kept"] for b in report[1:]) == len(instructions)
    # Classification tasks were asked label first, the others input first.
    cls = [r for r in records if r["is_classification"]]
    assert cls and {r["output"] for r in cls} == {"positive", "negative"}
    assert all(not r["is_classification"] and r["output"] == "an answer" for r in records if r not in cls)
    assert any(p.endswith("Class label:") for p in sampler.seen) and any(p.endswith("Input:") for p in sampler.seen)
    # Later prompts show machine instructions as examples.
    lists = [p for p in sampler.seen if p.startswith("Here is a numbered list")]
    assert any(text in lists[-1] for text in instructions)
    # The output reads as an Alpaca task.
    spec = task_spec("si", task_config(path=str(out), format="alpaca", templates="alpaca"))
    assert len(spec.records) == len(records)
    builder = ExampleBuilder(spec, 0, None, seq_len=0, seed=0)
    prompt, target = builder.render(spec.records[0], 0)
    assert records[0]["instruction"] in prompt and records[0]["output"] in target


def test_resume_appends_and_equals_an_uninterrupted_run(tmp_path, seeds):
    full, cut = tmp_path / "full.jsonl", tmp_path / "cut.jsonl"
    si.generate(FakeSampler(), seeds, output=str(full), num_instructions=14, settings=SETTINGS)
    si.generate(FakeSampler(), seeds, output=str(cut), num_instructions=14, settings=SETTINGS, stop_after_batches=1)
    first = cut.read_text()
    with pytest.raises(KeyboardInterrupt):  # killed inside its second batch (second sampler call): nothing of it is written
        si.generate(FakeSampler(fail_after=1), seeds, output=str(cut), num_instructions=14, settings=SETTINGS)
    assert cut.read_text() == first
    # A run killed between writing records and the report line, and mid-line: both tails are cut on resume.
    with cut.open("a") as f:
        f.write(json.dumps({**_lines(cut)[0], "batch": 1}) + "\n" + '{"instruction": "torn')
    sampler = FakeSampler()
    result = si.generate(sampler, seeds, output=str(cut), num_instructions=14, settings=SETTINGS)
    assert cut.read_text().startswith(first) and cut.read_text() == full.read_text()
    assert _untimed(tmp_path / "cut.jsonl.report.jsonl") == _untimed(tmp_path / "full.jsonl.report.jsonl")
    batches = len(_lines(tmp_path / "full.jsonl.report.jsonl")) - 1
    assert batches > 2 and result.requests == (batches - 1) * SETTINGS.batch_size  # the first batch was not redone
    # Done: a rerun sends nothing; a larger target continues the same file.
    assert si.generate(FakeSampler(fail_after=0), seeds, output=str(cut), num_instructions=14, settings=SETTINGS).requests == 0
    more = si.generate(FakeSampler(), seeds, output=str(cut), num_instructions=20, settings=SETTINGS)
    assert cut.read_text().startswith(full.read_text()) and more.instructions >= 20


def test_resume_refuses_other_settings_and_foreign_files(tmp_path, seeds):
    out = tmp_path / "o.jsonl"
    si.generate(FakeSampler(), seeds, output=str(out), num_instructions=2, settings=SETTINGS)
    other = si.Settings(**{**SETTINGS.__dict__, "temperature": 1.0})
    with pytest.raises(UserError, match=r"other settings \(temperature: 0.7 -> 1.0\)"):
        si.generate(FakeSampler(), seeds, output=str(out), num_instructions=2, settings=other)
    with pytest.raises(UserError, match=r"other settings \(seed_tasks: 4 -> 3, seed_tasks_sha256: "):
        si.generate(FakeSampler(), seeds[:3], output=str(out), num_instructions=2, settings=SETTINGS)
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"instruction": "x", "input": "", "output": "y"}\n')
    with pytest.raises(UserError, match="exists but has no report"):
        si.generate(FakeSampler(), seeds, output=str(foreign), num_instructions=2, settings=SETTINGS)


@pytest.mark.parametrize("content, message", [
    ('{"instruction": "a", "instances": [{"input": "", "output": "b"}]}\n{"instruction": ', r"seeds.jsonl:2: invalid JSON"),
    ('{"instances": [{"input": "", "output": "b"}]}\n', r"seeds.jsonl:1: field 'instruction' is missing; expected text"),
    ('{"instruction": "a", "instances": []}\n', r"seeds.jsonl:1: field 'instances' must be a non-empty list"),
    ('{"instruction": "a", "instances": [{"input": ""}]}\n', r"seeds.jsonl:1 instances\[0\]: field 'output' is missing"),
    ('{"instruction": "a", "instances": [{"input": "", "output": "b"}], "is_classification": "no"}\n',
     r"'is_classification' must be true or false"),
    ("\n", r"holds no tasks"),
])
def test_bad_seed_files(tmp_path, content, message):
    path = tmp_path / "seeds.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        si.read_seed_tasks(str(path))
