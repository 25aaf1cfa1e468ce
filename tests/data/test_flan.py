"""FLAN-style rendering: options, chain of thought, inversion, few-shot, template sets by reference."""

import json
import sys
import textwrap

import pytest

from jaxtune.data.examples import ExampleBuilder, TaskSpec
from jaxtune.data.flan import HEADINGS, FlanSpec, render_flan
from jaxtune.data.sources import SourceError
from jaxtune.data.template_library import LIBRARY, LIBRARY_FIELDS, load_template_set
from jaxtune.data.templates import TemplateError
from jaxtune.errors import UserError
from tests.data.test_pipeline import CharTokenizer

MC = {"question": "Sky colour?", "options": ["red", "blue", "green"], "answer": "blue", "_where": "f.jsonl:4"}
MC_SET = (("{question}\n{options_}", "{answer}"),)


def test_deterministic_options_are_the_flan_default():
    prompt, target, _ = render_flan(FlanSpec(MC_SET), MC, seed=0, index=0)
    assert prompt == "Sky colour?\nOPTIONS:\n- red\n- blue\n- green" and target == "blue"
    by_index = {**MC, "answer": 2}
    assert render_flan(FlanSpec(MC_SET), by_index, seed=0, index=0)[1] == "green"  # an index names the option


def test_random_option_styles_rewrite_the_answer_to_the_marker():
    spec = FlanSpec(MC_SET, options_style="random")
    seen_headings, lettered = set(), 0
    for index in range(60):
        prompt, target, _ = render_flan(spec, MC, seed=3, index=index)
        assert render_flan(spec, MC, seed=3, index=index) == (prompt, target, 0)  # same draw on resume
        heading, *lines = prompt.split("\n")[1:]
        seen_headings.add(heading)
        assert heading in HEADINGS and len(lines) == 3
        marker = lines[1].removesuffix(" blue")
        if marker in ("-", "*"):
            assert target == "blue"
        else:
            lettered += 1
            assert target == marker and marker.strip("()[].") in ("B", "b", "2")
    assert len(seen_headings) > 3 and lettered > 10


def test_options_errors():
    with pytest.raises(SourceError, match=r"f\.jsonl:4: answer 'purple' is neither one of the options"):
        render_flan(FlanSpec(MC_SET), {**MC, "answer": "purple"}, seed=0, index=0)
    with pytest.raises(SourceError, match="must be a non-empty list of strings"):
        render_flan(FlanSpec(MC_SET), {**MC, "options": "red"}, seed=0, index=0)


def test_chain_of_thought_and_inversion():
    record = {"question": "2+3?", "rationale": "2 plus 3 is 5.", "answer": "5"}
    spec = FlanSpec((("Q: {question}", "{answer}"),), cot=True)
    prompt, target, _ = render_flan(spec, record, seed=0, index=0)
    assert prompt == "Q: 2+3?\nLet's think step by step." and target == "2 plus 3 is 5.\nSo the answer is 5."
    generic = FlanSpec((("Q: {question}", "{answer}"),), inversion=1.0)
    prompt, target, _ = render_flan(generic, record, seed=0, index=0)
    assert prompt.startswith("5\n\nWrite the instruction") and target == "Q: 2+3?"
    own = FlanSpec((("Q: {question}", "{answer}"),), inversion=1.0, inversion_templates=(("Answer: {answer}. Question?", "{question}"),))
    assert render_flan(own, record, seed=0, index=0)[:2] == ("Answer: 5. Question?", "2+3?")
    half = FlanSpec((("Q: {question}", "{answer}"),), inversion=0.5)
    inverted = sum(render_flan(half, record, seed=1, index=i)[1] == "Q: 2+3?" for i in range(200))
    assert 70 < inverted < 130


def test_missing_field_names_task_template_field_and_available():
    spec = FlanSpec((("{question}", "{answer}"), ("{query}", "{answer}")))
    with pytest.raises(TemplateError, match=r"task 'qa', template 1: template '\{query\}' uses field 'query'.*"
                                            r"available fields: answer, options, question"):
        render_flan(spec, MC, seed=0, index=0, task="qa", template_index=1)
    with pytest.raises(SourceError, match=r"f\.jsonl:4: .*field 'options' is a list"):
        render_flan(FlanSpec((("{options}", "{answer}"),)), MC, seed=0, index=0)


def _builder(records, **task):
    flan = FlanSpec(task.pop("templates", (("Q: {q}", " {a}"),)))
    return ExampleBuilder(TaskSpec("t", records, flan={"default": flan}, **task), 0, CharTokenizer(), seq_len=task.pop("seq_len", 200), seed=0)


def test_few_shot_exemplars_same_template_and_token_budget():
    records = [{"q": f"question {i}", "a": f"answer {i}"} for i in range(20)]
    builder = _builder(records, few_shot=3, few_shot_separator="\n\n", few_shot_target_separator="")
    prompt, target = builder.render(records[0], index=5)
    shots = prompt.split("\n\n")
    assert len(shots) == 4 and shots[-1] == "Q: question 0" and target == " answer 0"
    for shot in shots[:-1]:
        q = shot.removeprefix("Q: question ").split(" ")[0]
        assert shot == f"Q: question {q} answer {q}" and q != "0"  # never the example itself
    assert builder.render(records[0], index=5) == (prompt, target)  # deterministic
    # A budget that fits the example and one exemplar (CharTokenizer: one token per byte).
    tight = _builder(records, few_shot=3, few_shot_max_tokens=len("Q: question 0 answer 0") + 2 + 30)
    assert len(tight.render(records[0], index=5)[0].split("\n\n")) == 2


def test_empty_target_errors_or_is_counted():
    records = [{"q": "x", "a": ""}]
    with pytest.raises(UserError, match="the target is empty"):
        _builder(records, templates=(("{q}", "{a}"),))(0, records[0])
    marker = _builder(records, templates=(("{q}", "{a}"),), on_error="skip")(0, records[0])
    assert marker["_skip"] == "empty"


def test_library_sets_render_with_their_fields():
    values = {"options": ["yes", "no"], "answer": "yes"}
    for name, pairs in LIBRARY.items():
        fields = {f: values.get(f, f"<{f}>") for f in LIBRARY_FIELDS[name] if f != "options_"} | {"options": ["yes", "no"]}
        fields.setdefault("answer", "yes")
        for i in range(len(pairs)):
            prompt, target, _ = render_flan(FlanSpec(tuple(pairs)), fields, seed=0, index=0, template_index=i)
            assert prompt and target, (name, i)
    assert set(LIBRARY) >= {"nli", "extractive_qa", "closed_qa", "sentiment", "classification", "summarization",
                            "translation", "multiple_choice"}


def test_template_sets_load_from_module_json_and_yaml(tmp_path, monkeypatch):
    pairs = [["{premise} -> {hypothesis}?", "{answer}"], ["Does {premise} imply {hypothesis}?", "{answer}"]]
    (tmp_path / "my_patterns.py").write_text(textwrap.dedent(f"""
        PATTERNS = {{"rte": {[tuple(p) for p in pairs]!r}}}
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    expected = [tuple(p) for p in pairs]
    assert load_template_set("my_patterns:PATTERNS.rte") == expected
    (tmp_path / "t.json").write_text(json.dumps({"rte": pairs}))
    assert load_template_set(f"{tmp_path / 't.json'}:rte") == expected
    (tmp_path / "t.yaml").write_text("- ['{premise} -> {hypothesis}?', '{answer}']\n- input: 'Does {premise} imply {hypothesis}?'\n  target: '{answer}'\n")
    assert load_template_set(str(tmp_path / "t.yaml")) == expected
    assert load_template_set("nli") == LIBRARY["nli"]
    with pytest.raises(UserError, match="no key 'mnli'"):
        load_template_set("my_patterns:PATTERNS.mnli")
    with pytest.raises(UserError, match="template 0 must be an"):
        load_template_set([("only one",)])
    with pytest.raises(UserError, match="not a built-in template set"):
        load_template_set("nope")
    sys.modules.pop("my_patterns", None)
