"""Which texts the data tools compare: the trained-on fields by format, never ids or provenance."""

import pytest

from jaxtune.data.sources import SourceError
from jaxtune.datatools.fields import record_texts, record_words, trained_texts

META = {"id": "r1", "parent_id": "r0", "most_similar": "other", "source": "self-instruct", "name": "task 7"}

CASES = [
    ({"instruction": "Do", "input": "this", "output": "done", **META},
     (["Do", "this", "done"], ("instruction", "input", "output")), (["Do", "this"], ("instruction", "input"))),
    ({"instruction": "Classify", "instances": [{"input": "x", "output": "A"}, {"input": "y", "output": "B"}],
      "is_classification": True, **META},
     (["Classify", "x", "A", "y", "B"], ("instruction", "instances")), (["Classify", "x", "y"], ("instruction", "instances[*].input"))),
    ({"messages": [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}], **META},
     (["Be brief", "Hi", "Hello", "Bye"], ("messages[*].content",)), (["Hi", "Bye"], ("messages[user].content",))),
    ({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
     (["Q", "A"], ("conversations[*].content",)), (["Q"], ("conversations[user].content",))),
    ({"prompt": "Q", "chosen": "good", "rejected": "bad", **META},
     (["Q", "good", "bad"], ("prompt", "chosen", "rejected")), (["Q"], ("prompt",))),
    ({"prompt": [{"role": "user", "content": "Q"}], "chosen": [{"role": "assistant", "content": "good"}],
      "rejected": [{"role": "assistant", "content": "bad"}]},
     (["Q", "good", "bad"], ("prompt", "chosen", "rejected")), (["Q"], ("prompt",))),
    ({"prompt": "Q", "completion": "A", "label": True}, (["Q", "A"], ("prompt", "completion")), (["Q"], ("prompt",))),
    ({"text": "plain text", "id": 3}, (["plain text"], ("text",)), (["plain text"], ("text",))),
    ({"question": "Q?", "choices": ["a", "b"], "answer": 1}, (["Q?", "a", "b"], ("question", "choices")),
     (["Q?"], ("question",))),
    ({"title": "T", "body": "B", "id": "x"}, (["T", "B", "x"], ("*",)), (["T", "B", "x"], ("*",))),
    ({"output": "only an answer", "id": "x"}, (["only an answer"], ("output",)), ([], ())),
]


@pytest.mark.parametrize("record, everything, prompt", CASES, ids=[str(sorted(c[0]))[:40] for c in CASES])
def test_trained_fields_by_format(record, everything, prompt):
    assert trained_texts(record) == (everything[0], everything[1])
    assert trained_texts(record, "prompt") == (prompt[0], prompt[1])


def test_named_fields_override_and_missing_fields_fail():
    record = {"instruction": "Do it", "output": "ok", "id": "x", "_where": "f.jsonl:3"}
    assert record_texts(record, ("id", "output")) == (["x", "ok"], ("id", "output"))
    assert record_words(record) == [["do", "it"], ["ok"]]
    with pytest.raises(SourceError, match="f.jsonl:3: no field 'input'"):
        record_texts(record, ("input",))
