"""`jaxtune generate --chat`: an interactive conversation rendered with a chat template.

Each user line is appended to the conversation, the whole conversation is rendered with the chat
template (generation prompt added) and tokenized exactly as SFT chat training tokenizes it
(`encode_with_specials`: BOS/EOS text -> their ids; a BOS added only under data.add_bos='true'),
and the reply is sampled until EOS or the template's end-of-turn token. The reply then joins the
conversation as the assistant turn.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import IO

from jaxtune import generate as generate_lib
from jaxtune.data import chat as chat_lib
from jaxtune.data.tokenizers import Tokenizer, encode_with_specials, start_sequence
from jaxtune.errors import UserError

EXIT_COMMAND = "/exit"
_MARK = "\x00reply\x00"  # an assistant content no template writes by itself


def choose_template(explicit: str | None, tokenizer: Tokenizer, config=None) -> str:
    """Jinja text of `--chat_template`, else the run's (single) task chat template, else the tokenizer's."""
    if explicit:
        return chat_lib.resolve_template(explicit)
    tasks = config.data.get("tasks") if config is not None else None
    trained = {t.get("chat_template") for t in (tasks or {}).values() if t.get("format") == "chat"} - {"", None}
    if len(trained) == 1:
        return chat_lib.resolve_template(trained.pop())
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    raise UserError(
        "generate --chat: no chat template; the tokenizer has none, so pass --chat_template with a built-in name "
        f"({', '.join(chat_lib.BUILTIN_TEMPLATES)}), a jinja string, a .jinja file or a tokenizer_config.json"
    )


def end_of_turn(template: str, tokenizer: Tokenizer) -> str:
    """The text the template writes after an assistant reply (e.g. `<|im_end|>`; "" for none)."""
    kw = dict(bos_token=getattr(tokenizer, "bos_token", None), eos_token=getattr(tokenizer, "eos_token", None))
    text = chat_lib.render_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": _MARK}], template, **kw)
    return text[text.rfind(_MARK) + len(_MARK):].strip() if _MARK in text else ""


def stop_tokens(tokenizer: Tokenizer, end_text: str) -> tuple[int, ...]:
    """EOS, plus the end-of-turn token when the tokenizer spells it as a single token."""
    ids = encode_with_specials(tokenizer, end_text) if end_text else []
    return tuple(dict.fromkeys([tokenizer.eos_id, *ids] if len(ids) == 1 else [tokenizer.eos_id]))


@dataclasses.dataclass(frozen=True)  # frozen: one instance is the default of `chat`
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    stop_strings: Sequence[str] = ()


def chat(model, params, tokenizer: Tokenizer, template: str, *, stdin: IO[str], stdout: IO[str],
         sampling: Sampling = Sampling(), system: str | None = None, show_prompt: IO[str] | None = None) -> list[dict]:
    """Reads user lines from `stdin` until EOF or `/exit`, writes one reply line each to `stdout`;
    returns the conversation. `show_prompt`: a stream that receives each rendered prompt."""
    kw = dict(bos_token=getattr(tokenizer, "bos_token", None), eos_token=getattr(tokenizer, "eos_token", None))
    end_text = end_of_turn(template, tokenizer)
    stops = stop_tokens(tokenizer, end_text)
    stop_strings = [*sampling.stop_strings, *([end_text] if end_text else [])]
    messages = [{"role": "system", "content": system}] if system else []
    interactive = stdin.isatty()
    for turn, line in enumerate(_lines(stdin, stdout if interactive else None)):
        messages.append({"role": "user", "content": line})
        prompt = chat_lib.render_chat(messages, template, add_generation_prompt=True, **kw)
        if show_prompt is not None:
            show_prompt.write(prompt + "\n")
            show_prompt.flush()
        tokens = generate_lib.generate(
            model, params, [start_sequence(tokenizer, encode_with_specials(tokenizer, prompt), chat=True)],
            max_new_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p, stop_tokens=stops,
            seed=sampling.seed + turn, pad_id=tokenizer.pad_id, batch_size=1,
        )[0]
        reply = generate_lib.decode_completion(tokenizer.decode, tokens, stop_strings).strip()
        stdout.write(reply + "\n")
        stdout.flush()
        messages.append({"role": "assistant", "content": reply})
    return messages


def _lines(stdin: IO[str], prompt_to: IO[str] | None):
    """Non-empty user lines until EOF or `/exit` (a `> ` prompt when reading a terminal)."""
    while True:
        if prompt_to is not None:
            prompt_to.write("> ")
            prompt_to.flush()
        line = stdin.readline()
        if not line or line.strip() == EXIT_COMMAND:
            return
        if line.strip():
            yield line.rstrip("\n")
