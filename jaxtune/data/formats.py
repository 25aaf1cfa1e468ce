"""Record formats: field renaming, Alpaca, Self-Instruct, chat `messages` and TRL's dataset formats.

A task's source yields raw records; `TaskRecords` turns them into the fields its templates use
(or, for conversations, the messages its chat template renders). `auto` (the default) reads TRL's
standard formats as they are, detected from the task's first record: language modelling
(`text`), prompt-completion (text or conversational) and conversational (`messages`), besides
plain `prompt`/`response` fields. Errors are `SourceError`s naming the record (`_where`), the
field and what was expected, so the task's `on_error` policy can either stop the run or skip and
count the record.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxtune.data.sources import SourceError
from jaxtune.errors import UserError

FORMATS = ("auto", "fields", "alpaca", "self_instruct", "chat", "text", "prompt_completion")
DEFAULT_TEMPLATE = ("{prompt}", "{response}")  # a task's default template (config/schema.py task_config)
TRAINED_FROM_KEY = "_trained_from"  # chat records: assistant messages before this index are prompt (not trained)

# The shapes `auto` recognises, tried in this order: (format, the fields it needs, what it is).
SHAPES = (
    ("chat", ("messages",), "conversational: 'messages' [{role, content}, ...] (extra columns are ignored)"),
    ("prompt_completion", ("prompt", "completion"), "prompt-completion: 'prompt' + 'completion', text or messages"),
    ("text", ("text",), "language modelling: 'text'"),
    ("fields", ("prompt", "response"), "'prompt' + 'response' (the default template's fields)"),
    ("alpaca", ("instruction", "output"), "Alpaca: 'instruction' (+ 'input') + 'output'"),
)
CHAT_ROLES = ("system", "user", "assistant", "tool")


MISSING = object()  # what nested_value returns for a path the record does not have


def nested_value(record: Mapping[str, Any], path: str) -> Any:
    """The value at `a.b.0` (nested columns, e.g. SQuAD's answers.text.0), or MISSING."""
    value: Any = record
    for part in path.split("."):
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        elif isinstance(value, (list, tuple)) and part.lstrip("-").isdigit() and -len(value) <= int(part) < len(value):
            value = value[int(part)]
        else:
            return MISSING
    return value


def _lookup(record: Mapping[str, Any], path: str, where: str) -> Any:
    value = nested_value(record, path)
    if value is MISSING:
        available = ", ".join(sorted(k for k in record if k != "_where")) or "(none)"
        raise SourceError(f"{where}: field mapping names {path!r}, which the record does not have; available fields: {available}")
    return value


def map_fields(record: Mapping[str, Any], mapping: Mapping[str, str]) -> dict[str, Any]:
    """Renames columns: `mapping` is {template_field: source_column}; other columns stay as they are."""
    where = str(record.get("_where", "record"))
    out = {k: v for k, v in record.items() if k not in mapping.values()}
    for name, column in mapping.items():
        out[name] = _lookup(record, column, where)
    return out


def _text(record: Mapping[str, Any], key: str, where: str, *, optional: bool = False) -> str:
    value = record.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        found = "missing" if key not in record else f"a {type(value).__name__}"
        raise SourceError(f"{where}: field {key!r} is {found}; expected text")
    return value


def _instruction_prompt(instruction: str, input_text: str) -> str:
    """The instruction, followed by its input (when there is one) after a blank line."""
    return f"{instruction}\n\n{input_text}" if input_text.strip() else instruction


def alpaca_fields(record: Mapping[str, Any]) -> dict[str, Any]:
    """Alpaca (`instruction`, `input`, `output`) -> also `prompt`/`response` for the default template."""
    where = str(record.get("_where", "record"))
    instruction = _text(record, "instruction", where)
    input_text = _text(record, "input", where, optional=True)
    output = _text(record, "output", where)
    return {**record, "instruction": instruction, "input": input_text, "output": output,
            "prompt": _instruction_prompt(instruction, input_text), "response": output}


def self_instruct_instances(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Self-Instruct (`instruction`, `instances: [{input, output}]`): one example per instance."""
    where = str(record.get("_where", "record"))
    instruction = _text(record, "instruction", where)
    instances = record.get("instances")
    if not isinstance(instances, list) or not instances:
        raise SourceError(f"{where}: field 'instances' must be a non-empty list of {{input, output}} objects")
    out = []
    for i, instance in enumerate(instances):
        label = f"{where} instance {i}"
        if not isinstance(instance, Mapping):
            raise SourceError(f"{label}: expected an object with 'input' and 'output', found {type(instance).__name__}")
        input_text = _text(instance, "input", label, optional=True)
        output = _text(instance, "output", label)
        out.append({"instruction": instruction, "input": input_text, "output": output,
                    "prompt": _instruction_prompt(instruction, input_text), "response": output, "_where": label})
    return out


def check_message_list(messages: Any, where: str, field: str = "messages") -> list[dict[str, str]]:
    """A non-empty list of {role, content} messages with known roles and text content."""
    if not isinstance(messages, list) or not messages:
        raise SourceError(f"{where}: field {field!r} must be a non-empty list of {{role, content}} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise SourceError(f"{where}: {field}[{i}] must be an object with a 'role' and a 'content'")
        if message["role"] not in CHAT_ROLES:
            raise SourceError(f"{where}: {field}[{i}] has role {message['role']!r}; expected one of {', '.join(CHAT_ROLES)}")
        if not isinstance(message.get("content"), str):
            raise SourceError(f"{where}: {field}[{i}].content must be text, found {type(message.get('content')).__name__}")
    return [dict(m) for m in messages]


def check_messages(record: Mapping[str, Any]) -> list[dict[str, str]]:
    """A chat record's `messages`: a list of {role, content} with known roles and an assistant turn."""
    where = str(record.get("_where", "record"))
    messages = check_message_list(record.get("messages"), where)
    if not any(m["role"] == "assistant" for m in messages):
        raise SourceError(f"{where}: the conversation has no assistant message to train on")
    return messages


def detect_format(record: Mapping[str, Any], where: str, *, task: str = "") -> str:
    """The format of a record by its fields (SHAPES); a record that fits none is an error listing them."""
    for fmt, needed, _ in SHAPES:
        if all(k in record for k in needed):
            return fmt
    found = ", ".join(sorted(k for k in record if not k.startswith("_"))) or "(none)"
    hint = ""
    if "chosen" in record and "rejected" in record:
        hint = " (a preference pair: train it with objective.type dpo, kto or reward)"
    elif set(record) - {"_where"} == {"prompt"}:
        hint = " (prompt-only records are prompts for objective.type grpo)"
    expected = "; ".join(f"{what}" for _, _, what in SHAPES)
    label = f" (task {task!r})" if task else ""
    raise UserError(f"{where}{label}: the record's fields ({found}) fit none of the shapes this task reads{hint}; "
                    f"expected {expected}; or map columns with the task's fields=, or give it templates= or format=")


class TaskRecords:
    """A task's examples as random-access field dicts: field mapping + record format applied.

    Self-Instruct records expand to one example per instance, so the source is scanned once up
    front to index (record, instance) pairs; records that fail then are skipped (counted in
    `skipped_at_open`) or raise, per `on_error`.
    """

    def __init__(self, source: Sequence[dict], *, fmt: str = "fields", fields: Mapping[str, str] | None = None,
                 on_error: str = "error", task: str = "", templated: bool = False):
        if fmt not in FORMATS:
            raise UserError(f"task {task!r}: unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
        self.source, self.fmt, self.fields, self.task = source, fmt, dict(fields or {}), task
        self.on_error = on_error
        self.skipped_at_open = 0
        self._index: np.ndarray | None = None
        if fmt == "auto":  # a task with its own templates reads fields; else the first record's shape decides
            self.fmt = "fields" if templated else detect_format(self._first(), self._first().get("_where", "record"),
                                                                task=task)
        # Conversations are rendered with a chat template: `messages`, or prompt-completion with a message-list prompt
        self.chat = self.fmt == "chat" or (self.fmt == "prompt_completion" and isinstance(self._first().get("prompt"), list))
        fmt = self.fmt
        if fmt == "self_instruct":
            pairs = []
            for i in range(len(source)):
                try:
                    count = len(self._expand(source[i]))
                except SourceError:
                    if on_error != "skip":
                        raise
                    self.skipped_at_open += 1
                    continue
                pairs.extend((i, j) for j in range(count))
            if not pairs:
                raise UserError(f"task {task!r}: no usable Self-Instruct instances in the source")
            self._index = np.asarray(pairs, dtype=np.int64)

    def _first(self) -> dict:
        """The first record (field mapping applied) that reads, the one formats are detected from."""
        if not hasattr(self, "_first_record"):
            for i in range(min(len(self.source), 100)):
                try:
                    self._first_record = map_fields(self.source[i], self.fields)
                    break
                except SourceError:
                    if self.on_error != "skip":
                        raise
            else:
                raise UserError(f"task {self.task!r}: none of the first records could be read")
        return self._first_record

    def _expand(self, record: dict) -> list[dict]:
        return self_instruct_instances(map_fields(record, self.fields))

    def __len__(self) -> int:
        return len(self._index) if self._index is not None else len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            return self._read(index)
        except SourceError as e:
            if self.on_error != "skip":
                raise
            return {"_error": str(e), "_where": str(e).split(": ", 1)[0]}

    def _read(self, index: int) -> dict[str, Any]:
        if self._index is not None:
            record, instance = self._index[index]
            return self._expand(self.source[int(record)])[int(instance)]
        record = map_fields(self.source[index], self.fields)
        if self.fmt == "alpaca":
            return alpaca_fields(record)
        if self.fmt == "chat":
            return {**record, "messages": check_messages(record)}
        if self.fmt == "text":  # language modelling: every token of the text is trained
            return {**record, "prompt": "", "response": _text(record, "text", str(record.get("_where", "record")))}
        if self.fmt == "prompt_completion":
            return self._prompt_completion(record)
        return record

    def _prompt_completion(self, record: dict[str, Any]) -> dict[str, Any]:
        """TRL's prompt-completion: the loss covers the completion only. Text becomes prompt/response;
        a conversational prompt (messages) + completion becomes one conversation whose assistant turns
        before the completion are not trained (`TRAINED_FROM_KEY`)."""
        where = str(record.get("_where", "record"))
        if isinstance(record.get("prompt"), list) != self.chat:
            kind = "conversational (messages)" if self.chat else "text"
            raise SourceError(f"{where}: field 'prompt' is a {type(record.get('prompt')).__name__}, but this task's "
                              f"prompt-completion records are {kind}, as its first record is")
        if not self.chat:
            return {**record, "prompt": _text(record, "prompt", where), "response": _text(record, "completion", where)}
        prompt = check_message_list(record.get("prompt"), where, field="prompt")
        completion = record.get("completion")
        reply = ([{"role": "assistant", "content": completion}] if isinstance(completion, str)
                 else check_message_list(completion, where, field="completion"))
        if not any(m["role"] == "assistant" for m in reply):
            raise SourceError(f"{where}: field 'completion' holds no assistant message to train on")
        return {**record, "messages": prompt + reply, TRAINED_FROM_KEY: len(prompt)}
