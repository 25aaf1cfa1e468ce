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


# -- chat `messages` pairs -------------------------------------------------------------------------

class SpecialsTokenizer(CharTokenizer):
    """CharTokenizer whose BOS/EOS have text forms, as chat templates write them."""

    bos_token, eos_token = "<s>", "</s>"


def _user(text):
    return {"role": "user", "content": text}


def _assistant(text):
    return {"role": "assistant", "content": text}


QUESTION = [{"role": "system", "content": "Be brief."}, _user("2+2?")]
CHAT_SHAPES = {
    "conversations": {"chosen": QUESTION + [_assistant("4")], "rejected": QUESTION + [_assistant("five")]},
    "prompt_and_replies": {"prompt": QUESTION, "chosen": [_assistant("4")], "rejected": [_assistant("five")]},
    "prompt_and_text": {"prompt": QUESTION, "chosen": "4", "rejected": "five"},
}
CHATML_PROMPT = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
# A user template: BOS and EOS written as text, a multi-line turn header, the generation prompt its opening.
JINJA = ("{{ bos_token }}{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}"
         "{{ eos_token if m['role'] == 'assistant' else '' }}\n{% endfor %}"
         "{% if add_generation_prompt %}### assistant:\n{% endif %}")


def _chat_transform(source, template, tokenizer=None, **kw):
    kw = {"seq_len": 160, "truncation": "error", "seed": 0, **kw}
    return preference.PreferenceTransform(source, TEMPLATES, tokenizer or CharTokenizer(), chat_template=template, **kw)


def _split_row(rows, row):
    """(prompt ids, trained ids) of one row: tokens before the loss mask, and the masked targets."""
    mask = rows["loss_mask"][row] == 1
    start = int(np.argmax(mask))
    return rows["inputs"][row, : start + 1].tolist(), rows["targets"][row][mask].tolist()


def _char_ids(text):
    return [b + 3 for b in text.encode()]


@pytest.mark.parametrize("shape", sorted(CHAT_SHAPES))
def test_chat_shapes_render_the_template_and_train_the_reply_with_its_end_of_turn(shape):
    record = {**CHAT_SHAPES[shape], "_where": "chat.jsonl:1"}
    assert preference.parse_pair(record).messages == tuple(QUESTION)
    rows = _chat_transform([record], "chatml")(0, record)
    for row, reply in enumerate(["4", "five"]):
        prompt, trained = _split_row(rows, row)
        assert prompt == _char_ids(CHATML_PROMPT)  # the same prompt tokens in both rows, no BOS added
        assert trained == _char_ids(f"{reply}<|im_end|>\n")  # exactly the reply + end of turn; no EOS added
        n = int(rows["segment_ids"][row].sum())
        assert _decode(rows["inputs"][row, :n]) + _decode(rows["targets"][row, n - 1 : n]) == (
            CHATML_PROMPT + f"{reply}<|im_end|>\n")


def test_chat_pair_tokens_equal_sft_chat_tokens():
    """A jinja template with BOS/EOS text and a multi-turn prompt: tokens and the last turn's mask match SFT."""
    from jaxtune.data.examples import ExampleBuilder, TaskSpec

    prompt = QUESTION + [_assistant("4"), _user("And 3+3?")]
    record = {"prompt": prompt, "chosen": [_assistant("6")], "rejected": [_assistant("seven")], "_where": "chat.jsonl:2"}
    tok = SpecialsTokenizer()
    rows = _chat_transform([record], JINJA, tok)(0, record)
    builder = ExampleBuilder(TaskSpec("chat", [], chat_template=JINJA), 0, tok, seq_len=160, seed=0)
    for row, reply in enumerate(["6", "seven"]):
        tokens, trained = builder.chat_tokens({"messages": prompt + [_assistant(reply)]})
        n = int(rows["segment_ids"][row].sum())
        assert rows["inputs"][row, :n].tolist() + [int(rows["targets"][row, n - 1])] == tokens
        span = len(reply) + 2  # reply, EOS, newline: SFT's trained span of the final turn
        last_turn = [int(on and i >= len(tokens) - span) for i, on in enumerate(trained)]
        assert rows["loss_mask"][row, :n].tolist() == last_turn[1:] and sum(trained) > span  # (SFT trains "4" too)
        assert _split_row(rows, row)[1] == _char_ids(reply) + [tok.eos_id] + _char_ids("\n")
        assert tokens[0] == tok.bos_id and tok.bos_id not in tokens[1:]  # the template's BOS, once
    assert _decode(_split_row(rows, 0)[0]) == (
        "### system:\nBe brief.\n### user:\n2+2?\n### assistant:\n4\n### user:\nAnd 3+3?\n### assistant:\n")


def test_kto_chat_record_and_its_mismatched_row():
    source = [{"prompt": [_user("hi")], "completion": [_assistant("hello")], "label": True},
              {"prompt": "text prompt", "completion": " text answer", "label": False}]
    example = preference.parse_unpaired(source[0])
    assert example.messages == (_user("hi"),) and example.completions == (_assistant("hello"),) and example.label == 1
    rows = _chat_transform(source, "chatml", unpaired=True)(0, source[0])
    head = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert [_split_row(rows, r) for r in (0, 1)] == [
        (_char_ids(head), _char_ids("hello<|im_end|>\n")),
        (_char_ids(head), _char_ids(" text answer<|im_end|>\n")),  # the next record's completion, as a reply
    ]
    assert int(rows[preference.LABEL_KEY]) == 1
    text_rows = _chat_transform(source, "chatml", unpaired=True)(1, source[1])  # and a chat reply as text
    assert _split_row(text_rows, 1)[1] == _char_ids("hello") + [CharTokenizer.eos_id]


@pytest.mark.parametrize(
    "record,message",
    [
        ({"chosen": [_user("a"), _assistant("x")], "rejected": [_user("b"), _assistant("y")]},
         "same conversation up to their final assistant message .* differ at message 0"),
        ({"chosen": [_user("a"), _assistant("x"), _user("c")], "rejected": [_user("a"), _assistant("y")]},
         "last message of 'chosen' must be the assistant's reply, found role 'user'"),
        ({"chosen": [_assistant("x")], "rejected": [_assistant("y")]}, "the prompt\) are missing"),
        ({"prompt": [{"role": "bot", "content": "a"}], "chosen": "x", "rejected": "y"},
         "prompt\[0\] has role 'bot'; expected one of system, user, assistant, tool"),
        ({"prompt": [_user("a")], "chosen": [{"role": "assistant", "content": 4}], "rejected": [_assistant("y")]},
         "chosen\[0\].content must be text, found int"),
        ({"prompt": [_user("a")], "chosen": [_user("x")], "rejected": [_assistant("y")]},
         "'chosen' must be one assistant message .* role\(s\) user"),
        ({"prompt": [_user("a")], "chosen": [_assistant("x")], "rejected": [_assistant("x")]}, "identical"),
        ({"prompt": "text", "chosen": [_assistant("x")], "rejected": [_assistant("y")]},
         "'prompt' is not a list of messages"),
        ({"prompt": [_user("a")], "chosen": "x", "rejected": [_assistant("y")]}, "mixes chat messages and text"),
        ({"chosen": [_user("a"), _assistant("x")], "rejected": "y"}, "mixes chat messages and text"),
    ],
)
def test_malformed_chat_pairs_name_the_record(record, message):
    record["_where"] = "chat.jsonl:9"
    with pytest.raises(UserError, match=f"chat.jsonl:9: .*{message}"):
        preference.parse_pair(record)


def test_chat_rendering_errors_name_the_record():
    record = {"prompt": [_user("a")], "chosen": "x", "rejected": "y", "_where": "chat.jsonl:3"}
    with pytest.raises(UserError, match="chat.jsonl:3: chat messages need a chat template.*data.chat_template"):
        _chat_transform([record], None)(0, record)
    # The generation prompt opens the turn differently from how the full conversation renders it.
    odd = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
           "{% if add_generation_prompt %}<bot>{% endif %}")
    with pytest.raises(UserError, match="chat.jsonl:3: .*does not start with its rendering of the prompt"):
        _chat_transform([record], odd)(0, record)
    with pytest.raises(UserError, match="chat.jsonl:3: .*need a chat template"):
        list(preference.corpus([record], unpaired=False, limit=5)())


def test_tokenizer_corpus_renders_chat_records():
    source = [CHAT_SHAPES["prompt_and_text"], {"prompt": "p", "chosen": " a", "rejected": " b"}]
    texts = list(preference.corpus(source, unpaired=False, limit=5, chat_template="chatml")())
    assert texts == [CHATML_PROMPT, "4<|im_end|>\n", "five<|im_end|>\n", "p", " a", " b"]


def test_tokenizer_chat_template_is_the_default_and_matches_apply_chat_template(tmp_path):
    """An HF tokenizer with its own chat_template: used when data.chat_template is empty, and each row's
    tokens equal transformers' apply_chat_template of the prompt + that reply."""
    import json

    from jaxtune import config as config_lib, loading
    from jaxtune.data import datasets
    from tests.models.test_hf_io import _write_hf_tokenizer

    fast = _write_hf_tokenizer(tmp_path / "tok")
    tok_config = tmp_path / "tok" / "tokenizer_config.json"
    tok_config.write_text(json.dumps({**json.loads(tok_config.read_text()), "chat_template": JINJA}))
    record = {"prompt": [_user("reverse: red cat =")], "chosen": " cat red", "rejected": " red cat"}
    (tmp_path / "pairs.jsonl").write_text(json.dumps(record) + "\n")
    c = config_lib.base_config()
    c.data.train_path, c.data.tokenizer = str(tmp_path / "pairs.jsonl"), str(tmp_path / "tok")
    data = datasets.load_preference_data(loading.data_settings(c), tmp_path, unpaired=False)
    assert data.chat_template == JINJA
    transform = preference.PreferenceTransform(data.train_source, data.train_templates, data.tokenizer, seq_len=64,
                                               truncation="error", seed=0, chat_template=data.chat_template)
    rows = transform(0, data.train_source[0])
    for row, reply in enumerate([record["chosen"], record["rejected"]]):
        expected = fast.apply_chat_template(record["prompt"] + [_assistant(reply)], chat_template=JINJA, tokenize=True,
                                            return_dict=False)
        n = int(rows["segment_ids"][row].sum())
        assert rows["inputs"][row, :n].tolist() + [int(rows["targets"][row, n - 1])] == list(expected)
        assert _split_row(rows, row)[1] == data.tokenizer.encode(reply) + [data.tokenizer.eos_id] + data.tokenizer.encode("\n")
