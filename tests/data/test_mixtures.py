"""Mixtures: rates, the mixed stream's proportions, resume mid-mixture, packing, host sharding."""

import numpy as np
import pytest

from jaxtune.data.examples import TaskSpec
from jaxtune.data.flan import FlanSpec
from jaxtune.data.mixtures import mixture_rates
from jaxtune.data.pipeline import BATCH_KEYS, build_dataset
from jaxtune.errors import UserError
from tests.data.test_pipeline import CharTokenizer

TOK = CharTokenizer()


def test_examples_proportional_with_cap_weights_and_temperature():
    names, sizes = ["a", "b", "c"], [100, 1000, 10000]
    np.testing.assert_allclose(mixture_rates(names, sizes).rates, np.array(sizes) / 11100)
    capped = mixture_rates(names, sizes, caps=[0, 2000, 2000])  # rate ~ min(n, cap)
    np.testing.assert_allclose(capped.rates, np.array([100, 1000, 2000]) / 3100)
    weights = mixture_rates(names, sizes, mode="weights", weights=[1, 1, 2])
    np.testing.assert_allclose(weights.rates, [0.25, 0.25, 0.5])
    hot = mixture_rates(names, sizes, mode="temperature", temperature=2.0)
    np.testing.assert_allclose(hot.rates, np.sqrt(sizes) / np.sqrt(sizes).sum())
    assert "c: 90.09% of examples (10000 records)" in mixture_rates(names, sizes).describe()
    with pytest.raises(UserError, match="data.tasks b: mixing rate is 0"):
        mixture_rates(names, sizes, mode="weights", weights=[1, 0, 1])


def _task(name, n, length=1, **kw):
    records = [{"q": f"{name}{i}", "a": "z" * (length + i % 7)} for i in range(n)]
    return TaskSpec(name, records, flan={"default": FlanSpec((("{q}:", "{a}"),))}, **kw)


def _stream(tasks, rates, n, **kw):
    ds, stats = build_dataset(tasks, TOK, rates=rates, seed=0, **{"seq_len": 32, "batch_size": 1, "packing": False, **kw})
    it = iter(ds)
    return [next(it) for _ in range(n)], stats, it


def _names(batches):
    return [TOK.decode(b["inputs"][0][1:]).split(":")[0] for b in batches]


def test_mixed_stream_follows_rates_and_counts_per_task():
    tasks = [_task("a", 10), _task("b", 50)]
    rates = mixture_rates(["a", "b"], [10, 50], caps=[0, 30]).rates  # 10 : 30
    batches, stats, _ = _stream(tasks, rates, 80)
    names = _names(batches)
    assert sum(n.startswith("a") for n in names) == 20 and sum(n.startswith("b") for n in names) == 60
    assert stats.tasks["a"].examples == 20 and stats.tasks["b"].examples == 60
    assert stats.tasks["a"].target_tokens > 0 and stats.packing_efficiency < 1.0


def test_resume_mid_mixture_with_best_fit_packing():
    tasks = [_task("a", 13, 3), _task("b", 29, 9, truncation="drop")]
    kw = dict(seq_len=48, batch_size=2, packing=True, packing_strategy="best_fit", packing_bins=4)
    reference, _, _ = _stream(tasks, [0.3, 0.7], 12, **kw)
    _, _, it = _stream(tasks, [0.3, 0.7], 5, **kw)
    state = it.get_state()
    ds, _ = build_dataset(tasks, TOK, rates=[0.3, 0.7], seed=0, **kw)
    resumed = iter(ds)
    resumed.set_state(state)
    for expected in reference[5:]:
        got = next(resumed)
        assert all(np.array_equal(got[k], expected[k]) for k in BATCH_KEYS)
    seg = reference[0]["segment_ids"]
    assert seg.max() >= 2 and set(reference[0]) == set(BATCH_KEYS)


def test_best_fit_packs_at_least_as_tightly_as_first_fit():
    tasks = [_task("a", 200, 5)]
    eff = {}
    for strategy in ("first_fit", "best_fit"):
        _, stats, _ = _stream(tasks, None, 40, seq_len=64, batch_size=4, packing=True, packing_strategy=strategy, packing_bins=16)
        eff[strategy] = stats.packing_efficiency
    assert eff["best_fit"] >= eff["first_fit"] - 0.02 and eff["best_fit"] > 0.8


def test_drop_policy_and_skip_counts():
    tasks = [_task("long", 10, 40, truncation="drop"), _task("ok", 10)]
    batches, stats, _ = _stream(tasks, [0.5, 0.5], 10, seq_len=30)
    assert all(n.startswith("ok") for n in _names(batches))
    assert stats.tasks["long"].dropped >= 10 and stats.tasks["long"].examples == 0
    assert "long: 0 examples" in stats.report()[0]


def test_hosts_read_disjoint_shards_whose_union_is_the_single_process_stream():
    tasks = [_task("a", 7), _task("b", 11)]
    single, _, _ = _stream(tasks, [0.4, 0.6], 20)
    shards = [_stream(tasks, [0.4, 0.6], 10, process_index=p, process_count=2)[0] for p in range(2)]
    interleaved = [b for pair in zip(*shards) for b in pair]  # process p holds global examples p, p+2, ...
    assert _names(interleaved) == _names(single)


def test_worker_processes_do_not_change_the_order():
    tasks = [_task("a", 7), _task("b", 11)]
    in_process, _, _ = _stream(tasks, [0.4, 0.6], 12, packing=True, batch_size=2)
    workers, _, _ = _stream(tasks, [0.4, 0.6], 12, packing=True, batch_size=2, worker_count=2)
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(in_process, workers) for k in BATCH_KEYS)
