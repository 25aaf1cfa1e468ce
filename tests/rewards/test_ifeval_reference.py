"""jaxtune's IFEval verdicts equal Google's reference scorer (as lm-eval runs it) on an adversarial set.

Every one of the 25 instruction ids is checked, strict and loose, on responses built to hit the
reference's edge rules: counts at the boundaries, fenced JSON, decimals and abbreviations in
sentence counts, keyword substrings, non-ASCII punctuation, empty paragraphs, mixed-language text."""


import pytest

from jaxtune.data.ifeval import constraints_from_ifeval
from jaxtune.errors import UserError
from jaxtune.rewards import ifeval_checkers
from jaxtune.rewards.instructions import as_constraints, satisfied, satisfied_loose
from tests.rewards.ifeval_reference import reference, verdicts

LT, AL = "less than", "at least"
# (instruction id, kwargs): several per id, thresholds set at the responses' boundaries
CASES = [
    ("punctuation:no_comma", {}),
    ("change_case:english_lowercase", {}),
    ("change_case:english_capital", {}),
    ("change_case:capital_word_frequency", {"capital_relation": LT, "capital_frequency": 2}),
    ("change_case:capital_word_frequency", {"capital_relation": AL, "capital_frequency": 2}),
    ("language:response_language", {"language": "de"}),
    ("language:response_language", {"language": "en"}),
    ("length_constraints:number_words", {"relation": LT, "num_words": 8}),
    ("length_constraints:number_words", {"relation": AL, "num_words": 8}),
    ("length_constraints:number_sentences", {"relation": LT, "num_sentences": 3}),
    ("length_constraints:number_sentences", {"relation": AL, "num_sentences": 3}),
    ("length_constraints:number_sentences", {"relation": "at least", "num_sentences": 2}),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3}),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"}),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 3, "nth_paragraph": 1, "first_word": "dear"}),
    ("keywords:existence", {"keywords": ["cat", "data"]}),
    ("keywords:existence", {"keywords": ["moon"]}),
    ("keywords:forbidden_words", {"forbidden_words": ["cat", "Dr"]}),
    ("keywords:frequency", {"keyword": "cat", "relation": LT, "frequency": 2}),
    ("keywords:frequency", {"keyword": " data ", "relation": AL, "frequency": 2}),
    ("keywords:letter_frequency", {"letter": "a", "let_relation": LT, "let_frequency": 5}),
    ("keywords:letter_frequency", {"letter": "E", "let_relation": AL, "let_frequency": 3}),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}),
    ("detectable_content:postscript", {"postscript_marker": "Note:"}),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3}),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2}),
    ("detectable_format:multiple_sections", {"section_spliter": " PART ", "num_sections": 1}),
    ("detectable_format:json_format", {}),
    ("detectable_format:title", {}),
    ("detectable_format:constrained_response", {}),
    ("combination:two_responses", {}),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write about cats."}),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}),
    ("startend:quotation", {}),
]

RESPONSES = [
    "",
    "   \n  ",
    "the cat sat on the mat and looked at the moon",
    "THE CAT SAT ON THE MAT. IT WAS HAPPY, VERY HAPPY.",
    "Sure, here it is:\nthe cat sat on the mat and looked at the moon\nHope this helps!",
    "Dr. Smith paid $0.24 at 10 a.m. on Jan. 5. He left. Then he came back!",
    "1. First point. 2. Second point.",
    "It costs 3.50 dollars, i.e. cheap. See e.g. the U.S. market... Fine?",
    "Der Hund läuft schnell über die Straße, und die Katze schläft im Garten. Das Wetter ist schön.",
    "The meeting is tomorrow. Der Hund läuft schnell über die Straße und die Katze schläft.",
    "Concatenate the catalog data; DATA is data.",
    "Kein Komma hier，aber ein chinesisches、und deutsches.",
    "First part\n***\nSecond part",
    "First part\n***\n\n***\nThird part",
    "***\nFirst part\n***\nSecond part\n***",
    "First part *** Second part *** Third",
    "Dear friend,\n\nThen we met.",
    "Dear friend,\n\n\n\nThen we met.\n\nBye",
    "\n\nThen, we met.\n\n\"Then\" again",
    "* one\n* two\n- three",
    "*not a bullet*\n-dash\n  * indented\n**bold** line",
    "*highlight one* and **highlight two** and * * empty and ** **",
    "Section 1\nintro\nSection 2\nbody\nSECTION 3 end",
    "Section1 text Section 2",
    "Intro PART 1 body",
    "```json\n{\"a\": [1, 2.5]}\n```",
    "```\n{\"a\": 1}\n```",
    "Here is JSON:\n```JSON\n{\"a\": 1}\n```",
    "{\"a\": 1,}",
    "<<My Title>>\nbody",
    "<<   >> no title",
    "My answer is yes.",
    "I think: my answer is no.",
    "Response one\n******\nResponse two",
    "Same\n******\nSame",
    "One\n******\n\n******\nTwo",
    "******\nA\n******\nB",
    "write about cats. Cats are great.",
    "Write about cats.",
    "Thanks! Any other questions?",
    "\"Thanks! Any other questions?\"",
    "Thanks! any other questions?\n",
    "\"quoted\"",
    "\"",
    "\u201csmart quotes\u201d",
    "Fill in [name] and [address] and [ ]",
    "Answer here.\nP.S. see you",
    "Answer here.\np. s. see you",
    "Answer.\nP.P.S more",
    "Answer.\nNote: nothing",
    "USA and NASA and the U.S. and A1 and I am OK",
    "aaaa eee AAA E",
    "Je pense donc je suis, et c'est très bien ainsi pour nous tous.",
    "日本語のテキストです。句読点、あります。",
    "12345 67890",
    "[a] [b\n c] [[x]] [",
    "<<a>> and <<b>>\n<<>> <<x",
    "<<<>>>\n<< >> >>",
    "Mid-line p.s.: inline postscript",
    "PPS: p. p. s late",
]


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    return reference(str(tmp_path_factory.mktemp("nltk_data")))


def test_every_instruction_id_is_covered():
    assert {i for i, _ in CASES} == set(ifeval_checkers.CHECKERS)
    assert len(ifeval_checkers.CHECKERS) == 25


@pytest.mark.parametrize("instruction,kwargs", CASES, ids=[f"{i}-{n}" for n, (i, _) in enumerate(CASES)])
def test_verdicts_equal_the_reference(ref, instruction, kwargs):
    record = {"key": 1, "prompt": "Write about cats.", "instruction_id_list": [instruction], "kwargs": [kwargs]}
    constraints = as_constraints(constraints_from_ifeval(record, "test"))
    mismatches = []
    for response in RESPONSES:
        ours = (satisfied(response, constraints), satisfied_loose(response, constraints))
        theirs = verdicts(ref, record, response)
        if ours != theirs:
            mismatches.append((response, ours, theirs))
    assert not mismatches


def test_whole_records_and_prompt_level_equal_the_reference(ref):
    """Records with several instructions (IFEval's shape): per-instruction strict and loose lists."""
    record = {"key": 7, "prompt": "Write about cats.", "instruction_id_list": [i for i, _ in CASES[:20]],
              "kwargs": [k for _, k in CASES[:20]]}
    constraints = as_constraints(constraints_from_ifeval(record, "test"))
    for response in RESPONSES:
        assert (satisfied(response, constraints), satisfied_loose(response, constraints)) == \
            verdicts(ref, record, response), response


def test_non_letter_letter_kwarg_is_counted_as_given():
    """Google's prompts ask for '#' and '!': counted as given (lm-eval swaps in a random letter)."""
    constraints = as_constraints([{"type": "keywords:letter_frequency", "letter": "#", "let_relation": AL,
                                   "let_frequency": 3}])
    assert satisfied("# a\n## b", constraints) == [True]
    assert satisfied("# a\n# b", constraints) == [False]


def test_sentences_and_words_follow_nltk_punkt():
    assert len(ifeval_checkers.sentences("Dr. Smith paid $0.24 at 10 a.m. today. He left.")) == 2
    assert ifeval_checkers.word_tokens("It's the U.S. market.") == ["It", "'s", "the", "U.S.", "market", "."]


def test_punkt_tab_install_makes_nltk_work_offline(tmp_path, monkeypatch):
    import nltk
    from nltk.tokenize.punkt import PunktTokenizer

    ifeval_checkers.install_punkt_tab(tmp_path)
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])  # only our tables are visible
    nltk_tokenizer = PunktTokenizer("english")
    assert "dr" in nltk_tokenizer._params.abbrev_types
    text = "Mr. Li came at 5 p.m. on Jan. 3. He sat."
    assert nltk_tokenizer.tokenize(text) == ifeval_checkers.sentences(text) == ["Mr. Li came at 5 p.m. on Jan. 3.", "He sat."]


@pytest.mark.parametrize("kwargs,needle", [
    ({"relation": "more than", "num_words": 3}, "kwarg 'relation' must be one of 'less than', 'at least'"),
    ({"relation": LT}, "needs kwarg 'num_words'"),
    ({"relation": LT, "num_words": -1}, "kwarg 'num_words' must be a non-negative integer"),
])
def test_bad_kwargs_name_the_record_and_key(kwargs, needle):
    record = {"prompt": "p", "instruction_id_list": ["length_constraints:number_words"], "kwargs": [kwargs]}
    with pytest.raises(UserError, match=needle):
        as_constraints(constraints_from_ifeval(record, "f.jsonl:3"), "f.jsonl:3")


def test_unknown_id_and_bad_regex_are_errors():
    with pytest.raises(UserError, match="unknown constraint type 'keywords:rhyme'"):
        as_constraints([{"type": "keywords:rhyme"}])
    with pytest.raises(UserError, match="regular expression"):
        as_constraints([{"type": "keywords:existence", "keywords": ["c++("]}])
