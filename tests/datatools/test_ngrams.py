import pytest

from jaxtune.data.sources import SourceError
from jaxtune.datatools import ngrams


def test_words_are_normalised_unicode_word_tokens():
    assert ngrams.words("Hello, WORLD!  Straße ﬁne café's 42") == ["hello", "world", "strasse", "fine", "café", "s", "42"]
    assert ngrams.words("Привет, мир — 東京") == ["привет", "мир", "東京"]
    assert ngrams.words(" ,.; ") == []


def test_ngrams_and_shingles():
    tokens = "a b c d".split()
    assert ngrams.ngrams(tokens, 2) == ["a b", "b c", "c d"]
    assert ngrams.ngrams(tokens, 5) == []
    assert ngrams.shingles(tokens, 5) == {"a b c d"}  # shorter than n: the text itself
    assert ngrams.shingles(["x", "y", "x", "y"], 2) == {"x y", "y x"}
    assert ngrams.shingles([], 3) == set()


def test_text_fields_default_named_and_nested():
    record = {"instruction": "Do it", "input": "", "instances": [{"input": "a", "output": "b"}],
              "messages": [{"role": "user", "content": "hi"}], "n": 3, "_where": "f.jsonl:1"}
    assert ngrams.text_fields(record) == ["Do it", "", "a", "b", "hi"]  # no role, no _where, no numbers
    assert ngrams.text_fields(record, ("instances.0.output", "instruction")) == ["b", "Do it"]
    assert ngrams.record_words(record, ("messages",)) == [["hi"]]
    with pytest.raises(SourceError, match=r"f.jsonl:1: no field 'output'; available fields: .*instruction"):
        ngrams.text_fields(record, ("output",))
