"""Which texts of a record the data tools compare: the text a task trains on, not ids or provenance.

A record's format is recognised by its keys (the formats jaxtune's data tasks and TRL read):
- chat: `messages` (or `conversations`) - every message's `content`; the prompt part is the user turns;
- Alpaca: `instruction`, `input`, `output` - prompt part: instruction and input;
- Self-Instruct: `instruction`, `instances` (a list of {input, output}) - prompt part: instruction and
  the instances' inputs;
- preference / TRL: `prompt`, `chosen`, `rejected`, `completion` (strings or message lists; TRL's
  KTO `label` is a boolean, not text) - prompt part: `prompt` (or the user turns of a conversational one);
- TRL language modelling: `text` - the whole text (it has no prompt part);
- evaluation sets: `question`, `query`, `problem` count as prompts, `answer`, `response`, `solution`,
  `choices` as answers.
Everything else (`id`, `parent_id`, `most_similar`, `source`, scores, ...) is metadata and ignored.
A record with none of these keys falls back to every string in it (one with only answer keys has
no prompt part). `fields` names the fields to
compare instead ("a.b.0" reads nested values; a list or dict gives every string in it).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from jaxtune.datatools import ngrams

PARTS = ("all", "prompt")
CHAT_KEYS = ("messages", "conversations")
PROMPT_KEYS = ("instruction", "input", "prompt", "question", "query", "problem", "text")
ANSWER_KEYS = ("output", "instances", "chosen", "rejected", "completion", "answer", "response", "solution", "choices")
_PROMPT_ROLES = ("user", "human")


def _messages(value: Any, prompt_only: bool) -> Iterator[str]:
    """Contents of a message list (ShareGPT `from`/`value` too); with prompt_only, user turns only."""
    for message in value if isinstance(value, (list, tuple)) else ():
        if not isinstance(message, Mapping):
            continue
        role = message.get("role", message.get("from"))
        if prompt_only and role not in _PROMPT_ROLES:
            continue
        content = message.get("content", message.get("value"))
        yield from ngrams.strings(content)


def _is_messages(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(m, Mapping) for m in value)


def _instances(value: Any, prompt_only: bool) -> Iterator[str]:
    for instance in value if isinstance(value, (list, tuple)) else ():
        if isinstance(instance, Mapping):
            yield from ngrams.strings(instance.get("input", ""))
            if not prompt_only:
                yield from ngrams.strings(instance.get("output", ""))
        else:
            yield from () if prompt_only else ngrams.strings(instance)


def trained_texts(record: Mapping[str, Any], part: str = "all") -> tuple[list[str], tuple[str, ...]]:
    """(texts, the keys they came from) of a record by its format (module docstring); part="prompt"
    keeps only the prompt side (user turns, instruction/input, `prompt`)."""
    prompt_only = part == "prompt"
    texts: list[str] = []
    used: list[str] = []

    def take(label: str, got: list[str]) -> None:
        if got:  # a key without text (a number, a boolean label, None) is not reported as compared
            texts.extend(got)
            used.append(label)

    for key in CHAT_KEYS:
        if key in record:
            take(f"{key}[{'user' if prompt_only else '*'}].content", list(_messages(record[key], prompt_only)))
    for key in PROMPT_KEYS + ANSWER_KEYS:
        if key not in record:
            continue
        value = record[key]
        if key == "instances":  # Self-Instruct: the inputs are prompt text, the outputs answers
            take("instances[*].input" if prompt_only else key, list(_instances(value, prompt_only)))
        elif prompt_only and key in ANSWER_KEYS:
            continue
        elif _is_messages(value):  # conversational TRL prompt/chosen/rejected/completion
            take(key, list(_messages(value, prompt_only)))
        else:
            take(key, list(ngrams.strings(value)))
    if not used and not any(key in record for key in CHAT_KEYS + PROMPT_KEYS + ANSWER_KEYS):
        return ngrams.text_fields(record), ("*",)  # an unknown format: every string
    return texts, tuple(used)


def record_texts(record: Mapping[str, Any], fields: Sequence[str] = (), part: str = "all") -> tuple[list[str], tuple[str, ...]]:
    """The texts compared: the named `fields` when given, else `trained_texts` (module docstring)."""
    if fields:
        return ngrams.text_fields(record, fields), tuple(fields)
    return trained_texts(record, part)


def record_words(record: Mapping[str, Any], fields: Sequence[str] = (), part: str = "all") -> list[list[str]]:
    """Normalised words per compared text (n-grams never span two texts)."""
    texts, _ = record_texts(record, fields, part)
    return [w for w in (ngrams.words(t) for t in texts) if w]


class FieldTally:
    """Counts which fields were compared, for the reports ({"instruction,input,output": 1000, ...})."""

    def __init__(self):
        self.counts: dict[str, int] = {}

    def add(self, used: Sequence[str]) -> None:
        key = ",".join(used)
        self.counts[key] = self.counts.get(key, 0) + 1
