import json
import pickle

import numpy as np
import pytest

from jaxtune.data import pipeline
from jaxtune.data.sources import JsonlSource
from jaxtune.errors import UserError


class CharTokenizer:
    """Byte-level stand-in for the pipeline tests: pad 0, eos 1, bos 2, bytes at +3."""

    vocab_size, pad_id, eos_id, bos_id = 259, 0, 1, 2

    def encode(self, text):
        return [b + 3 for b in text.encode()]

    def decode(self, ids):
        return bytes(i - 3 for i in ids if i >= 3).decode(errors="replace")


TEMPLATES = {"default": [("Q: {q}\nA:", " {a}"), ("{q} ->", " {a}")]}


def _records(n):
    return [{"q": f"question {i}", "a": "x" * (1 + i % 5)} for i in range(n)]


def _take(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)], it


def test_tokenize_pair_alignment_and_mask():
    ex = pipeline.tokenize_pair([2, 10, 11], [20, 21, 1], seq_len=16, truncation="truncate")
    assert ex["inputs"].tolist() == [2, 10, 11, 20, 21]
    assert ex["targets"].tolist() == [10, 11, 20, 21, 1]
    assert ex["loss_mask"].tolist() == [0, 0, 1, 1, 1]  # predicts the target tokens and EOS only


def test_truncation_policies():
    stats = pipeline.TokenizeStats()
    long = dict(seq_len=6, where="file.jsonl:3", stats=stats)
    ex = pipeline.tokenize_pair([2, 10, 11], [20, 21, 22, 23, 1], truncation="truncate", **long)
    assert len(ex["inputs"]) == 6 and ex["loss_mask"].tolist() == [0, 0, 1, 1, 1, 1]
    assert pipeline.tokenize_pair([2, 10, 11], [20, 21, 22, 23, 1], truncation="drop", **long) is None
    assert pipeline.tokenize_pair(list(range(8)), [20, 1], truncation="truncate", **long) is None  # no target fits
    assert pipeline.tokenize_pair([2, 3], [], truncation="truncate", **long) is None  # empty target
    assert (stats.truncated, stats.dropped, stats.examples) == (1, 3, 4)
    with pytest.raises(UserError, match=r"file\.jsonl:3: 7 tokens exceed data\.seq_len=6"):
        pipeline.tokenize_pair([2, 10, 11], [20, 21, 22, 23, 1], truncation="error", **long)


def test_packed_batches_follow_contract():
    ds, _ = pipeline.train_dataset(_records(50), TEMPLATES, CharTokenizer(), seq_len=64, batch_size=4, seed=0)
    batches, _ = _take(ds, 3)
    for b in batches:
        assert set(b) == set(pipeline.BATCH_KEYS) and all(v.shape == (4, 64) for v in b.values())
        assert b["segment_ids"].max() >= 2  # several examples share a row
        for row in range(4):
            seg, pos = b["segment_ids"][row], b["positions"][row]
            for s in set(seg.tolist()) - {0}:
                idx = np.flatnonzero(seg == s)
                assert pos[idx].tolist() == list(range(len(idx)))  # positions restart per segment
                # targets are the next input inside a segment (shifted before packing)
                assert b["targets"][row, idx[:-1]].tolist() == b["inputs"][row, idx[1:]].tolist()
            assert b["loss_mask"][row][seg == 0].sum() == 0


def test_padding_mode():
    ds, _ = pipeline.train_dataset(_records(10), TEMPLATES, CharTokenizer(), seq_len=40, batch_size=2, seed=0, packing=False)
    b = next(iter(ds))
    assert b["segment_ids"].max() == 1
    n = int(b["segment_ids"][0].sum())
    assert b["positions"][0, :n].tolist() == list(range(n))


def test_deterministic_and_resumable():
    make = lambda: pipeline.train_dataset(_records(30), TEMPLATES, CharTokenizer(), seq_len=48, batch_size=2, seed=7, word_dropout=0.2)[0]
    first, _ = _take(make(), 6)
    again, _ = _take(make(), 6)
    assert all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(first, again))
    _, it = _take(make(), 3)
    state = it.get_state()
    resumed = iter(make())
    resumed.set_state(state)
    for expected in first[3:]:
        got = next(resumed)
        assert all(np.array_equal(got[k], expected[k]) for k in pipeline.BATCH_KEYS)


def test_processes_read_disjoint_shards():
    recs = [{"q": f"q{i}", "a": "y"} for i in range(16)]
    seen = []
    for p in range(2):
        ds, _ = pipeline.train_dataset(recs, TEMPLATES, CharTokenizer(), seq_len=16, batch_size=1, seed=0,
                                       packing=False, shuffle=False, process_index=p, process_count=2)
        it = iter(ds)
        seen.append({CharTokenizer().decode(next(it)["inputs"][0]) for _ in range(8)})
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 16


def test_jsonl_source_errors(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"q": "a", "a": "b"}) + "\n\n" + '{"q": "broken"\n' + "[1, 2]\n")
    source = JsonlSource(path)
    assert len(source) == 3 and source[0]["q"] == "a"
    with pytest.raises(UserError, match=r"d\.jsonl:3: invalid JSON"):
        source[1]
    with pytest.raises(UserError, match=r"d\.jsonl:4: expected a JSON object, found list"):
        source[2]
    assert pickle.loads(pickle.dumps(source))[0]["a"] == "b"
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"q": "\xff"}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:1: not valid UTF-8"):
        JsonlSource(bad)[0]
    with pytest.raises(UserError, match="no such data file"):
        JsonlSource(tmp_path / "missing.jsonl")


def test_missing_template_field_is_reported(tmp_path):
    ds, _ = pipeline.train_dataset([{"question": "x", "a": "y"}], TEMPLATES, CharTokenizer(), seq_len=32, batch_size=1, seed=0)
    with pytest.raises(Exception, match="q"):
        next(iter(ds))


def test_fixed_shard_count_gives_the_same_global_batches_for_any_process_count():
    """data.shards=2: one process builds both shards side by side; two processes build one each and
    their rows, in process order, are the same packed global batch; the state resumes."""
    make = lambda **kw: pipeline.train_dataset(_records(40), TEMPLATES, CharTokenizer(), seq_len=48, seed=3,
                                               shards=2, **kw)[0]
    one, _ = _take(make(batch_size=4), 4)
    halves = [_take(make(batch_size=2, process_index=p, process_count=2), 4)[0] for p in range(2)]
    for step, batch in enumerate(one):
        for k in pipeline.BATCH_KEYS:
            assert np.array_equal(batch[k], np.concatenate([halves[0][step][k], halves[1][step][k]]))
    _, it = _take(make(batch_size=4), 2)
    resumed = iter(make(batch_size=4))
    resumed.set_state(it.get_state())
    assert np.array_equal(next(resumed)["inputs"], one[2]["inputs"])
