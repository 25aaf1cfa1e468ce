import random
from dataclasses import replace

import pytest

from jaxtune.datatools.decontaminate import DecontaminationSettings, decontaminate
from jaxtune.datatools.records import RecordSet
from jaxtune.errors import UserError
from tests.datatools.planted import sentence, unique_records

# GPT-3 style: any shared 13-gram, prompts and answers (the defaults before Tulu-3 coverage)
ANY_13GRAM = DecontaminationSettings(n=13, threshold=0.0, part="all")


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
    result = decontaminate([_set("train", train)], [_set("heldout", evals)], ANY_13GRAM)
    report = result.report()
    t = report["train"]["train"]
    assert (t["records"], t["contaminated"], t["kept"]) == (50, 3, 47)
    assert [(e["id"], e["eval_id"]) for e in t["examples"]] == [
        ("train.jsonl:5", "heldout.jsonl:3"), ("train.jsonl:18", "heldout.jsonl:6"), ("train.jsonl:31", "heldout.jsonl:10")]
    first = t["examples"][0]
    assert first["text"] == " ".join(evals[2]["question"].split()[:13]) and first["how"] == "ngram"
    # coverage: copied words of the 33-word item (30-word question + 3-word answer)
    assert [e["coverage"] for e in t["examples"]] == [round(13 / 33, 4), round(20 / 33, 4), round(13 / 33, 4)]
    assert t["fields_compared"] == {"instruction,input,output": 50}
    e = report["eval"]["heldout"]
    assert (e["examples"], e["training_records_contaminated"], e["matched_whole"], e["n"]) == (10, 3, 0, 13)
    assert e["eval_ids_matched"] == ["heldout.jsonl:10", "heldout.jsonl:3", "heldout.jsonl:6"]
    assert [x["train_id"] for x in e["examples_matched"]] == ["train.jsonl:5", "train.jsonl:18", "train.jsonl:31"]
    assert len(list(result.kept_records("train"))) == 47
    assert "3 of 50 training records cover >= 0 of an eval item with 13-grams (all text" in result.summary()


def test_n_threshold_and_fields_are_configurable():
    train, evals = planted()
    sets, held = [_set("train", train)], [_set("heldout", evals)]
    assert len(decontaminate(sets, held, replace(ANY_13GRAM, n=12)).contaminated) == 4  # the 12-word copy counts
    # Coverage of the 33-word eval items: lines 5 and 31 copy 13 words (0.39), line 18 copies 20 (0.61).
    for threshold, lines in ((0.39, [5, 18, 31]), (0.4, [18]), (20 / 33, [18]), (0.61, [])):
        found = decontaminate(sets, held, replace(ANY_13GRAM, threshold=threshold)).contaminated
        assert [c.id for c in found] == [f"train.jsonl:{line}" for line in lines]
    only_output = decontaminate(sets, held, replace(ANY_13GRAM, fields=("output",))).contaminated
    assert [c.id for c in only_output] == ["train.jsonl:18"]
    answers_only = decontaminate(sets, held, replace(ANY_13GRAM, eval_fields=("answer",)))
    assert not answers_only.contaminated and answers_only.index.too_short == {"heldout": 10}  # 3 words: matched whole


def test_eval_sets_are_attributed_and_bad_settings_rejected():
    train, evals = planted()
    result = decontaminate([_set("a", train[:20]), _set("b", train[20:])], [_set("e1", evals[:5]), _set("e2", evals[5:])],
                           ANY_13GRAM)
    report = result.report()
    assert {k: v["contaminated"] for k, v in report["train"].items()} == {"a": 2, "b": 1}
    assert report["eval"]["e1"]["per_training_set"] == {"a": 1, "b": 0}
    assert report["eval"]["e2"]["per_training_set"] == {"a": 1, "b": 1}
    for bad, message in (({"threshold": 1.5}, "threshold must be in"), ({"mode": "fuzzy"}, "mode must be one of"),
                         ({"part": "answers"}, "part must be one of"), ({"eval_n": (("e", 0),)}, "n of e"),
                         ({"min_words": -1}, "min_words")):
        with pytest.raises(UserError, match=message):
            decontaminate([_set("a", train)], [_set("e", evals)], DecontaminationSettings(**bad))
    with pytest.raises(UserError, match="--eval_n names nope, which is not an evaluation set"):
        decontaminate([_set("a", train)], [_set("e", evals)], DecontaminationSettings(eval_n=(("nope", 5),)))
    with pytest.raises(UserError, match="no evaluation sets"):
        decontaminate([_set("a", train)], [])


def _chat(user, assistant):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}], "id": "x"}


def tulu_planted():
    """Eval prompts of 20 words (4 of 5 words, short ones matched whole) and chat training data with
    planted prompt overlaps at known 8-gram coverage, and overlaps that are only in the answers."""
    rng = random.Random(11)
    long_items = [{"prompt": sentence(rng, 20), "answer": "Sure, here is the answer you asked for in detail now"}
                  for _ in range(6)]
    short_items = [{"prompt": sentence(rng, 4), "answer": "yes"}, {"prompt": sentence(rng, 5), "answer": "no"}]
    evals = long_items + short_items
    words = [e["prompt"].split() for e in long_items]
    train = [_chat(sentence(rng, 30), sentence(rng, 20)) for _ in range(30)]
    expected = {}
    # Prompt overlaps by coverage (20-word items): 12 copied words cover 0.6, 10 cover 0.5, 9 cover 0.45.
    train[2] = _chat(sentence(rng, 6) + " " + " ".join(words[0][:12]).upper() + ", " + sentence(rng, 4), "fine")
    expected[3] = 12 / 20
    train[7] = _chat(" ".join(words[1][5:15]) + " " + sentence(rng, 10), "fine")
    expected[8] = 10 / 20
    train[11] = _chat(" ".join(words[2][:9]) + " " + sentence(rng, 10), "fine")  # 0.45: below 0.5
    # Split over two user turns: each turn covers 8 words, together 16/20 (n-grams never span turns).
    train[13] = {"messages": [{"role": "user", "content": " ".join(words[3][:8])}, {"role": "assistant", "content": "ok"},
                              {"role": "user", "content": " ".join(words[3][12:])}]}
    expected[14] = 16 / 20
    # Only in the answer: the whole eval prompt, and the eval answers' generic phrase.
    train[17] = _chat(sentence(rng, 12), long_items[4]["prompt"])
    train[19] = _chat(sentence(rng, 12), "Sure, here is the answer you asked for in detail now")
    # Short eval items: a training prompt equal to one (other case and punctuation) is matched whole;
    # the same words inside a longer prompt are not.
    train[23] = _chat(short_items[0]["prompt"].title() + "?", "ok")
    expected[24] = 1.0
    train[26] = _chat("please " + short_items[1]["prompt"] + " and more words here", "ok")
    return train, evals, expected


def test_prompt_only_coverage_finds_planted_overlaps_and_ignores_answers():
    train, evals, expected = tulu_planted()
    result = decontaminate([_set("chat", train)], [_set("bench", evals)])  # defaults: Tulu 3 (8-grams, 0.5, prompts)
    found = {int(c.id.rsplit(":", 1)[1]): round(c.match.coverage, 4) for c in result.contaminated}
    assert found == {line: round(v, 4) for line, v in expected.items()}
    assert {int(c.id.rsplit(":", 1)[1]): c.match.how for c in result.contaminated}[24] == "whole"
    report = result.report()
    assert report["train"]["chat"]["fields_compared"] == {"messages[user].content": 30}
    bench = report["eval"]["bench"]
    assert (bench["n"], bench["matched_whole"], bench["training_records_contaminated"]) == (8, 2, 4)
    assert bench["fields_compared"] == {"prompt": 8}
    assert "4 of 30 training records cover >= 0.5 of an eval item with 8-grams (prompt text" in result.summary()
    # Comparing answers too, any shared 8-gram: the answer-only copies count (the generic phrase is in the eval answers).
    everything = decontaminate([_set("chat", train)], [_set("bench", evals)],
                               DecontaminationSettings(part="all", threshold=0.0))
    assert {18, 20} <= {int(c.id.rsplit(":", 1)[1]) for c in everything.contaminated}


def test_exact_mode_per_set_n_and_workers():
    train, evals, _ = tulu_planted()
    sets = [_set("chat", train)]
    exact = decontaminate(sets, [_set("bench", evals)], DecontaminationSettings(mode="exact"))
    # exact: the whole prompt as a phrase in a user turn - the equal short item and the short item inside a prompt
    assert sorted(int(c.id.rsplit(":", 1)[1]) for c in exact.contaminated) == [24, 27]
    assert all(c.match.how == "exact" and c.match.coverage == 1.0 for c in exact.contaminated)
    split = [_set("long", evals[:6]), _set("short", evals[6:])]
    per_set = decontaminate(sets, split, DecontaminationSettings(eval_n=(("long", 12),)))
    assert sorted(int(c.id.rsplit(":", 1)[1]) for c in per_set.contaminated) == [3, 24]  # 12-grams: only 12+ words
    assert per_set.report()["eval"]["long"]["n"] == 12 and per_set.report()["eval"]["short"]["n"] == 8
    parallel = decontaminate(sets, [_set("bench", evals)], DecontaminationSettings(workers=2))
    sequential = decontaminate(sets, [_set("bench", evals)]).report()
    assert {k: v for k, v in parallel.report().items() if k != "settings"} == {
        k: v for k, v in sequential.items() if k != "settings"}
