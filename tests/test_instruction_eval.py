"""Instruction-following evaluation (eval.tasks metric 'instructions'): IFEval's strict/loose
scores on canned responses (hand-computed), IFEval's own record format (every one of its 25 ids
scored, `language:response_language` included), record and config errors, and one run through `evaluate.run` on a tiny random model."""

import json

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn

from jaxtune import config as config_lib
from jaxtune import evaluate, models, validation
from jaxtune.eval_tasks import load_eval_task
from jaxtune.errors import UserError
from jaxtune.rewards.instructions import loose_variants, satisfied
from tests.data.test_pipeline import CharTokenizer

# (response, constraints, strict per constraint, loose per constraint)
CANNED = [
    ("Sure! here it is:\nhello world", [{"type": "lowercase"}, {"type": "no_commas"}],
     [False, True], [True, True]),  # the preamble line breaks lowercase; loose drops the first line
    ("* **a**\n* b\n\nHope this helps", [{"type": "bullet_count", "n": 2}, {"type": "word_count", "relation": "at most", "n": 4}],
     [True, False], [True, True]),  # the closing line adds 3 words; loose drops the last line
    ("no quotes", [{"type": "quoted"}], [False], [False]),
    ('{"A": 1}', [{"type": "json_format"}, {"type": "uppercase"}], [True, True], [True, True]),
    ("all **done**", [{"type": "ends_with", "phrase": "done"}], [False], [True]),  # loose removes the markdown '*'
]


def test_strict_and_loose_scores_by_hand():
    for response, constraints, strict, loose in CANNED:
        assert satisfied(response, constraints) == strict, response
    scores = evaluate.instruction_scores([r for r, *_ in CANNED], [c for _, c, *_ in CANNED])
    # strict: only the JSON prompt holds all; 4 of 8 constraints hold. loose: 4 of 5 prompts, 7 of 8 constraints
    assert scores["prompt_level_strict_acc"] == pytest.approx(1 / 5)
    assert scores["inst_level_strict_acc"] == pytest.approx(4 / 8)
    assert scores["prompt_level_loose_acc"] == pytest.approx(4 / 5)
    assert scores["inst_level_loose_acc"] == pytest.approx(7 / 8)
    per_type = {k.split("/")[1]: (scores[k], scores[k.replace("strict", "loose")])
                for k in scores if k.startswith("inst_level_strict_acc/")}
    assert per_type == {"lowercase": (0, 1), "no_commas": (1, 1), "bullet_count": (1, 1), "word_count": (0, 1),
                        "quoted": (0, 0), "json_format": (1, 1), "uppercase": (1, 1), "ends_with": (0, 1)}


def test_loose_variants_are_ifevals_eight():
    assert loose_variants("Intro:\n*x* y\n**end**") == [
        "Intro:\n*x* y\n**end**", "Intro:\nx y\nend",  # the response, '*' removed
        "*x* y\n**end**", "Intro:\n*x* y", "*x* y",  # first line, last line, both removed (stripped)
        "x y\nend", "Intro:\nx y", "x y",  # and those with '*' removed
    ]
    assert evaluate.instruction_scores(["", "   "], [[{"type": "no_commas"}], [{"type": "lowercase"}]])[
        "inst_level_loose_acc"] == 0.0  # blank responses satisfy nothing, loosely either


IFEVAL_RECORDS = [
    {"key": 1, "prompt": "Write a limerick about cats.",
     "instruction_id_list": ["punctuation:no_comma", "length_constraints:number_words", "keywords:existence"],
     "kwargs": [{}, {"relation": "less than", "num_words": 40}, {"keywords": ["whisker", "moon"]}]},
    {"key": 2, "prompt": "Describe Paris.",  # the Hugging Face copy fills every kwarg, null where unused
     "instruction_id_list": ["keywords:frequency", "language:response_language", "startend:end_checker"],
     "kwargs": [{"keyword": "river", "frequency": 3, "relation": "at least", "language": None, "end_phrase": None},
                {"language": "fr", "keyword": None}, {"end_phrase": "Any other questions?"}]},
    {"key": 3, "prompt": "Say hello in Hindi.", "instruction_id_list": ["language:response_language"],
     "kwargs": [{"language": "hi"}]},
    {"key": 4, "prompt": "List fruits.",
     "instruction_id_list": ["detectable_format:number_bullet_lists", "change_case:english_lowercase",
                             "change_case:english_capital", "detectable_format:json_format", "startend:quotation",
                             "length_constraints:number_sentences", "length_constraints:number_paragraphs",
                             "keywords:forbidden_words", "combination:repeat_prompt", "detectable_format:title"],
     "kwargs": [{"num_bullets": 3}, {}, None, {}, {}, {"relation": "at least", "num_sentences": 2},
                {"num_paragraphs": 2}, {"forbidden_words": ["apple"]}, {"prompt_to_repeat": "List fruits."}, {}]},
    {"key": 5, "prompt": "Plan a trip.",
     "instruction_id_list": ["keywords:letter_frequency", "change_case:capital_word_frequency",
                             "detectable_content:number_placeholders", "detectable_content:postscript",
                             "detectable_format:number_highlighted_sections", "detectable_format:multiple_sections",
                             "detectable_format:constrained_response", "combination:two_responses",
                             "length_constraints:nth_paragraph_first_word"],
     "kwargs": [{"letter": "q", "let_frequency": 2, "let_relation": "less than"},
                {"capital_frequency": 3, "capital_relation": "at least"}, {"num_placeholders": 2},
                {"postscript_marker": "P.P.S"}, {"num_highlights": 1}, {"section_spliter": "SECTION", "num_sections": 3},
                {}, {}, {"num_paragraphs": 3, "nth_paragraph": 2, "first_word": "then"}]},
]


def _ifeval_task(tmp_path, records, name="ifeval.jsonl", **keys):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return config_lib.eval_task_config("instructions", path=str(path), **keys)


def test_ifeval_records_become_constraints_of_their_ids(tmp_path):
    task = load_eval_task("ifeval", _ifeval_task(tmp_path, IFEVAL_RECORDS), seed=0)
    assert [e["prompt"] for e in task.examples] == [r["prompt"] for r in IFEVAL_RECORDS]
    for example, record in zip(task.examples, IFEVAL_RECORDS):  # one constraint per instruction, its kwargs kept
        assert [c["type"] for c in example["constraints"]] == record["instruction_id_list"]
    assert task.examples[1]["constraints"] == [  # the HF copy's null kwargs dropped
        {"type": "keywords:frequency", "keyword": "river", "frequency": 3, "relation": "at least"},
        {"type": "language:response_language", "language": "fr"},
        {"type": "startend:end_checker", "end_phrase": "Any other questions?"}]
    from jaxtune.rewards.ifeval_checkers import CHECKERS  # the records use every one of IFEval's 25 ids
    assert {i for r in IFEVAL_RECORDS for i in r["instruction_id_list"]} == set(CHECKERS)
    assert task.skipped_records == 0


@pytest.mark.parametrize("record, needle", [
    ({"prompt": "p"}, r"ifeval.jsonl:2: eval task 'ifeval' \(metric 'instructions'\): the record has no 'constraints'"),
    ({"prompt": "p", "constraints": []}, r"ifeval.jsonl:2: .*field 'constraints': expected a non-empty list"),
    ({"prompt": "p", "constraints": [{"type": "rhymes"}]}, r"ifeval.jsonl:2: .*unknown constraint type 'rhymes'"),
    ({"prompt": "p", "constraints": [{"type": "word_count", "n": 3}]}, r"ifeval.jsonl:2: .*'word_count' needs relation"),
    ({"prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": []}, r"ifeval.jsonl:2: .*one entry per"),
    ({"prompt": "p", "instruction_id_list": ["keywords:frequency"], "kwargs": [{"keyword": "x", "frequency": 2}]},
     r"ifeval.jsonl:2: .*instruction 'keywords:frequency' needs kwarg 'relation'"),
    ({"prompt": "p", "instruction_id_list": ["length_constraints:number_words"],
      "kwargs": [{"relation": "at most", "num_words": 5}]}, r"kwarg 'relation' must be one of 'less than', 'at least'"),
    ({"prompt": "p", "instruction_id_list": ["length_constraints:number_words"],
      "kwargs": [{"relation": "less than", "num_words": -2}]}, r"kwarg 'num_words' must be a non-negative integer"),
    ({"prompt": "p", "instruction_id_list": ["keywords:rhymes"], "kwargs": [{}]},
     r"ifeval.jsonl:2: .*unknown constraint type 'keywords:rhymes'"),
])
def test_bad_instruction_records_name_file_line_and_task(tmp_path, record, needle):
    good = {"prompt": "q", "constraints": [{"type": "lowercase"}]}
    t = _ifeval_task(tmp_path, [good, record])
    with pytest.raises(UserError, match=needle):
        load_eval_task("ifeval", t, seed=0)
    t.on_error = "skip"  # the task's on_error policy applies to these records as to any other (counted)
    task = load_eval_task("ifeval", t, seed=0)
    assert len(task.examples) == 1 and task.skipped_records == 1


def test_instruction_task_config_errors(tmp_path):
    from tests.helpers import tiny_base_config, write_sft_jsonl

    c = tiny_base_config(write_sft_jsonl(tmp_path / "train.jsonl"))
    c.eval.tasks.ifeval = _ifeval_task(tmp_path, IFEVAL_RECORDS)
    validation.validate(c)
    for key, value, needle in [("few_shot", 2, "'eval.tasks.ifeval.few_shot' is 2: an 'instructions' task is scored "
                                                "zero-shot"), ("cot", True, "'eval.tasks.ifeval.cot'"),
                               ("metric", "instruction", "expected one of .*instructions")]:
        bad = c.copy_and_resolve_references()
        bad.eval.tasks.ifeval[key] = value
        with pytest.raises(UserError, match=needle):
            validation.validate(bad)


def test_evaluate_run_scores_greedy_responses(tmp_path):
    """The tiny random Llama and byte tokenizer the evaluate tests use; greedy responses are noise,
    what is checked is that they are scored as `instruction_scores` scores them."""
    model = models.build(models.get_config("llama", "tiny", vocab_size=CharTokenizer.vocab_size))
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    tok = CharTokenizer()
    records = [{"instruction": f"say {w}", "constraints": [{"type": "lowercase"}, {"type": "word_count",
                "relation": "at most", "n": 3}]} for w in ("hi", "yes", "a word")]
    hindi = {**IFEVAL_RECORDS[2], "instruction": "hindi"}  # IFEval's format: scored like the others
    t = _ifeval_task(tmp_path, records[:2] + [hindi] + records[2:], templates=(("Q: {instruction}", ""),))
    task = load_eval_task("ifeval", t, seed=0)
    eval_cfg = config_lib.base_config().eval
    eval_cfg.update(max_new_tokens=6, batch_size=4, generative=False, loss=False)
    printed = []
    scores = evaluate.run(model, params, tok, evaluate.EvalSet(tasks=[task]), eval_cfg, seq_len=32, seed=0, show=1,
                          printer=printed.append)
    responses = evaluate.generate_answers(model, params, tok, task.examples, eval_cfg)  # greedy: the same responses
    assert [e["prompt"] for e in task.examples] == ["Q: say hi", "Q: say yes", "Q: hindi", "Q: say a word"]
    expected = evaluate.instruction_scores(responses, [e["constraints"] for e in task.examples])
    assert scores == {f"ifeval/{k}": v for k, v in expected.items()}
    assert "ifeval/inst_level_strict_acc/language:response_language" in scores
    assert set(evaluate.INSTRUCTION_METRICS) <= {k.split("/")[1] for k in scores}
    assert printed[0].startswith("  [") and "Q: say hi" in printed[0] and len(printed) == 1
