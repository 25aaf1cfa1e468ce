import pytest

from jaxtune.datatools.dedup import DedupSettings, dedup
from jaxtune.datatools.records import RecordSet
from jaxtune.errors import UserError
from tests.datatools.planted import dedup_set, jaccard_planted, one_word_changed, unique_records


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


def _truth(records, n=5, threshold=0.8):
    """Exact greedy truth, computed independently: {position: Jaccard with the kept record it duplicates}."""
    def shingles(r):
        out = set()
        for text in (r["instruction"], r["input"], r["output"]):
            w = text.lower().replace(",", " ").replace("!", " ").split()
            if w:
                out |= {" ".join(w[i : i + n]) for i in range(len(w) - n + 1)} if len(w) >= n else {" ".join(w)}
        return out

    sets = [shingles(r) for r in records]
    postings, truth = {}, {}
    for i, s in enumerate(sets):
        others = {j for g in s for j in postings.get(g, ())}
        best = max((len(s & sets[j]) / len(s | sets[j]) for j in others), default=0.0)
        if best >= threshold:
            truth[i] = best
        else:
            for g in s:
                postings.setdefault(g, []).append(i)
    return truth


@pytest.mark.parametrize("seed", [0, 1])
def test_planted_copies_at_computed_jaccard_have_precision_one_and_target_recall(seed):
    records, kinds = jaccard_planted(seed)
    truth = _truth(records)
    result = dedup([_set("a", records)])
    found = {d.index: d for d in result.removed}
    assert set(found) <= set(truth)  # precision 1.0: nothing below the threshold is removed
    for position, d in found.items():
        assert d.jaccard == pytest.approx(truth[position])  # the exact Jaccard, not an estimate
    high = [p for p, j in truth.items() if j >= 0.85]
    band = [p for p, j in truth.items() if 0.80 <= j < 0.85]
    assert len(high) > 200 and len(band) > 40
    assert sum(p in found for p in high) / len(high) >= 0.99
    assert sum(p in found for p in band) / len(band) >= 0.95
    # every exact, metadata-only and field-swapped copy is found; metadata never makes records differ
    for kind, expected in (("exact", "exact"), ("metadata", "exact"), ("swapped", "near")):
        planted = [p for p, k in kinds.items() if k == kind]
        assert planted and all(found[p].kind == expected for p in planted), kind
    assert all(found[p].jaccard == 1.0 for p, k in kinds.items() if k == "swapped")
    report = result.report(DedupSettings())
    assert report["fields_compared"] == {"instruction,input,output": len(records)}  # not id, source, most_similar
    assert (report["lsh"]["bands"], report["lsh"]["rows"]) == (21, 6)


def test_clusters_name_the_kept_record_and_workers_agree():
    records, _ = jaccard_planted(2, originals=60, perturbed=20, each=5)
    sets = [_set("a", records)]
    result = dedup(sets)
    clusters = result.clusters()
    assert sum(len(c["duplicates"]) for c in clusters) == len(result.removed)
    kept_ids = {f"a.jsonl:{i + 1}" for i in result.kept["a"]}
    assert all(c["kept"]["id"] in kept_ids for c in clusters)
    parallel = dedup(sets, DedupSettings(workers=2))
    assert [(d.id, d.of_id, d.jaccard) for d in parallel.removed] == [(d.id, d.of_id, d.jaccard) for d in result.removed]
