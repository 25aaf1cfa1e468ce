"""jaxtune's short-named instruction constraints: each on passing, failing and adversarial outputs.

They score with IFEval's reference rules (`ifeval_checkers`; parity with Google's scorer is
tests/rewards/test_ifeval_reference.py): keywords are case-insensitive substrings, only ASCII
commas count, a line starting with ``*``/``-`` is a bullet (``lowercase``/``uppercase`` check case
only; IFEval's ``change_case:*`` ids also run langdetect)."""

import json
import time

import pytest

from jaxtune.errors import UserError
from jaxtune.rewards.instructions import (
    SHORT_CHECKERS,
    as_constraints,
    instruction_all,
    instruction_fraction,
    satisfied,
)

HUGE = "word " * 200_000
UNICODE = "ünïcödé wörds ☃ 東京"

# (constraint, passing outputs, failing outputs)
CASES = [
    ({"type": "lowercase"}, ["all lower case here", UNICODE, "cat dog"], ["Not lower", "12345", "ÜNÏCÖDÉ"]),
    ({"type": "uppercase"}, ["ALL CAPS", "ÜNÏCÖDÉ 1"], ["ALL CAPs", "123"]),
    ({"type": "no_commas"}, ["no commas at all", UNICODE, "東京，大阪", "a、b"], ["one, two", "a,b"]),
    ({"type": "word_count", "relation": "at least", "n": 3}, ["one two three", "a b c d", HUGE], ["one two", "...,,,"]),
    ({"type": "word_count", "relation": "at most", "n": 3}, ["one two three", "東京 is big"], ["one two three four", HUGE]),
    ({"type": "word_count", "relation": "exactly", "n": 2}, ["two words.", "ünïcödé wörds"], ["one", "three words here"]),
    ({"type": "sentence_count", "relation": "exactly", "n": 2}, ["First one. Second one!", "Is it? Yes"],
     ["Only one.", "One. Two. Three.", "... !!! ???"]),
    ({"type": "include_keywords", "keywords": ["cat", "Dog"]}, ["The dog saw a CAT.", "catalogue dogma"], ["The cat sat."]),
    ({"type": "forbidden_words", "words": ["bad"]}, ["good things", "badge badly"], ["This is BAD.", "bad"]),
    ({"type": "keyword_frequency", "keyword": "red", "relation": "at least", "n": 2}, ["red and red", "red and reddish"],
     ["red", "Rde"]),
    ({"type": "json_format"}, ['{"a": 1}', '```json\n{"a": [1, 2]}\n```', "[1, 2]"],
     ["{a: 1}", '{"a": 1} and some text', "```\n{oops}\n```", "[" * 100_000]),
    ({"type": "bullet_count", "n": 2}, ["* one\n* two", "- a\n- b\nend", "*no space\n-either"], ["* one", "* a\n* b\n* c", "**bold\n** x"]),
    ({"type": "starts_with", "phrase": "Dear friend"}, ["dear friend, hello"], ["Hello dear friend", " "]),
    ({"type": "ends_with", "phrase": "Is there anything else?"}, ["Done. is there anything else?  "],
     ["Is there anything else? Yes.", "anything else?"]),
    ({"type": "quoted"}, ['"wrapped"', '  "a" and "b"  '], ['"open', "none", '"']),
    ({"type": "paragraph_count", "n": 2}, ["one\n***\ntwo", "a *** b"], ["one", "a *** b *** c", "*** a ***"]),
    # IFEval's remaining instruction types
    ({"type": "letter_frequency", "letter": "e", "relation": "at least", "n": 3}, ["EeE", "tree see"], ["ee", UNICODE]),
    ({"type": "letter_frequency", "letter": "z", "relation": "at most", "n": 0}, ["no such letter", UNICODE], ["Zoo"]),
    ({"type": "capital_word_count", "relation": "at least", "n": 2}, ["NASA and ESA", "I SAW it", "A1 B2 c"],
     ["NASA only", "ÜNÏCÖDÉ"]),
    ({"type": "placeholder_count", "relation": "at least", "n": 2}, ["[name] at [address]", "[a][b]"],
     ["[only one]", "[a\nb] [c", "[" * 100_000]),
    ({"type": "highlight_count", "relation": "at least", "n": 2}, ["*one* and **two**", "*a* *b*"],
     ["**one**", "* * and ** **", "*a\nb* *c", "*" * 100_000]),
    ({"type": "section_count", "splitter": "Section", "relation": "at least", "n": 2},
     ["Section 1\nx\nSection 2\ny", "Section1 a Section 2 b"], ["Section 1 only", "SECTION 1 SECTION 2", "Subsection 1 Section 2"]),
    ({"type": "title"}, ["<<A Poem>>\nroses", "text <<t>>"], ["<< >>", "<<broken\ntitle>>", "<a>", "<<" * 50_000]),
    ({"type": "postscript", "marker": "P.S."}, ["Hi.\nP.S. bye", "hi\np. s. later"], ["PS bye", "P.P bye"]),
    ({"type": "contains_any", "phrases": ["My answer is yes.", "My answer is no."]}, ["Well. My answer is no."],
     ["my answer is yes.", "My answer is maybe."]),
    ({"type": "two_responses"}, ["one\n******\ntwo", "a ****** b ******"], ["a ****** a", "a ****** ****** b", "only one"]),
    ({"type": "paragraph_first_word", "n": 2, "nth": 2, "word": "then"}, ["First.\n\n\"Then, more", "a\n\nthen b"],
     ["First.\n\nNow then", "a\n  \nthen b", "then\n\nthen\n\nthen", "one paragraph then"]),
]


def test_every_checker_has_cases():
    assert {c["type"] for c, _, _ in CASES} == set(SHORT_CHECKERS)
    assert len(SHORT_CHECKERS) >= 10


@pytest.mark.parametrize("constraint, good, bad", CASES, ids=[c["type"] + str(i) for i, (c, _, _) in enumerate(CASES)])
def test_checker(constraint, good, bad):
    [c] = as_constraints(constraint)
    for text in good:
        assert satisfied(text, [c]) == [True], text[:60]
    for text in bad + ["", "   \n"]:  # empty and blank outputs satisfy nothing
        assert satisfied(text, [c]) == [False], text[:60]


def test_huge_outputs_are_fast():
    constraints = as_constraints([{"type": t, **extra} for t, extra in [
        ("word_count", {"relation": "at least", "n": 1}),
        ("include_keywords", {"keywords": ["zebra"]}), ("bullet_count", {"n": 0}), ("json_format", {}),
        ("placeholder_count", {"relation": "at least", "n": 1}), ("highlight_count", {"relation": "at least", "n": 1}),
        ("title", {}), ("postscript", {"marker": "P.S."}), ("paragraph_first_word", {"n": 1, "nth": 1, "word": "a"}),
        ("section_count", {"splitter": "Section", "relation": "at least", "n": 1})]])
    start = time.perf_counter()
    satisfied(" " * 100_000 + HUGE, constraints)
    assert time.perf_counter() - start < 3.0


def test_rewards_read_constraints_from_records():
    constraints = [
        [{"type": "lowercase"}, {"type": "no_commas"}],
        json.dumps({"type": "ends_with", "phrase": "bye"}),  # JSON text and a single dict are accepted
    ]
    completions = ["hello, world", "Good bye"]
    assert instruction_fraction(["p", "p"], completions, constraints=constraints) == [0.5, 1.0]
    assert instruction_all(["p", "p"], completions, constraints=constraints) == [0.0, 1.0]


@pytest.mark.parametrize("bad, message", [
    ({"kind": "lowercase"}, "'type' key"),
    ({"type": "shout"}, "unknown constraint type 'shout'"),
    ({"type": "word_count", "n": 3}, "needs relation"),
    ({"type": "word_count", "relation": "around", "n": 3}, "relation must be one of"),
    ({"type": "bullet_count", "n": -1}, "non-negative integer"),
    ({"type": "include_keywords", "keywords": "cat"}, "list of non-empty strings"),
    ({"type": "ends_with", "phrase": " "}, "non-empty string"),
    ({"type": "letter_frequency", "letter": "ab", "relation": "at least", "n": 1}, "one character"),
    ({"type": "paragraph_first_word", "n": 2, "nth": 3, "word": "x"}, r"nth must be an integer in 1..n \(2\)"),
    ({"type": "contains_any", "phrases": []}, "phrases must be a list of non-empty strings"),
    ({"type": "section_count", "splitter": "", "relation": "at least", "n": 1}, "splitter must be a non-empty string"),
    ([], "non-empty list"),
    ("{not json", "not valid JSON"),
])
def test_bad_constraints_are_user_errors(bad, message):
    with pytest.raises(UserError, match=message):
        instruction_fraction(["p"], ["text"], constraints=[bad])


def test_rewards_read_ifeval_records_too():
    """GRPO on IFEval-format prompts: instruction_id_list + kwargs, scored by the same checkers."""
    ids = [["punctuation:no_comma", "keywords:letter_frequency"], None]
    kwargs = [[{}, {"letter": "#", "let_relation": "at least", "let_frequency": 1}], None]
    completions = ["# heading, with a comma", "anything"]
    assert instruction_fraction(["p", "p"], completions, constraints=[None, None], instruction_id_list=ids,
                                kwargs=kwargs) == [0.5, None]
    assert instruction_all(["p"], ["# no comma"], instruction_id_list=ids[:1], kwargs=kwargs[:1]) == [1.0]
    with pytest.raises(UserError, match="neither a 'constraints' field nor IFEval's"):
        instruction_all(["p"], ["x"])
    with pytest.raises(UserError, match="record 0: field 'kwargs' must be a list with one entry per instruction"):
        instruction_all(["p"], ["x"], instruction_id_list=ids[:1], kwargs=[[{}]])
