"""Tests for the procedurally generated quickstart task families."""

import collections
import itertools
import re
import string

import numpy as np
import pytest

from jaxtune.data.builtin import quickstart
from jaxtune.data.builtin.quickstart import FAMILIES, generate_records, templates, tokenizer_corpus
from jaxtune.data.templates import render, render_example, template_fields
from jaxtune.data.tokenizers import train_sentencepiece

MAX_TOKENS = 48


@pytest.fixture(scope="module")
def records():
    return generate_records(1100, seed=1)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_sentencepiece(tokenizer_corpus(seed=0), tmp_path_factory.mktemp("tok") / "qs", vocab_size=512)


def _words(pattern):
    return {w.lower().strip(".,:?!") for w in re.sub(r"\{\w+\}", " ", pattern).split()}


def test_family_count_and_template_counts():
    assert len(FAMILIES) >= 10
    for name, family in FAMILIES.items():
        assert family.name == name
        assert len(family.train_templates) >= 6, name
        assert len(family.heldout_templates) >= 2, name
        assert not set(family.train_templates) & set(family.heldout_templates), name


def test_training_phrasings_put_instruction_both_before_and_after_input():
    for name, family in FAMILIES.items():
        first_text = [p.split("{", 1)[0] for p, _ in family.train_templates]
        assert any(t == "" for t in first_text), f"{name}: no phrasing with the input first"
        assert any(len(t.split()) >= 2 for t in first_text), f"{name}: no phrasing with the instruction first"


def test_heldout_phrasings_use_only_words_seen_in_training():
    seen = set().union(*(_words(p) for f in FAMILIES.values() for p, _ in f.train_templates))
    for name, family in FAMILIES.items():
        own = {p for p, _ in family.train_templates}
        for pattern, _ in family.heldout_templates:
            assert _words(pattern) <= seen, (name, pattern, _words(pattern) - seen)
            assert pattern not in own


def test_templates_splits():
    train, heldout = templates("train"), templates("heldout")
    assert set(train) == set(heldout) == set(FAMILIES)
    assert train["count"] == FAMILIES["count"].train_templates
    with pytest.raises(ValueError, match="validation"):
        templates("validation")


def test_generate_records_deterministic_balanced_and_prefix_stable(records):
    assert generate_records(1100, seed=1) == records
    assert generate_records(50, seed=1) == records[:50]
    assert generate_records(50, seed=2) != records[:50]
    counts = collections.Counter(r["task"] for r in records)
    assert set(counts) == set(FAMILIES) and len(set(counts.values())) == 1
    assert all(isinstance(v, str) for r in records for v in r.values())


def test_every_template_field_is_in_every_record(records):
    for r in records:
        family = FAMILIES[r["task"]]
        for input_pattern, target_pattern in family.train_templates + family.heldout_templates:
            assert set(template_fields(input_pattern) + template_fields(target_pattern)) <= set(r), r
        assert r["answer"]


def _by_task(records):
    out = collections.defaultdict(list)
    for r in records:
        out[r["task"]].append(r)
    return out


def test_answers_are_correct(records):
    checks = {
        "uppercase": lambda r: r["word"].upper(),
        "count": lambda r: str(len(r["items"].split())),
        "opposite": lambda r: quickstart.OPPOSITES[r["word"]],
        "next_number": lambda r: str(int(r["number"]) + 1),
        "repeat": lambda r: " ".join([r["word"]] * int(r["times"])),
        "first_item": lambda r: r["items"].split()[0],
        "last_item": lambda r: r["items"].split()[-1],
        "sort_digits": lambda r: " ".join(sorted(r["digits"].split())),
        "reverse": lambda r: " ".join(r["letters"].split()[::-1]),
        "category": lambda r: next(c for c, ws in quickstart.CATEGORIES.items() if r["word"] in ws),
        "next_letter": lambda r: string.ascii_lowercase[string.ascii_lowercase.index(r["letter"]) + 1],
    }
    by_task = _by_task(records)
    for name in FAMILIES:
        assert name in checks, f"add an answer check for family {name!r}"
        for r in by_task[name]:
            assert r["answer"] == checks[name](r), r


def test_opposites_are_symmetric_and_categories_disjoint():
    assert all(quickstart.OPPOSITES[b] == a for a, b in quickstart.OPPOSITES.items())
    assert len(quickstart.WORDS) == len(set(quickstart.WORDS))


def test_inputs_vary(records):
    by_task = _by_task(records)
    for name, rs in by_task.items():
        assert len({tuple(sorted(r.items())) for r in rs}) > 10, name


def test_heldout_eval_inputs_mostly_unseen_for_rich_families():
    train = {tuple(sorted(r.items())) for r in generate_records(5000, seed=0)}
    evals = [r for r in generate_records(500, seed=1) if r["task"] in ("count", "first_item", "last_item")]
    unseen = [tuple(sorted(r.items())) not in train for r in evals]
    assert np.mean(unseen) > 0.5


def test_rendered_examples_fit_token_budget(tok, records):
    lengths = collections.defaultdict(list)
    for r in records[:330]:
        family = FAMILIES[r["task"]]
        for input_pattern, target_pattern in family.train_templates + family.heldout_templates:
            prompt, target = render(input_pattern, r), render(target_pattern, r)
            n = len(tok.encode(prompt)) + len(tok.encode(target))
            assert n <= MAX_TOKENS, (prompt, target, n)
            assert tok.decode(tok.encode(prompt)) == prompt
            lengths[r["task"]].append(n)
    assert set(lengths) == set(FAMILIES)


def test_every_template_word_is_in_vocab(tok, records):
    """Template text never needs byte-fallback pieces and nothing maps to <unk>.

    (A rare uppercase letter in an answer may use a byte piece: still one lossless token.)
    """
    by_task = _by_task(records)
    for name, family in FAMILIES.items():
        for input_pattern, target_pattern in family.train_templates + family.heldout_templates:
            literal = re.sub(r"\{\w+\}", " ", input_pattern)
            pieces = [tok.id_to_piece(i) for i in tok.encode(literal)]
            assert not [p for p in pieces if p.startswith("<")], (literal, pieces)
            for r in by_task[name][:20]:
                for text in (render(input_pattern, r), render(target_pattern, r)):
                    assert 3 not in tok.encode(text), text


def test_render_example_with_dropout_on_quickstart(records):
    train = templates("train")
    for i, r in enumerate(records[:200]):
        prompt, target = render_example(train[r["task"]], r, seed=0, index=i, word_dropout=0.15, task=r["task"])
        assert target == r["answer"]
        assert prompt
