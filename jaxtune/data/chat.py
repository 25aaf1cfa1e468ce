"""Chat data: `messages` rendered with a model's own chat template, and the assistant spans to train.

Templates are the jinja strings Hugging Face tokenizers carry (`chat_template` in
`tokenizer_config.json`), rendered in a jinja2 sandbox configured the way `transformers` does
(trim_blocks, lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, a JSON `tojson`),
so `render_chat` gives the same text as `apply_chat_template(..., tokenize=False)`. A few
formats are built in by name.

The loss mask comes from rendering prefixes of the conversation: the text an assistant turn
adds after the generation prompt (its content and the end-of-turn token) is the trained span.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path

from jaxtune import paths
from jaxtune.errors import UserError

# Written for jaxtune after each model family's published prompt format.
BUILTIN_TEMPLATES: dict[str, str] = {
    "llama3": (
        "{{ bos_token }}{% for message in messages %}"
        "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
        "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
    # Gemma has no system role: a system prompt opens the first user turn.
    "gemma": (
        "{{ bos_token }}{% if messages and messages[0]['role'] == 'system' %}"
        "{% set system = messages[0]['content'] | trim %}{% set turns = messages[1:] %}"
        "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
        "{% for message in turns %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "<start_of_turn>{{ role }}\n{% if loop.first and system %}{{ system }}\n\n{% endif %}"
        "{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    ),
    "chatml": (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    # Qwen2/2.5: ChatML with a default system prompt.
    "qwen": (
        "{% if not messages or messages[0]['role'] != 'system' %}"
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "alpaca": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
        "{% elif message['role'] == 'user' %}### Instruction:\n{{ message['content'] }}\n\n"
        "{% elif message['role'] == 'assistant' %}### Response:\n{{ message['content'] }}{{ eos_token }}\n\n"
        "{% else %}{{ raise_exception('alpaca template: unsupported role ' + message['role']) }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}### Response:\n{% endif %}"
    ),
    "plain": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] == 'assistant' %}Assistant: {{ message['content'] }}{{ eos_token }}\n"
        "{% else %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
    ),
}


def resolve_template(template: str) -> str:
    """A built-in name, a jinja string, a `.jinja` file, or a `tokenizer_config.json` -> jinja text."""
    if template in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[template]
    if "{{" in template or "{%" in template:
        return template
    path = paths.path(template)
    if path.is_dir():
        path = path / "tokenizer_config.json"
    if path.is_file():
        if path.suffix == ".json":
            return chat_template_from_config(path)
        return path.read_text()
    raise UserError(
        f"chat template {template!r}: not a built-in name ({', '.join(BUILTIN_TEMPLATES)}), "
        "a jinja string, a .jinja file or a tokenizer_config.json"
    )


def chat_template_from_config(path: str | Path) -> str:
    """The `chat_template` of a Hugging Face `tokenizer_config.json` (a string, or the 'default' entry)."""
    path = paths.path(path)
    try:
        value = json.loads(path.read_text()).get("chat_template")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise UserError(f"{path}: not a valid tokenizer_config.json: {e}") from None
    if isinstance(value, list):  # [{"name": "default", "template": ...}, ...]
        value = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}.get("default")
    if not isinstance(value, str) or not value:
        raise UserError(f"{path}: has no chat_template; set the task's chat_template to a built-in name "
                        f"({', '.join(BUILTIN_TEMPLATES)}) or a jinja string")
    return value


def _raise_exception(message):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters; chat templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _generation_tag():
    """`{% generation %}...{% endgeneration %}` (HF's assistant-mask marker) renders its body unchanged here;
    the trained spans come from prefix rendering instead."""
    import jinja2.ext

    class Generation(jinja2.ext.Extension):
        tags = frozenset({"generation"})

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    return Generation


@functools.lru_cache(maxsize=64)
def _compile(source: str):
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, _generation_tag()])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except Exception as e:  # jinja2.TemplateSyntaxError
        line = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
        raise UserError(f"chat template does not compile{line}: {e}") from None


def check_template(template: str) -> None:
    """Compiles a chat template (name, jinja text or file) now, so a syntax error stops a run before it starts."""
    _compile(resolve_template(template))


def render_chat(
    messages: Sequence[Mapping[str, str]],
    template: str,
    *,
    bos_token: str | None = None,
    eos_token: str | None = None,
    add_generation_prompt: bool = False,
) -> str:
    """The conversation as text, exactly as `transformers`' `apply_chat_template(..., tokenize=False)`.

    `template` is a built-in name (llama3, gemma, chatml, qwen, alpaca, plain) or a jinja string;
    the special tokens fill the template variables of the same names.
    """
    from jinja2.exceptions import TemplateError

    compiled = _compile(resolve_template(template))
    variables = {k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token)) if v is not None}
    try:
        return compiled.render(messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt, **variables)
    except TemplateError as e:
        raise UserError(f"chat template failed on this conversation: {e}") from None


def assistant_segments(
    messages: Sequence[Mapping[str, str]],
    template: str,
    *,
    bos_token: str | None = None,
    eos_token: str | None = None,
    trained_from: int = 0,
) -> list[tuple[str, bool]]:
    """The rendered conversation as `(text, trained)` pieces; trained = an assistant turn's reply
    (only those at message index >= `trained_from`: a prompt-completion record's completion).

    An assistant turn's span is what rendering through that turn adds after the generation
    prompt: its content and end-of-turn token. Templates whose earlier text changes when later
    turns are added (e.g. ones that drop past reasoning) cannot be split this way and are reported.
    """
    kw = {"bos_token": bos_token, "eos_token": eos_token}
    full = render_chat(messages, template, **kw)
    pieces: list[tuple[str, bool]] = []
    done = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render_chat(messages[:i], template, add_generation_prompt=True, **kw)
        through = render_chat(messages[: i + 1], template, **kw)
        if not (through.startswith(prompt) and full.startswith(through) and len(prompt) >= done):
            raise UserError(
                f"chat template: the text before assistant message {i} changes as the conversation grows, "
                "so its trained span cannot be found by prefix rendering; use a template whose turns render "
                "independently"
            )
        pieces.append((full[done : len(prompt)], False))
        pieces.append((full[len(prompt) : len(through)], i >= trained_from))
        done = len(through)
    pieces.append((full[done:], False))
    return [(text, trained) for text, trained in pieces if text]
