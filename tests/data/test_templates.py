"""Tests for FLAN-style template rendering."""

import collections

import numpy as np
import pytest

from jaxtune.data.templates import TemplateError, choose_template, render, render_example, template_fields

FIELDS = {"word": "big red cat", "n": "3", "answer": "CAT"}
PATTERN = "Please write the following word in capital letters right now: {word}\nAnswer:"


def test_render_fills_fields_and_unescapes_braces():
    assert render("Say {word} {n} times {{ok}}", FIELDS) == "Say big red cat 3 times {ok}"
    assert render("{{{word}}}", FIELDS) == "{big red cat}"
    assert render("no fields", {}) == "no fields"
    assert render("{n}", {"n": 7}) == "7"


def test_template_fields_in_order_without_duplicates():
    assert template_fields("{b} {a} {{c}} {b}") == ["b", "a"]
    assert template_fields("plain") == []


def test_missing_field_error_names_template_field_and_available():
    with pytest.raises(TemplateError) as e:
        render("Count {letters}", FIELDS, where="task 'count', template 3")
    msg = str(e.value)
    assert "task 'count', template 3" in msg
    assert "'letters'" in msg
    for name in FIELDS:
        assert name in msg


def test_render_example_error_names_task_and_template_index():
    templates = [("Count {letters}", "{answer}")]
    with pytest.raises(TemplateError, match=r"task 'count', template 0.*'letters'"):
        render_example(templates, FIELDS, seed=0, index=0, task="count")


@pytest.mark.parametrize("bad", ["{word", "word}", "{0}", "{}", "{word:>5}", "{word!r}", "{a.b}"])
def test_malformed_patterns_raise_template_error(bad):
    with pytest.raises(TemplateError, match="t1"):
        render(bad, FIELDS, where="t1")


def test_template_error_is_value_error():
    assert issubclass(TemplateError, ValueError)


def test_word_dropout_zero_is_identity():
    rng = np.random.default_rng(0)
    assert render(PATTERN, FIELDS, word_dropout=0.0, rng=rng) == render(PATTERN, FIELDS)


def test_word_dropout_never_touches_field_values():
    rng = np.random.default_rng(0)
    pattern_words = set(PATTERN.replace("{word}", "").split())
    seen_drop = False
    for _ in range(200):
        out = render(PATTERN, FIELDS, word_dropout=0.5, rng=rng)
        assert FIELDS["word"] in out
        literal = out.replace(FIELDS["word"], "").split()
        assert set(literal) <= pattern_words
        assert out == out.strip() and "  " not in out
        seen_drop |= len(literal) < len(pattern_words)
    assert seen_drop


def test_word_dropout_keeps_text_glued_to_fields():
    rng = np.random.default_rng(0)
    for _ in range(100):
        out = render("Take the {n}th item of ({word}) now", FIELDS, word_dropout=0.9, rng=rng)
        assert "3th" in out and "(big red cat)" in out


def test_word_dropout_drops_about_p_of_words():
    rng = np.random.default_rng(1)
    pattern = " ".join(f"w{i}" for i in range(50)) + " {word}"
    kept = [len(render(pattern, FIELDS, word_dropout=0.2, rng=rng).split()) - 3 for _ in range(200)]
    assert 0.75 < np.mean(kept) / 50 < 0.85


def test_word_dropout_needs_rng_and_valid_probability():
    with pytest.raises(ValueError):
        render(PATTERN, FIELDS, word_dropout=0.1)
    with pytest.raises(ValueError):
        render(PATTERN, FIELDS, word_dropout=1.0, rng=np.random.default_rng(0))


def test_render_example_is_deterministic_per_seed_and_index():
    templates = [(PATTERN, "{answer}"), ("{word} in caps:", "{answer}"), ("Caps: {word}", "{answer}")]
    kwargs = dict(seed=5, word_dropout=0.3, task="uppercase")
    first = [render_example(templates, FIELDS, index=i, **kwargs) for i in range(50)]
    again = [render_example(templates, FIELDS, index=i, **kwargs) for i in reversed(range(50))][::-1]
    assert first == again
    assert all(target == "CAT" for _, target in first)  # dropout never touches targets
    other_seed = [render_example(templates, FIELDS, index=i, seed=6, word_dropout=0.3) for i in range(50)]
    assert other_seed != first


def test_choose_template_deterministic_and_roughly_uniform():
    templates = [(f"t{i} {{word}}", "{answer}") for i in range(8)]
    picks = [choose_template(templates, seed=3, index=i) for i in range(8000)]
    assert picks == [choose_template(templates, seed=3, index=i) for i in range(8000)]
    counts = collections.Counter(picks)
    assert set(counts) == set(range(8))
    assert all(800 < c < 1200 for c in counts.values())
    assert picks != [choose_template(templates, seed=4, index=i) for i in range(8000)]


def test_choose_template_rejects_empty():
    with pytest.raises(TemplateError):
        choose_template([], seed=0, index=0)
