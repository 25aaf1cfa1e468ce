"""TRL's standard dataset formats read as they are (format='auto', detected per task) and the span
each one trains: language modelling every token, prompt-completion the completion only,
conversations the assistant turns (rendered with the chat template)."""

import json

import numpy as np
import pytest

from jaxtune.config import task_config
from jaxtune.data import chat, datasets
from jaxtune.data.examples import ExampleBuilder
from jaxtune.errors import UserError
from tests.data.test_pipeline import CharTokenizer

TOK = CharTokenizer()
SYSTEM = {"role": "system", "content": "Be brief."}


def _example(tmp_path, records, **task_keys):
    """The first record's example as (whole text, trained text) through the task's real path."""
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    spec = datasets.task_spec("t", task_config(path=str(path), **task_keys))
    example = ExampleBuilder(spec, 0, TOK, seq_len=512, seed=0)(0, spec.records[0])
    targets, mask = example["targets"], example["loss_mask"].astype(bool)
    return TOK.decode(targets), TOK.decode(targets[mask]), targets[mask][-1], spec


def test_language_modelling_text_trains_every_token(tmp_path):
    whole, trained, last, spec = _example(tmp_path, [{"text": "The sky is blue."}])
    assert spec.records.fmt == "text" and trained == whole == "The sky is blue." and last == TOK.eos_id


def test_prompt_completion_text_trains_the_completion_only(tmp_path):
    whole, trained, last, _ = _example(tmp_path, [{"prompt": "The sky is", "completion": " blue."}])
    assert whole == "The sky is blue." and trained == " blue." and last == TOK.eos_id


def test_conversational_prompt_completion_trains_the_completion_turn_only(tmp_path):
    prompt = [SYSTEM, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
              {"role": "user", "content": "Sky colour?"}]
    record = {"prompt": prompt, "completion": [{"role": "assistant", "content": "Blue."}]}
    whole, trained, _, spec = _example(tmp_path, [record], chat_template="chatml")
    assert spec.records.fmt == "prompt_completion" and spec.records.chat
    # the whole text is the template's rendering of the conversation (apply_chat_template parity: test_chat.py)
    rendered = chat.render_chat(prompt + record["completion"], chat.resolve_template("chatml"))
    assert whole == rendered[1:]  # targets: every token after the first
    assert trained == "Blue.<|im_end|>\n"  # the earlier assistant turn is prompt, as in TRL


@pytest.mark.parametrize("extra", [{"source": "capybara"}, {"id": "tulu_1", "source": "flan_v2"}])
def test_conversational_messages_with_a_system_turn_and_extra_columns(tmp_path, extra):
    messages = [SYSTEM, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Blue."}]
    whole, trained, _, spec = _example(tmp_path, [{"messages": messages, **extra}], chat_template="chatml")
    assert spec.records.fmt == "chat" and "Be brief." in whole
    assert trained == "Hello.<|im_end|>\nBlue.<|im_end|>\n"  # every assistant turn (jaxtune's conversational SFT)


def test_format_override_and_own_templates_skip_detection(tmp_path):
    _, trained, _, spec = _example(tmp_path, [{"text": "abc", "prompt": "p", "completion": "c"}], format="text")
    assert spec.records.fmt == "text" and trained == "abc"
    _, trained, _, spec = _example(tmp_path, [{"text": "abc"}], templates=(("Say:", " {text}"),))
    assert spec.records.fmt == "fields" and trained == " abc"


def test_mixed_prompt_kinds_and_unknown_shapes_are_clear_errors(tmp_path):
    records = [{"prompt": "p", "completion": "c"}, {"prompt": [{"role": "user", "content": "p"}], "completion": "c"}]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    spec = datasets.task_spec("t", task_config(path=str(path)))
    with pytest.raises(UserError, match=r"mixed.jsonl:2: field 'prompt' is a list, but this task's prompt-completion "
                                        r"records are text"):
        ExampleBuilder(spec, 0, TOK, seq_len=64, seed=0)(1, spec.records[1])
    with pytest.raises(UserError, match=r"data.jsonl:1 \(task 't'\): the record's fields \(chosen, rejected\) fit none"
                                        r".*a preference pair: train it with objective.type dpo"):
        _example(tmp_path, [{"chosen": "a", "rejected": "b"}])


def test_messages_are_rendered_with_data_chat_template_when_the_task_names_none(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}))
    spec = datasets.task_spec("t", task_config(path=str(path)), tokenizer_chat_template="chatml")
    assert spec.chat_template == chat.resolve_template("chatml")
    assert np.any(ExampleBuilder(spec, 0, TOK, seq_len=64, seed=0)(0, spec.records[0])["loss_mask"])
