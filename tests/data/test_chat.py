"""render_chat equals transformers' apply_chat_template; assistant spans are the trained text."""

import pytest

from jaxtune.data import render_chat
from jaxtune.data.chat import BUILTIN_TEMPLATES, assistant_segments, chat_template_from_config
from jaxtune.errors import UserError

# A Hub-style template (Mistral/Zephyr family): role checks with raise_exception, namespace, loop controls.
HF_STYLE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}\n"
    "{{- bos_token }}\n"
    "{%- for message in loop_messages %}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}\n"
    "    {%- endif %}\n"
    "    {%- if message['role'] == 'user' %}\n"
    "        {%- if loop.first and system_message is defined %}\n"
    "            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n"
    "        {%- else %}\n"
    "            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n"
    "        {%- endif %}\n"
    "    {%- elif message['role'] == 'assistant' %}\n"
    "        {{- ' ' + message['content'] + eos_token }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
)

CONVERSATIONS = {
    "single": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    "system_multi": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "  and 3+3 <b>?</b>  "},
        {"role": "assistant", "content": "6"},
    ],
    "open": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Tell me a joke"}],
}


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token=None)


# A template with HF's {% generation %} assistant marker.
GENERATION_TAG = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{% generation %}"
    "ASSISTANT: {{ message['content'] }}{{ eos_token }}{% endgeneration %}\n"
    "{% else %}{{ message['role'] | upper }}: {{ message['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@pytest.mark.parametrize("template", [*BUILTIN_TEMPLATES, "hf_style", "generation_tag"])
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_render_chat_matches_apply_chat_template(hf_tokenizer, template, conversation, generation_prompt):
    source = {"hf_style": HF_STYLE, "generation_tag": GENERATION_TAG}.get(template) or BUILTIN_TEMPLATES[template]
    messages = CONVERSATIONS[conversation]
    expected = hf_tokenizer.apply_chat_template(
        messages, chat_template=source, tokenize=False, add_generation_prompt=generation_prompt
    )
    ours = render_chat(messages, template if template in BUILTIN_TEMPLATES else source, bos_token="<s>", eos_token="</s>",
                       add_generation_prompt=generation_prompt)
    assert ours == expected


def test_llama3_text_is_the_published_format():
    text = render_chat(CONVERSATIONS["system_multi"][:3], "llama3", bos_token="<|begin_of_text|>")
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>"
    )
    gemma = render_chat(CONVERSATIONS["system_multi"][:3], "gemma", bos_token="<bos>")
    assert gemma == "<bos><start_of_turn>user\nYou are terse.\n\n2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n"


@pytest.mark.parametrize("template", ["llama3", "gemma", "chatml", "alpaca"])
def test_assistant_segments_cover_replies_and_end_of_turn(template):
    messages = CONVERSATIONS["system_multi"]
    pieces = assistant_segments(messages, template, bos_token="<s>", eos_token="</s>")
    assert "".join(t for t, _ in pieces) == render_chat(messages, template, bos_token="<s>", eos_token="</s>")
    trained = [t for t, on in pieces if on]
    assert len(trained) == 2 and trained[0].startswith("4") and trained[1].startswith("6")
    end = {"llama3": "<|eot_id|>", "gemma": "<end_of_turn>", "chatml": "<|im_end|>", "alpaca": "</s>"}[template]
    assert all(end in t for t in trained)  # the end-of-turn token is trained
    assert not any("2+2" in t for t in trained)


def test_errors(tmp_path):
    with pytest.raises(UserError, match="roles must alternate"):
        render_chat([{"role": "assistant", "content": "x"}], HF_STYLE, bos_token="<s>", eos_token="</s>")
    with pytest.raises(UserError, match="not a built-in name"):
        render_chat([], "nonexistent")
    with pytest.raises(UserError, match="does not compile"):
        render_chat([], "{% for %}")
    config = tmp_path / "tokenizer_config.json"
    config.write_text('{"eos_token": "</s>"}')
    with pytest.raises(UserError, match="has no chat_template"):
        chat_template_from_config(config)
    config.write_text('{"chat_template": "{{ messages[0].content }}"}')
    assert render_chat([{"role": "user", "content": "x"}], str(tmp_path)) == "x"


def test_sandbox_blocks_attribute_escapes():
    with pytest.raises(UserError, match="unsafe"):
        render_chat([{"role": "user", "content": "x"}], "{{ ''.__class__.__subclasses__() }}")


def test_chat_tokens_one_bos_and_trained_end_of_turn(tmp_path):
    from jaxtune.data.examples import ExampleBuilder, TaskSpec
    from jaxtune.data.tokenizers import train_sentencepiece

    messages = CONVERSATIONS["system_multi"]
    text = render_chat(messages, "llama3")
    tok = train_sentencepiece([text] * 20, tmp_path / "sp", vocab_size=300)
    task = TaskSpec("chat", [{"messages": messages}], chat_template=BUILTIN_TEMPLATES["alpaca"])
    builder = ExampleBuilder(task, 0, tok, seq_len=512, seed=0)
    tokens, trained = builder.chat_tokens({"messages": messages})
    assert tokens[0] == tok.bos_id and tok.bos_id not in tokens[1:]  # the template's BOS, once
    assert tokens.count(tok.eos_id) == 2 and all(trained[i] for i, t in enumerate(tokens) if t == tok.eos_id)
    assert tok.decode([t for t, on in zip(tokens, trained) if on]).split() == ["4", "6"]
    example = builder(0, {"messages": messages, "_where": "c.jsonl:1"})
    assert example["loss_mask"].sum() == sum(trained) and example["inputs"][0] == tok.bos_id
