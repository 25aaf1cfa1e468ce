import random

import pytest

from jaxtune.datatools.decontaminate import DecontaminationSettings, decontaminate
from jaxtune.datatools.records import RecordSet
from jaxtune.errors import UserError
from tests.datatools.planted import sentence, unique_records


def _set(name, records):
    return RecordSet(name, [{**r, "_where": f"{name}.jsonl:{i + 1}"} for i, r in enumerate(records)], f"{name}.jsonl")


def planted():
    """50 training records; 3 contain 13 consecutive words of an eval question (inside longer text,
    other case and punctuation), 1 contains only 12 of them (not contaminated at n=13)."""
    rng = random.Random(7)
    evals = [{"question": sentence(rng, 30), "answer": sentence(rng, 3)} for _ in range(10)]
    train = unique_records(50, seed=8)

    def copy(k, start, length):
        return ", ".join(evals[k]["question"].split()[start : start + length]).upper()

    train[4]["instruction"] = sentence(rng, 10) + " " + copy(2, 0, 13) + " " + sentence(rng, 5)
    train[17]["output"] = copy(5, 10, 20)
    train[30]["input"] = copy(9, 17, 13)
    train[41]["instruction"] = copy(1, 3, 12) + " " + sentence(rng, 10)  # one word short
    return train, evals


def test_finds_planted_overlaps_with_exact_counts_ids_and_ngrams():
    train, evals = planted()
    result = decontaminate([_set("train", train)], [_set("heldout", evals)])
    report = result.report(DecontaminationSettings())
    t = report["train"]["train"]
    assert (t["records"], t["contaminated"], t["kept"]) == (50, 3, 47)
    assert [(e["id"], e["eval_id"]) for e in t["examples"]] == [
        ("train.jsonl:5", "heldout.jsonl:3"), ("train.jsonl:18", "heldout.jsonl:6"), ("train.jsonl:31", "heldout.jsonl:10")]
    first = t["examples"][0]
    assert first["ngram"] == " ".join(evals[2]["question"].split()[:13])
    assert first["shared_ngrams"] == 1 and t["examples"][1]["shared_ngrams"] == 8  # 20 copied words: 8 13-grams
    e = report["eval"]["heldout"]
    assert (e["examples"], e["training_records_contaminated"], e["too_short"]) == (10, 3, 0)
    assert e["eval_ids_matched"] == ["heldout.jsonl:10", "heldout.jsonl:3", "heldout.jsonl:6"]
    assert len(result.kept_records("train")) == 47
    assert "3 of 50 training records share a 13-gram" in result.summary()


def test_n_fraction_and_fields_are_configurable():
    train, evals = planted()
    sets, held = [_set("train", train)], [_set("heldout", evals)]
    assert len(decontaminate(sets, held, DecontaminationSettings(n=12)).contaminated) == 4  # the 12-word copy counts
    # Shared / distinct 13-grams: line 5: 1/16 (28-word instruction), line 18: 8/36 (20 copied words
    # in the output, 40-word instruction), line 31: 1/29 (13-word input, 40-word instruction).
    for fraction, lines in ((0.05, [5, 18]), (0.2, [18]), (0.25, [])):
        found = decontaminate(sets, held, DecontaminationSettings(fraction=fraction)).contaminated
        assert [c.id for c in found] == [f"train.jsonl:{line}" for line in lines]
        assert [c.shared / c.total for c in found] == [{5: 1 / 16, 18: 8 / 36}[line] for line in lines]
    only_output = decontaminate(sets, held, DecontaminationSettings(fields=("output",))).contaminated
    assert [c.id for c in only_output] == ["train.jsonl:18"]
    answers_only = decontaminate(sets, held, DecontaminationSettings(eval_fields=("answer",)))
    assert not answers_only.contaminated and answers_only.index.too_short == {"heldout": 10}


def test_eval_sets_are_attributed_and_bad_settings_rejected():
    train, evals = planted()
    result = decontaminate([_set("a", train[:20]), _set("b", train[20:])], [_set("e1", evals[:5]), _set("e2", evals[5:])])
    report = result.report(DecontaminationSettings())
    assert {k: v["contaminated"] for k, v in report["train"].items()} == {"a": 2, "b": 1}
    assert report["eval"]["e1"]["per_training_set"] == {"a": 1, "b": 0}
    assert report["eval"]["e2"]["per_training_set"] == {"a": 1, "b": 1}
    with pytest.raises(UserError, match="fraction"):
        decontaminate([_set("a", train)], [_set("e", evals)], DecontaminationSettings(fraction=1.5))
    with pytest.raises(UserError, match="no evaluation sets"):
        decontaminate([_set("a", train)], [])
