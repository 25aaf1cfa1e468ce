import pytest

from jaxtune.datatools import quality
from jaxtune.datatools.quality import QualityFilters, select_diverse
from jaxtune.errors import UserError
from tests.datatools.planted import one_word_changed, unique_records


def _reason(filters, **record):
    return filters.reason({"_where": "f:1", **record})


def test_length_bounds_in_words_and_chars():
    f = QualityFilters(min_words=3, max_words=5)
    assert _reason(f, instruction="one two", output="") == "words: 2 outside [3, 5]"
    assert _reason(f, instruction="one two", output="three") is None
    assert _reason(f, instruction="a b c d e f") == "words: 6 outside [3, 5]"
    assert _reason(QualityFilters(max_chars=9), output="0123456789") == "chars: 10 outside [0, 9]"
    assert _reason(QualityFilters(min_chars=3, fields=("output",)), instruction="long enough", output="ab") == \
        "chars: 2 outside [3, inf]"


def test_script_fraction():
    assert quality.script_of("a") == "latin" and quality.script_of("ж") == "cyrillic" and quality.script_of("東") == "cjk"
    assert quality.script_fraction("abc жж", ["latin"]) == 0.6
    assert quality.script_fraction("1234 !!", ["latin"]) == 1.0  # no letters: nothing to judge
    assert quality.script_fraction("café", ["ascii"]) == 0.75
    f = QualityFilters(scripts=("latin",), min_script_fraction=0.9)
    assert _reason(f, output="hello мир") == "scripts: 0.62 of letters in latin (< 0.9)"
    assert _reason(f, output="hello wörld") is None
    assert _reason(QualityFilters(scripts=("latin", "cyrillic")), output="hello мир") is None


def test_repetition_rules():
    assert quality.duplicate_line_fraction(["a\nb\na\n\na", "b"]) == 0.6  # 3 of 5 non-blank lines repeat
    assert quality.top_ngram_fraction("ab cd ab cd ab".split(), 2) == pytest.approx(8 / 10)  # "ab cd" x2
    assert quality.top_ngram_fraction("ab cd ef".split(), 2) == 0.0  # nothing repeats
    f = QualityFilters(max_duplicate_line_fraction=0.3)
    assert _reason(f, output="x\ny\nx\nx") == "duplicate_lines: 0.50 of lines repeated (> 0.3)"
    assert _reason(f, output="x\ny\nz") is None
    g = QualityFilters(max_top_ngram_fraction=0.2)
    assert _reason(g, output="buy now buy now buy now today") == "top_ngram: the top 2-gram covers 0.78 of characters (> 0.2)"  # 3 x 6 of 23
    assert _reason(g, output="a varied sentence without any repeated pair") is None


def test_answer_format_checks():
    f = QualityFilters(nonempty=("output",), regex=(("output", r"^\d+$"),))
    assert _reason(f, output="  ") == "nonempty: field 'output' is blank"
    assert _reason(f, output="42") is None
    assert _reason(f, output="forty two") == "regex: field 'output' does not match '^\\\\d+$'"
    kept, dropped = quality.apply_filters([{"output": "1"}, {"output": ""}, {"output": "x"}], f)
    assert kept == [0] and [i for i, _ in dropped] == [1, 2]


def test_from_dict_and_checks():
    f = QualityFilters.from_dict({"min_words": 2, "nonempty": "output", "regex": {"output": "."}}, "data.tasks.t.filters")
    assert f.nonempty == ("output",) and f.regex == (("output", "."),) and f.active
    assert not QualityFilters(fields=("x",)).active
    with pytest.raises(UserError, match="'data.tasks.t.filters.min_word' is not a filter; did you mean 'min_words'"):
        QualityFilters.from_dict({"min_word": 2}, "data.tasks.t.filters")
    with pytest.raises(UserError, match="min_words=5 is above max_words=2"):
        QualityFilters(min_words=5, max_words=2).check()
    with pytest.raises(UserError, match="does not compile"):
        QualityFilters(regex=(("output", "("),)).check()
    with pytest.raises(UserError, match="fraction in"):
        QualityFilters(max_top_ngram_fraction=2.0).check()


def test_select_diverse_picks_one_record_per_cluster():
    # Three topics, each as 6 near-copies (one word changed): the 3 most diverse are one of each.
    topics = unique_records(3, seed=11, words=60)
    records = [one_word_changed(t, position=k * 9) for k in range(6) for t in topics]
    chosen = select_diverse(records, 3)
    assert sorted(i % 3 for i in chosen) == [0, 1, 2]
    assert select_diverse(records, 3) == chosen  # deterministic
    assert len(set(select_diverse(records, 6))) == 6
    assert select_diverse(records[:2], 5) == [0, 1]
    # Distinct records beat near-copies: 5 distinct + 5 copies of the first -> the distinct ones.
    distinct = unique_records(5, seed=12, words=30)
    mixed = distinct + [one_word_changed(distinct[0], k) for k in range(5)]
    assert sorted(select_diverse(mixed, 5)) in ([0, 1, 2, 3, 4], [1, 2, 3, 4, 5], [1, 2, 3, 4, 6], [1, 2, 3, 4, 7],
                                               [1, 2, 3, 4, 8], [1, 2, 3, 4, 9])
    with pytest.raises(UserError, match="N must be >= 1"):
        select_diverse(records, 0)


def test_gopher_quality_rules_use_the_published_thresholds_and_take_overrides():
    from jaxtune.datatools import gopher

    assert gopher.parameters("quality")["min_doc_words"] == 50 and gopher.parameters("repetition")["dup_line_frac"] == 0.3
    text = "the cat sat with the dog and they had to be friends of the house that night"  # 17 words
    record = {"instruction": "Tell a story.", "input": "", "output": text}
    assert quality.QualityFilters(gopher=("quality",)).reason(record).startswith("gopher_quality.gopher_short_doc")
    assert quality.QualityFilters(gopher=("quality",), gopher_overrides=(("min_doc_words", 10),)).reason(record) is None
    no_stop_words = {"instruction": "List fruit.", "input": "", "output": "apple banana cherry grape melon " * 3}
    assert quality.QualityFilters(gopher=("quality",), gopher_overrides=(("min_doc_words", 10),)).reason(
        no_stop_words).startswith("gopher_quality.gopher_enough_stop_words")
    config = quality.QualityFilters.from_dict({"gopher": "quality", "gopher_overrides": {"min_doc_words": 10}}, "f")
    assert config.gopher_overrides == (("min_doc_words", 10),) and config.reason(record) is None


def test_language_identification_uses_the_packaged_lid176_model():
    from jaxtune.datatools import langid

    assert langid.identify("Le comité s'est réuni mardi pour examiner le budget.")[0] == "fr"
    assert langid.identify("The committee met on Tuesday to review the budget.")[0] == "en"
    assert langid.identify("12345 !!!") == ("", 0.0)
    f = quality.QualityFilters(languages=("en",))
    assert f.reason({"output": "Der Ausschuss hat am Dienstag den Haushalt geprüft."}).startswith("language: lid.176 says de")
