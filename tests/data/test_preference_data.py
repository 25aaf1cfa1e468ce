"""Preference records -> [2, T] pairs -> [B, 2, T] batches: shapes, masks, truncation, errors."""

import numpy as np
import pytest

from jaxtune.data import preference
from jaxtune.data.pipeline import BATCH_KEYS, TokenizeStats
from jaxtune.errors import UserError
from tests.data.test_pipeline import CharTokenizer

TEMPLATES = {"default": [("{prompt}", "{response}")]}


def _transform(source, **kw):
    kw = {"seq_len": 48, "truncation": "truncate", "seed": 0, **kw}
    return preference.PreferenceTransform(source, TEMPLATES, CharTokenizer(), **kw)


def _decode(ids):
    return CharTokenizer().decode([i for i in ids if i >= 3])


def test_record_shapes():
    explicit = preference.parse_pair({"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5", "topic": "math"})
    assert explicit.fields == {"prompt": "Q: 2+2?", "topic": "math"} and explicit.completions == (" 4", " 5")

    hh = preference.parse_pair({"chosen": "\n\nHuman: capital of France?\n\nAssistant: Paris is.",
                                "rejected": "\n\nHuman: capital of France?\n\nAssistant: Pisa, I think."})
    # The shared "P" of Paris/Pisa stays with the completions: the prompt ends at a word boundary.
    assert hh.fields["prompt"] == "\n\nHuman: capital of France?\n\nAssistant:"
    assert hh.completions == (" Paris is.", " Pisa, I think.")

    kto = preference.parse_unpaired({"prompt": "hi", "completion": " hello", "label": False})
    assert kto.completions == (" hello",) and kto.label == 0


@pytest.mark.parametrize(
    "record,message",
    [
        ({"prompt": "p", "chosen": "a"}, "'rejected' is missing"),
        ({"prompt": "p", "chosen": "a", "rejected": 3}, "'rejected' must be a string, found a int"),
        ({"prompt": "p", "chosen": "", "rejected": "b"}, "'chosen' is empty"),
        ({"prompt": "p", "chosen": " a", "rejected": " a"}, "identical"),
        ({"chosen": "same text", "rejected": "same text"}, "identical"),
        ({"chosen": "alpha", "rejected": "beta"}, "share no common prefix"),
        ({"chosen": [{"role": "user", "content": "x"}], "rejected": []}, "chat messages"),
    ],
)
def test_malformed_pairs_name_the_record(record, message):
    record["_where"] = "pairs.jsonl:7"
    with pytest.raises(UserError, match=f"pairs.jsonl:7: .*{message}"):
        preference.parse_pair(record)


@pytest.mark.parametrize("label", [None, "yes", 2])
def test_kto_label_must_be_boolean(label):
    with pytest.raises(UserError, match="'label' must be true/false"):
        preference.parse_unpaired({"prompt": "p", "completion": "c", "label": label, "_where": "kto.jsonl:3"})


def test_pair_rows_share_the_prompt_and_mask_only_completions():
    source = [{"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " five"}]
    rows = _transform(source)(0, source[0])
    assert all(rows[k].shape == (2, 48) for k in BATCH_KEYS)
    prompt_len = 1 + len("Q: 2+2?")  # BOS + bytes
    for row, completion in enumerate([" 4", " five"]):
        n = prompt_len + len(completion) + 1 - 1  # + EOS, shifted
        assert rows["segment_ids"][row].tolist() == [1] * n + [0] * (48 - n)
        assert rows["positions"][row, :n].tolist() == list(range(n))
        trained = rows["targets"][row][rows["loss_mask"][row] == 1].tolist()
        assert trained == [b + 3 for b in completion.encode()] + [CharTokenizer.eos_id]
        assert _decode(rows["inputs"][row, :prompt_len]) == "Q: 2+2?"
    assert int(rows[preference.INDEX_KEY]) == 0


def test_truncation_keeps_prompt_end_and_completion_start():
    prompt, chosen, rejected = [2] + list(range(10, 40)), list(range(100, 130)), list(range(200, 210))
    stats = TokenizeStats()
    rows = preference.tokenize_rows(prompt, [chosen, rejected], seq_len=31, truncation="truncate", bos_id=2, stats=stats)
    assert stats.truncated == 1 and stats.dropped == 0
    # Row of 32 tokens: the prompt keeps BOS + its last 15 tokens (half the row), completions their start.
    assert rows["inputs"][0, :16].tolist() == [2] + list(range(25, 40))
    assert rows["targets"][0][rows["loss_mask"][0] == 1].tolist() == list(range(100, 116))
    assert rows["targets"][1][rows["loss_mask"][1] == 1].tolist() == list(range(200, 210))


def test_pairs_identical_after_truncation_are_dropped_and_counted():
    stats = TokenizeStats()
    same_start = [list(range(100, 140)) + [1], list(range(100, 140)) + [7, 1]]
    assert preference.tokenize_rows([2, 5], same_start, seq_len=20, truncation="truncate", bos_id=2, stats=stats) is None
    assert preference.tokenize_rows([2, 5], [[9, 1], list(range(30)) + [1]], seq_len=20, truncation="drop",
                                    bos_id=2, stats=stats) is None
    assert (stats.examples, stats.dropped, stats.truncated) == (2, 2, 0)
    with pytest.raises(UserError, match="pairs.jsonl:4: prompt \\+ completion exceed data.seq_len=20"):
        preference.tokenize_rows([2, 5], same_start, seq_len=20, truncation="error", bos_id=2, where="pairs.jsonl:4")


def test_batches_are_b_2_t_with_index_and_reference_logps():
    source = [{"prompt": f"q{i}", "chosen": f" good {i}", "rejected": f" bad {i}"} for i in range(10)]
    ref = np.stack([np.arange(10, dtype=np.float32), -np.arange(10, dtype=np.float32)], axis=1)
    transform = _transform(source, ref_logps=ref)
    ds = preference.preference_dataset(source, transform, batch_size=4, seed=1)
    batch = next(iter(ds))
    assert set(batch) == set(preference.batch_keys(transform))
    assert batch["inputs"].shape == (4, 2, 48) and batch[preference.INDEX_KEY].shape == (4,)
    for b in range(4):
        i = int(batch[preference.INDEX_KEY][b])
        assert _decode(batch["inputs"][b, 0, : 1 + len(f"q{i}")]) == f"q{i}"  # shuffled, still keyed by source index
        assert batch["ref_chosen_logps"][b] == i and batch["ref_rejected_logps"][b] == -i


def test_kto_second_row_scores_the_prompt_with_a_mismatched_completion():
    source = [{"prompt": f"q{i}", "completion": f" answer{i}", "label": i % 2 == 0} for i in range(3)]
    transform = _transform(source, unpaired=True)
    rows = transform(2, source[2])
    assert _decode(rows["inputs"][0, : rows["segment_ids"][0].sum()]) == "q2 answer2"
    assert _decode(rows["inputs"][1, : rows["segment_ids"][1].sum()]) == "q2 answer0"  # next record, wrapped
    assert int(rows[preference.LABEL_KEY]) == 1
    assert preference.LABEL_KEY in preference.batch_keys(transform)
