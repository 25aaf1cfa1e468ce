"""Evol-Instruct mechanics on canned completions (FakeSampler): mutations, the elimination rules,
lineage over rounds, resumability, and that the output loads as a data task."""

import json
from collections import Counter

import pytest

from jaxtune.config import task_config
from jaxtune.data.datasets import task_spec
from jaxtune.datatools import evolve as ev
from jaxtune.errors import UserError
from tests.datatools.fakes import FakeSampler

SETTINGS = ev.Settings(batch_size=4, seed=1)
INPUTS = [{"instruction": "Explain how tides work.", "id": "tides"},
          {"instruction": "Summarize the text.", "input": "Rivers carry water to the sea."},
          {"instruction": "Give a recipe for bread."},
          {"instruction": "List three uses of copper.", "output": "wires, pipes, coins"},
          {"instruction": "Describe a sunset over the desert."}]


@pytest.fixture
def inputs(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in INPUTS))
    return ev.read_instructions(str(path))


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _untimed(report):
    return [{k: v for k, v in line.items() if k != "sampler_seconds"} for line in _lines(report)]


def test_reads_inputs_with_ids_and_inputs(inputs, tmp_path):
    assert [it.id for it in inputs] == ["tides", "line2", "line3", "line4", "line5"]
    assert inputs[1].text == "Summarize the text.\n\nRivers carry water to the sea."
    path = tmp_path / "in.jsonl"
    assert len(ev.read_instructions(str(path), limit=2)) == 2
    path.write_text('{"instruction": "ok"}\n{"input": "no instruction"}\n')
    with pytest.raises(UserError, match=r"in.jsonl:2: field 'instruction' is missing"):
        ev.read_instructions(str(path))
    path.write_text('{"instruction": "ok"}\n[1, 2]\n')
    with pytest.raises(UserError, match=r"in.jsonl:2: expected a JSON object"):
        ev.read_instructions(str(path))


@pytest.mark.parametrize("parent, child, reason", [
    ("Write a poem.", "", "empty_evolution"),
    ("Write a poem.", "write a POEM!", "no_information_gain"),
    ("Write a short poem about the sea.", "Write a short poem about the blue sea.", "no_information_gain"),  # F = 14/15
    ("Write a poem.", "Write a poem, as the given prompt says.", "copied_prompt_words"),
    ("Write a poem.", "Rewritten Task: write a poem in iambic meter", "copied_prompt_words"),
    ("Write a poem.", "Write a poem in iambic pentameter about a lighthouse keeper's last night.", None),
])
def test_instruction_elimination_rules(parent, child, reason):
    assert ev.instruction_problem(parent, child, 0.9)[0] == reason


@pytest.mark.parametrize("response, reason", [
    ("", "empty_response"),
    ("I'm sorry, but I can't do that.", "sorry_response"),
    ("Sorry " + "word " * 80, None),  # a long answer that apologises once is kept (the paper's 80 words)
    ("It is, and the... ?", "only_punctuation_and_stop_words"),
    ("Copper conducts electricity.", None),
])
def test_response_elimination_rules(response, reason):
    assert ev.response_problem(response) == reason


def test_prompts_and_parsing():
    prompt = ev.mutation_prompt("add_constraints", "Explain tides.")
    assert prompt.endswith("Task:\nExplain tides.\n\nRewritten task:\n") and "requirement or constraint" in prompt
    assert ev.mutation_prompt("breadth", "X").endswith("New task:\n")
    assert all(ev.MUTATIONS[m] != ev.MUTATIONS["breadth"] for m in ev.DEPTH)
    assert ev.parse_evolved("  Rewritten task: Do it twice.\n") == "Do it twice."
    with pytest.raises(UserError, match="--mutations: unknown widen"):
        ev.Settings(mutations=("deepen", "widen")).check()


def test_rounds_lineage_eliminations_and_data_task(tmp_path, inputs):
    out = tmp_path / "ev.jsonl"
    sampler = FakeSampler()
    result = ev.evolve(sampler, inputs, output=str(out), rounds=3, settings=SETTINGS)
    records = _lines(out)
    report = _lines(tmp_path / "ev.jsonl.report.jsonl")
    assert result.records == len(records) > 0 and result.rounds_done == 3
    assert result.evolutions == 3 * len(inputs) == len(records) + sum(len(b["dropped"]) for b in report[1:])
    reasons = Counter(d["reason"] for b in report[1:] for d in b["dropped"])
    assert {"no_information_gain", "copied_prompt_words"} <= set(reasons) and set(reasons) & {
        "sorry_response", "empty_response", "only_punctuation_and_stop_words"}
    assert Counter(result.dropped) == reasons
    # Lineage: a child's parent is the input or the latest surviving child at that position.
    by_id = {r["id"]: r for r in records}
    for r in records:
        assert r["root_id"] in {it.id for it in inputs}
        if r["round"] > 1 and r["parent_id"] in by_id:
            parent = by_id[r["parent_id"]]
            assert parent["index"] == r["index"] and parent["round"] < r["round"]
        if r["mutation"] != "breadth" and r["parent_id"] in by_id:
            assert by_id[r["parent_id"]]["instruction"] in r["instruction"]  # the fake appends constraints
    chains = ev.lineage(records)
    assert any(len(chain) > 2 for chain in chains.values())  # evolved more than once
    assert {r["mutation"] for r in records} | {d["mutation"] for b in report[1:] for d in b["dropped"]} == set(ev.MUTATIONS)
    # The judge option asks the model once per surviving candidate.
    judged = FakeSampler()
    ev.evolve(judged, inputs, output=str(tmp_path / "j.jsonl"), rounds=1, settings=ev.Settings(batch_size=4, judge=True))
    assert any(p.endswith("Answer:") for p in judged.seen)
    spec = task_spec("evolved", task_config(path=str(out), format="alpaca", templates="alpaca"))
    assert len(spec.records) == len(records) and spec.records[0]["response"] == records[0]["output"]


def test_resume_equals_an_uninterrupted_run(tmp_path, inputs):
    full, cut = tmp_path / "full.jsonl", tmp_path / "cut.jsonl"
    ev.evolve(FakeSampler(), inputs, output=str(full), rounds=3, settings=SETTINGS)
    # Two batches per round (4 + 1 items): stop inside round 2, then get killed inside its last batch.
    ev.evolve(FakeSampler(), inputs, output=str(cut), rounds=3, settings=SETTINGS, stop_after_batches=3)
    with pytest.raises(KeyboardInterrupt):
        ev.evolve(FakeSampler(fail_after=0), inputs, output=str(cut), rounds=3, settings=SETTINGS)
    assert ev.evolve(FakeSampler(), inputs, output=str(cut), rounds=2, settings=SETTINGS).evolutions == 1
    assert ev.evolve(FakeSampler(fail_after=0), inputs, output=str(cut), rounds=2, settings=SETTINGS).evolutions == 0
    result = ev.evolve(FakeSampler(), inputs, output=str(cut), rounds=3, settings=SETTINGS)
    assert result.evolutions == len(inputs)
    assert cut.read_text() == full.read_text()
    assert _untimed(tmp_path / "cut.jsonl.report.jsonl") == _untimed(tmp_path / "full.jsonl.report.jsonl")
    more = ev.evolve(FakeSampler(), inputs, output=str(cut), rounds=4, settings=SETTINGS)  # one more round appended
    assert cut.read_text().startswith(full.read_text()) and more.evolutions == len(inputs)
