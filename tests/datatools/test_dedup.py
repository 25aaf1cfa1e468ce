import pytest

from jaxtune.datatools.dedup import DedupSettings, dedup
from jaxtune.datatools.records import RecordSet
from jaxtune.errors import UserError
from tests.datatools.planted import dedup_set, one_word_changed, unique_records


def _set(name, records):
    return RecordSet(name, [{**r, "_where": f"{name}.jsonl:{i + 1}"} for i, r in enumerate(records)], f"{name}.jsonl")


def test_finds_planted_exact_and_near_duplicates_with_their_originals():
    records, exact, near = dedup_set()
    result = dedup([_set("a", records)])
    report = result.report(DedupSettings())["sets"]["a"]
    assert (report["records"], report["exact_duplicates"], report["near_duplicates"], report["kept"]) == (50, 5, 4, 41)
    found = {int(r["id"].rsplit(":", 1)[1]): (r["kind"], int(r["duplicate_of"].rsplit(":", 1)[1]), r["jaccard"])
             for r in report["removed"]}
    assert {line: of for line, (kind, of, _) in found.items() if kind == "exact"} == exact
    assert {line: of for line, (kind, of, _) in found.items() if kind == "near"} == near
    for line in near:  # true Jaccard 91/101 = 0.90; the MinHash estimate is close
        assert 0.8 <= found[line][2] <= 0.97
    assert all(found[line][2] == 1.0 for line in exact)
    assert [r["instruction"] for r in result.kept_records("a")] == [
        r["instruction"] for i, r in enumerate(records) if i + 1 not in exact and i + 1 not in near]


def test_across_tasks_the_first_task_keeps_the_record_and_results_are_deterministic():
    first = unique_records(10, seed=3, words=80)
    second = unique_records(6, seed=4) + [first[2], one_word_changed(first[7], 40)]
    sets = [_set("first", first), _set("second", second)]
    result = dedup(sets)
    assert [(d.set, d.id, d.kind, d.of_id) for d in result.removed] == [
        ("second", "second.jsonl:7", "exact", "first.jsonl:3"), ("second", "second.jsonl:8", "near", "first.jsonl:8")]
    assert result.report(DedupSettings()) == dedup(sets).report(DedupSettings())
    swapped = dedup(sets[::-1])  # config order decides which task keeps the record
    assert {(d.set, d.of_set) for d in swapped.removed} == {("first", "second")}
    exact_only = dedup(sets, DedupSettings(near=False))
    assert [d.kind for d in exact_only.removed] == ["exact"]


def test_threshold_decides_near_duplicates():
    base = unique_records(1, seed=5, words=30)[0]
    changed = one_word_changed(one_word_changed(base, 10), 20)  # 10 of 26 5-grams changed: Jaccard 16/36 = 0.44
    sets = [_set("s", [base, changed])]
    assert not dedup(sets).removed
    assert [d.kind for d in dedup(sets, DedupSettings(threshold=0.3)).removed] == ["near"]


@pytest.mark.parametrize("settings, message", [(DedupSettings(threshold=0.0), "threshold"),
                                               (DedupSettings(ngram=0), "n-gram"), (DedupSettings(num_perm=4), "num_perm")])
def test_bad_settings(settings, message):
    with pytest.raises(UserError, match=message):
        dedup([_set("s", unique_records(2, seed=0))], settings)
