"""Preference data: (prompt, chosen, rejected) pairs and unpaired KTO examples -> [B, 2, T] batches.

Record shapes (JSONL, one object per line):
  * explicit prompt: ``{"prompt": ..., "chosen": ..., "rejected": ...}`` (extra fields feed templates);
  * common prefix: ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: A", "rejected": "...Assistant: B"}``:
    the prompt is the longest common prefix, cut back to a word boundary so that neither
    completion starts mid-word (the whitespace goes with the completions, as in SFT targets);
  * unpaired (KTO): ``{"prompt": ..., "completion": ..., "label": true|false}``;
  * chat ``messages`` (lists of ``{role, content}``), the shapes TRL reads: ``{"chosen": [...],
    "rejected": [...]}`` two conversations that differ only in their final assistant turn (the shared
    turns are the prompt); ``{"prompt": [...], "chosen": [assistant message], "rejected": [...]}``;
    ``{"prompt": [...], "chosen": "text", "rejected": "text"}``; and for KTO ``{"prompt": [...],
    "completion": [assistant message] or "text", "label": ...}``.

Chat records are rendered with the chat template (`data.chat_template`, else the tokenizer's own)
and tokenized exactly as SFT chat examples (`chat.assistant_segments`, special-token text mapped to
ids, no BOS/EOS added beyond what the template writes): the prompt is the conversation with the
generation prompt, the completion is the rest of the full conversation's rendering, i.e. the
reply and its end-of-turn text, which is the span SFT trains for that turn. Other records: the
prompt is rendered with a template's input pattern and each completion with its target
pattern, ``{response}`` being the completion, then tokenized exactly as SFT examples are (BOS +
prompt, completion + EOS). The template is chosen from (seed, source index), so an example is
tokenized identically in every epoch and in the reference-log-prob pass.

For an encoder-decoder (`seq2seq`) the prompt is ``tokenizer(prompt)`` (ids + EOS, no BOS) on the
encoder side of both rows and each completion (ids + EOS) is a row's decoder labels
(`seq2seq_rows`; each stream cut to the row as SFT's encoder-decoder examples are).

A pair becomes two rows that share the prompt, ``[2, T]`` (0 = chosen, 1 = rejected), padded;
with data.packing, pair_packing.py lays many pairs' rows side by side instead. For KTO row 1 is the same prompt followed by a *mismatched* completion (the next
source record's), which scores the KL reference point. Truncation keeps the prompt's end and the
completions' start: when prompt + longest completion exceed the row, the prompt keeps its last
``max(row // 2, row - longest completion)`` tokens (BOS stays first) and the completions are cut
to what is left. A pair whose completions become identical (no preference left), or any over-long
pair under ``truncation='drop'``, is dropped and counted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from jaxtune.data import chat as chat_lib
from jaxtune.data import templates as templates_lib
from jaxtune.data import pair_packing
from jaxtune.data.examples import (DEFAULT_TASK, SKIP_KEY, TASK_KEY, TRUNCATED_KEY, CountExamples, TaskStats,
                                   TokenizeStats, encode_prompt, is_example, seq2seq_example, seq2seq_ids)
from jaxtune.data.formats import check_message_list
from jaxtune.batch import BATCH_KEYS, SEQ2SEQ_BATCH_KEYS
from jaxtune.data.pipeline import PipelineStats, pad_seq2seq_example, record_stream, sharded_batches
from jaxtune.data.tokenizers import Tokenizer, encode_with_specials, start_sequence
from jaxtune.errors import UserError

INDEX_KEY = "example_index"  # [B] global source index of each pair: keys precomputed reference log-probs
LABEL_KEY = "label"  # [B] KTO: 1 = desirable, 0 = undesirable
REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")  # [B] precomputed reference log-probs
_META = ("task", "_where", "_index")


@dataclasses.dataclass(frozen=True)
class Example:
    """A parsed record: prompt fields for the template, and the two completions (or one + label)."""

    fields: dict[str, Any]
    completions: tuple  # texts, or (chat records) one assistant message dict each
    label: int | None = None  # KTO only
    messages: tuple[dict[str, str], ...] | None = None  # chat records: the prompt conversation

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


def _where(record: Mapping[str, Any], index: int) -> str:
    return record.get("_where", f"record {index}")


def _text(record, key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        found = "missing" if value is None else f"a {type(value).__name__}"
        raise UserError(f"{where}: field {key!r} must be a string, found {found}")
    if not value:
        raise UserError(f"{where}: field {key!r} is empty")
    return value


def _is_chat(record: Mapping[str, Any], keys: Sequence[str]) -> bool:
    """Whether any of `keys` holds chat messages; then the record must be chat throughout (`_check_chat_kinds`)."""
    return any(isinstance(record.get(k), list) for k in keys)


def _check_chat_kinds(record: Mapping[str, Any], completion_keys: Sequence[str], where: str) -> None:
    """Chat records: the prompt (when given) is messages; the completions are all messages or all text."""
    lists = [k for k in ("prompt", *completion_keys) if isinstance(record.get(k), list)]
    if "prompt" in record and "prompt" not in lists:
        raise UserError(f"{where}: field {', '.join(map(repr, lists))} holds chat messages but 'prompt' is not a list of "
                        "messages; a chat record gives the prompt as messages too (or use text in every field)")
    kinds = {k: isinstance(record.get(k), list) for k in completion_keys if k in record}
    if len(set(kinds.values())) > 1 or ("prompt" not in record and not all(kinds.values())):
        text = [k for k, is_list in kinds.items() if not is_list]
        raise UserError(f"{where}: mixes chat messages and text: {', '.join(map(repr, text))} is text while "
                        f"{', '.join(repr(k) for k, is_list in kinds.items() if is_list)} holds messages; give "
                        "'chosen' and 'rejected' the same way (text completions need a 'prompt' list of messages)")


def _reply(record: Mapping[str, Any], key: str, where: str) -> dict[str, str]:
    """A completion as the assistant message that answers the prompt (text becomes its content)."""
    if isinstance(record.get(key), str):
        return {"role": "assistant", "content": _text(record, key, where)}
    messages = check_message_list(record.get(key), where, field=key)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        roles = ", ".join(m["role"] for m in messages)
        raise UserError(f"{where}: field {key!r} must be one assistant message (the reply to the prompt), "
                        f"found {len(messages)} message(s) with role(s) {roles}")
    return messages[0]


def _last_assistant(messages: list[dict[str, str]], key: str, where: str) -> None:
    if messages[-1]["role"] != "assistant":
        raise UserError(f"{where}: the last message of {key!r} must be the assistant's reply, "
                        f"found role {messages[-1]['role']!r}")


def parse_chat_pair(record: Mapping[str, Any], where: str) -> Example:
    """A chat pair: explicit prompt messages, or two conversations that differ only in their last turn."""
    _check_chat_kinds(record, ("chosen", "rejected"), where)
    fields = {k: v for k, v in record.items() if k not in _META + ("prompt", "chosen", "rejected")}
    if "prompt" in record:
        prompt = check_message_list(record["prompt"], where, field="prompt")
        chosen, rejected = _reply(record, "chosen", where), _reply(record, "rejected", where)
    else:
        conversations = [check_message_list(record[k], where, field=k) for k in ("chosen", "rejected")]
        for key, messages in zip(("chosen", "rejected"), conversations):
            _last_assistant(messages, key, where)
        prompt = conversations[0][:-1]
        if prompt != conversations[1][:-1]:
            at = next((i for i, (a, b) in enumerate(zip(*conversations)) if a != b), min(map(len, conversations)) - 1)
            raise UserError(f"{where}: 'chosen' and 'rejected' must be the same conversation up to their final "
                            f"assistant message (that shared part is the prompt), but they differ at message {at}; "
                            "or give the shared turns as a 'prompt' field")
        if not prompt:
            raise UserError(f"{where}: 'chosen' and 'rejected' hold only the assistant reply; the turns before it "
                            "(the prompt) are missing")
        chosen, rejected = conversations[0][-1], conversations[1][-1]
    if chosen == rejected:
        raise UserError(f"{where}: 'chosen' and 'rejected' are identical")
    return Example(fields, (chosen, rejected), messages=tuple(prompt))


def split_common_prefix(chosen: str, rejected: str, where: str = "record") -> tuple[str, str, str]:
    """(prompt, chosen completion, rejected completion) from two texts sharing their prompt."""
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    if n == len(chosen) and n == len(rejected):
        raise UserError(f"{where}: 'chosen' and 'rejected' are identical; a preference pair needs two different texts")
    # Cut back to the start of the word (or whitespace run) where the texts diverge.
    while n > 0 and not chosen[n - 1].isspace():
        n -= 1
    while n > 0 and chosen[n - 1].isspace():
        n -= 1
    if n == 0:
        raise UserError(
            f"{where}: no 'prompt' field and 'chosen'/'rejected' share no common prefix ending at a word boundary; "
            "add a 'prompt' field"
        )
    return chosen[:n], chosen[n:], rejected[n:]


def parse_pair(record: Mapping[str, Any], index: int = 0) -> Example:
    where = _where(record, index)
    fields = {k: v for k, v in record.items() if k not in _META + ("chosen", "rejected")}
    for key in ("chosen", "rejected"):
        if key not in record:
            raise UserError(f"{where}: the record's fields ({', '.join(sorted(k for k in record if k not in _META))}) fit "
                            f"no preference shape ({key!r} is missing); expected TRL's preference format: 'chosen' and "
                            "'rejected' (text or message lists) with an explicit 'prompt' or one implicit in their "
                            "shared start; or map columns with the task's fields=")
    if _is_chat(record, ("prompt", "chosen", "rejected")):
        return parse_chat_pair(record, where)
    chosen, rejected = _text(record, "chosen", where), _text(record, "rejected", where)
    if "prompt" in record:
        fields["prompt"] = _text(record, "prompt", where)
        if chosen == rejected:
            raise UserError(f"{where}: 'chosen' and 'rejected' are identical")
    else:
        fields["prompt"], chosen, rejected = split_common_prefix(chosen, rejected, where)
    return Example(fields, (chosen, rejected))


def parse_unpaired(record: Mapping[str, Any], index: int = 0) -> Example:
    where = _where(record, index)
    missing = [k for k in ("prompt", "completion", "label") if k not in record]
    if missing:
        raise UserError(f"{where}: the record's fields ({', '.join(sorted(k for k in record if k not in _META))}) "
                        f"fit no unpaired preference shape ({', '.join(map(repr, missing))} missing); expected TRL's "
                        "unpaired preference format: 'prompt', 'completion' (text or message lists) and a true/false "
                        "'label'; or map columns with the task's fields=")
    label = record.get("label")
    if not isinstance(label, (bool, int)) or label not in (0, 1):
        raise UserError(f"{where}: KTO field 'label' must be true/false (desirable or not), found {label!r}")
    fields = {k: v for k, v in record.items() if k not in _META + ("completion", "label")}
    if _is_chat(record, ("prompt", "completion")):
        _check_chat_kinds(record, ("completion",), where)
        fields.pop("prompt", None)
        prompt = check_message_list(record.get("prompt"), where, field="prompt")
        return Example(fields, (_reply(record, "completion", where),), int(label), messages=tuple(prompt))
    fields["prompt"] = _text(record, "prompt", where)
    return Example(fields, (_text(record, "completion", where),), int(label))


def render_chat_completions(
    messages: Sequence[Mapping[str, str]],
    replies: Sequence[Mapping[str, str]],
    template: str,
    *,
    bos_token: str | None = None,
    eos_token: str | None = None,
    where: str = "record",
) -> tuple[list[str], list[str]]:
    """(prompt pieces, completion texts) of a chat prompt and its candidate replies.

    The prompt is `messages` rendered with the generation prompt, in the pieces SFT chat tokenizes
    separately (split at earlier assistant turns), so its tokens equal SFT's; each completion is
    what rendering the conversation with that reply adds after it: the reply and its end-of-turn
    text, SFT's trained span for the turn. Text a template writes after the last turn is dropped.
    """
    kw = {"bos_token": bos_token, "eos_token": eos_token}
    prompt = chat_lib.render_chat(messages, template, add_generation_prompt=True, **kw)
    pieces, texts = [], []
    for reply in replies:
        full = chat_lib.render_chat([*messages, reply], template, **kw)
        if not full.startswith(prompt):
            raise UserError(f"{where}: the chat template's rendering of the conversation with its reply does not start "
                            f"with its rendering of the prompt (add_generation_prompt=True), {prompt[-40:]!r}, so the "
                            "reply's tokens cannot be told apart; use a template whose generation prompt opens the "
                            "assistant turn exactly as the turn is rendered")
        try:
            segments = chat_lib.assistant_segments([*messages, reply], template, **kw)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        last = max((i for i, (_, trained) in enumerate(segments) if trained), default=None)
        pieces = [text for text, _ in segments[:last or 0]]
        if last is None or "".join(pieces) != prompt:
            raise UserError(f"{where}: the chat template renders no text for the final assistant reply")
        texts.append(segments[last][0])
    return pieces, texts


def truncate_rows(
    prompt_ids: Sequence[int], completions: Sequence[Sequence[int]], *, seq_len: int, bos_id: int | None,
) -> tuple[list[int], list[list[int]]]:
    """Fits prompt + each completion into seq_len + 1 tokens: keep the prompt's end, completions' start."""
    budget = seq_len + 1
    longest = max(len(c) for c in completions)
    prompt = list(prompt_ids)
    if len(prompt) + longest > budget:
        keep = max(budget // 2, budget - longest)
        if len(prompt) > keep:
            head = [prompt[0]] if bos_id is not None and prompt and prompt[0] == bos_id else []
            prompt = head + prompt[len(prompt) - (keep - len(head)):]
    room = budget - len(prompt)
    return prompt, [list(c[:room]) for c in completions]


def tokenize_rows(
    prompt_ids: Sequence[int],
    completions: Sequence[Sequence[int]],
    *,
    seq_len: int,
    truncation: str,
    bos_id: int | None,
    distinct: bool = True,
    where: str = "",
    stats: TokenizeStats | None = None,
) -> dict[str, np.ndarray] | None:
    """[2, seq_len] padded rows (inputs/targets/loss_mask/segment_ids/positions), one per completion."""
    if not prompt_ids:
        raise UserError(f"{where or 'pair'}: the rendered prompt is empty (a preference pair needs a prompt)")
    if stats is not None:
        stats.examples += 1
    too_long = len(prompt_ids) + max(len(c) for c in completions) - 1 > seq_len
    if too_long:
        if truncation == "error":
            raise UserError(
                f"{where or 'pair'}: prompt + completion exceed data.seq_len={seq_len} tokens "
                "(set data.truncation to 'truncate' or 'drop')"
            )
        prompt_ids, completions = truncate_rows(prompt_ids, completions, seq_len=seq_len, bos_id=bos_id)
        if truncation == "drop" or (distinct and completions[0] == completions[1]) or not all(completions):
            if stats is not None:
                stats.dropped += 1
            return None
        if stats is not None:
            stats.truncated += 1
    out = {key: np.zeros((len(completions), seq_len), np.int32) for key in BATCH_KEYS}
    for row, completion in enumerate(completions):
        tokens = list(prompt_ids) + list(completion)
        n = len(tokens) - 1
        out["inputs"][row, :n] = tokens[:-1]
        out["targets"][row, :n] = tokens[1:]
        out["loss_mask"][row, len(prompt_ids) - 1 : n] = 1
        out["segment_ids"][row, :n] = 1
        out["positions"][row, :n] = np.arange(n)
    return out


def seq2seq_rows(
    prompt_ids: Sequence[int],
    completions: Sequence[Sequence[int]],
    *,
    seq_len: int,
    truncation: str,
    decoder_start_id: int,
    distinct: bool = True,
    where: str = "",
    stats: TokenizeStats | None = None,
) -> dict[str, np.ndarray] | None:
    """[2, seq_len] padded encoder-decoder rows (batch.SEQ2SEQ_BATCH_KEYS), one per completion, or None.

    As TRL paired an encoder-decoder: the prompt (`tokenizer(prompt)`, ids + </s>) is every row's
    encoder input and each completion (ids + </s>) that row's decoder labels, the decoder input being
    the labels shifted right behind the start token. Each stream is cut to `seq_len` as SFT's
    encoder-decoder examples are (start and closing </s> kept; examples.seq2seq_example).
    """
    if not prompt_ids:
        raise UserError(f"{where or 'pair'}: the rendered prompt is empty (a preference pair needs a prompt)")
    if stats is not None:
        stats.examples += 1
    rows, truncated = [], False
    for completion in completions:
        row, cut = seq2seq_example(prompt_ids, completion, decoder_start_id=decoder_start_id, seq_len=seq_len,
                                   truncation=truncation, where=where)
        if row is None:
            break
        rows.append(row)
        truncated |= cut
    if len(rows) < len(completions) or (distinct and np.array_equal(rows[0]["targets"], rows[1]["targets"])):
        if stats is not None:
            stats.dropped += 1
        return None
    if truncated and stats is not None:
        stats.truncated += 1
    padded = [pad_seq2seq_example(row, seq_len) for row in rows]
    return {key: np.stack([row[key] for row in padded]) for key in SEQ2SEQ_BATCH_KEYS}


class PreferenceTransform:
    """Grain map: (source index, record) -> a [2, T] pair (or KTO example + its KL row), or None.

    `seq2seq` (an encoder-decoder model): the prompt feeds the encoder and each completion the
    decoder (`seq2seq_rows`: rows with batch.SEQ2SEQ_BATCH_KEYS); chat records are an error.

    `ref_logps` ([N, 2] float32, NaN where not computed) attaches precomputed reference log-probs.
    """

    def __init__(
        self,
        source: Sequence[dict],
        task_templates: Mapping[str, Sequence[templates_lib.Template]],
        tokenizer: Tokenizer,
        *,
        seq_len: int,
        truncation: str,
        seed: int,
        unpaired: bool = False,
        ref_logps: np.ndarray | None = None,
        chat_template: str | None = None,
        with_reference: bool = False,
        seq2seq: bool = False,
    ):
        self.source = source
        self.seq2seq = seq2seq
        self.task_templates = dict(task_templates)
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.truncation = truncation
        self.seed = seed
        self.unpaired = unpaired
        self.ref_logps = ref_logps
        # Batches carry precomputed reference log-probs (REF_KEYS): declared before the table exists,
        # so the pipeline's layout is fixed when it is built; `ref_logps` is set before reading starts.
        self.with_reference = with_reference or ref_logps is not None
        self.chat_template = chat_template  # jinja text for chat records (data.chat_template or the tokenizer's)
        self.stats = TokenizeStats()

    def parse(self, index: int, record: Mapping[str, Any]) -> Example:
        return parse_unpaired(record, index) if self.unpaired else parse_pair(record, index)

    def render(self, index: int, record: Mapping[str, Any], example: Example, completions: Sequence[str]):
        task = record.get("task", DEFAULT_TASK)
        if len(self.task_templates) == 1:  # one template set (as SFT's TaskSpec.flan_spec): for every record
            templates = next(iter(self.task_templates.values()))
        elif task in self.task_templates:
            templates = self.task_templates[task]
        else:
            raise UserError(f"{_where(record, index)}: no templates for task {task!r}; "
                            f"known tasks: {', '.join(sorted(self.task_templates))}")
        i = templates_lib.choose_template(templates, seed=self.seed, index=index)
        input_pattern, target_pattern = templates[i]
        where = f"{_where(record, index)}, template {i}"
        prompt = templates_lib.render(input_pattern, example.fields, where=where)
        texts = [templates_lib.render(target_pattern, {**example.fields, "response": c}, where=where) for c in completions]
        return prompt, texts

    def tokens(self, index: int, record: Mapping[str, Any], example: Example, completions: Sequence) -> tuple[list[int], list[list[int]]]:
        """(prompt ids, completion ids): templated text tokenized like SFT (BOS + prompt, completion + EOS),
        or chat records rendered and tokenized like SFT chat examples."""
        tok = self.tokenizer
        where = _where(record, index)
        if example.is_chat and self.seq2seq:
            raise UserError(f"{where}: chat messages have no encoder/decoder split, so an encoder-decoder model does "
                            "not train on them; give the pairs as text ('prompt', 'chosen', 'rejected')")
        if not example.is_chat:
            prompt, texts = self.render(index, record, example, completions)
            prompt_ids = seq2seq_ids(tok, prompt) if self.seq2seq else encode_prompt(tok, prompt)
            return prompt_ids, [tok.encode(t) + [tok.eos_id] for t in texts]
        pieces, texts = render_chat_completions(
            example.messages, completions, _require_template(self.chat_template, where), bos_token=getattr(tok, "bos_token", None),
            eos_token=getattr(tok, "eos_token", None), where=where)
        prompt_ids = start_sequence(tok, [i for piece in pieces for i in encode_with_specials(tok, piece)], chat=True)
        return prompt_ids, [encode_with_specials(tok, t) for t in texts]

    def __call__(self, index: int, record: dict) -> dict[str, np.ndarray] | None:
        index = int(record.get("_index", index))
        example = self.parse(index, record)
        completions = example.completions
        if self.unpaired:  # row 1: this prompt with the next record's completion (KL estimate)
            other_index = (index + 1) % len(self.source)
            other = self.parse(other_index, self.source[other_index]).completions[0]
            completions = completions + (_completion_like(example, other),)
        prompt_ids, completion_ids = self.tokens(index, record, example, completions)
        if self.seq2seq:
            rows = seq2seq_rows(prompt_ids, completion_ids, seq_len=self.seq_len, truncation=self.truncation,
                                decoder_start_id=self.tokenizer.pad_id, distinct=not self.unpaired,
                                where=_where(record, index), stats=self.stats)
        else:
            rows = tokenize_rows(
                prompt_ids, completion_ids, seq_len=self.seq_len, truncation=self.truncation,
                bos_id=self.tokenizer.bos_id, distinct=not self.unpaired, where=_where(record, index), stats=self.stats,
            )
        if rows is None:
            return None
        rows[INDEX_KEY] = np.int32(index)
        if self.unpaired:
            rows[LABEL_KEY] = np.int32(example.label)
        if self.ref_logps is not None:  # (None while the reference pass itself tokenizes the pairs)
            rows[REF_KEYS[0]], rows[REF_KEYS[1]] = (np.float32(v) for v in self.ref_logps[index])
        return rows


def _require_template(template: str | None, where: str) -> str:
    if template is None:
        raise UserError(f"{where}: chat messages need a chat template, and the tokenizer has none: set "
                        f"data.chat_template to a built-in name ({', '.join(chat_lib.BUILTIN_TEMPLATES)}), "
                        "a jinja string, a .jinja file or a tokenizer_config.json")
    return template


def _completion_like(example: Example, completion):
    """Another record's completion in this record's form (a chat reply or text): the KTO mismatched row."""
    if example.is_chat:
        return completion if isinstance(completion, Mapping) else {"role": "assistant", "content": completion}
    return completion["content"] if isinstance(completion, Mapping) else completion


class IndexedRecords:
    """A source whose records carry their source index (`_index`): a pair's template, its KTO
    mismatched row and its precomputed reference log-probs are keyed by it, not by stream position."""

    def __init__(self, records: Sequence[dict]):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return {**self.records[index], "_index": int(index)}


class PairExamples:
    """The shared skeleton's transform for pairs: (stream index, record) -> [2, T] pair | marker.

    A dropped pair, or a bad record under on_error='skip', becomes a marker (pipeline.CountExamples
    counts it per task, then it is filtered), so every input yields one output in any worker count.
    """

    def __init__(self, transform: PreferenceTransform, task_index: int = 0, on_error: str = "error", name: str = ""):
        self.transform, self.task_index, self.on_error = transform, task_index, on_error
        self.name = name or DEFAULT_TASK
        self._failures_in_a_row = 0

    def _marker(self, reason: str) -> dict[str, Any]:
        self._failures_in_a_row += 1
        if self._failures_in_a_row > max(1000, 2 * len(self.transform.source)):
            raise UserError(f"task {self.name!r}: the last {self._failures_in_a_row} preference records were all "
                            "skipped or dropped; check the data, data.seq_len and data.truncation")
        return {TASK_KEY: self.task_index, SKIP_KEY: reason}

    def __call__(self, index: int, record: dict) -> dict[str, Any]:
        if "_error" in record:  # a source read that failed under on_error=skip (formats.TaskRecords)
            return self._marker("skipped")
        truncated = self.transform.stats.truncated
        try:
            rows = self.transform(index, record)
        except UserError:
            if self.on_error != "skip":
                raise
            return self._marker("skipped")
        if rows is None:
            return self._marker("dropped")
        self._failures_in_a_row = 0
        rows[TASK_KEY] = self.task_index
        rows[TRUNCATED_KEY] = int(self.transform.stats.truncated > truncated)
        return rows


class _KeepKeys:
    def __init__(self, keys: Sequence[str]):
        self.keys = tuple(keys)

    def __call__(self, example: dict) -> dict[str, np.ndarray]:
        return {k: example[k] for k in self.keys}


def pair_dataset(
    sources: Sequence[Sequence[dict]],
    transforms: Sequence[PreferenceTransform],
    *,
    batch_size: int,
    seed: int,
    names: Sequence[str] | None = None,
    on_error: Sequence[str] | None = None,
    packing: bool = False,
    max_pairs: int = 16,
    packing_strategy: str = "first_fit",
    packing_bins: int = 0,
    pair_batching: str = "pairs",
    shards: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    collect_lengths: bool = False,
    **stream_options,
) -> tuple[grain.IterDataset, PipelineStats]:
    """Endless per-process pair batches on the shared skeleton (pipeline.record_stream + sharded_batches).

    One source per task (mixed at `stream_options['rates']`), each with its transform. Padded:
    every pair key [batch, 2, T], per-pair keys [batch]. Packed (`packing`): rows [batch, 2T] with
    up to `max_pairs` pairs each and per-pair keys [batch, max_pairs] (pair_packing.py; a transform's
    `position_keys` are per-pair token positions, moved with their sequences). With
    `pair_batching='pairs'` a packed batch holds exactly `batch` pairs in the rows they need
    (`stats.step_rows`: the bucket ladder the objective pads them to); with 'rows' it is `batch`
    rows of packed pairs.
    """
    if not names:
        names = [DEFAULT_TASK] if len(sources) == 1 else [f"task{i}" for i in range(len(sources))]
    keys = batch_keys(transforms[0])
    if any(batch_keys(t) != keys for t in transforms):
        raise ValueError("every task's transform must yield the same batch keys")
    stats = PipelineStats({name: TaskStats(lengths=[] if collect_lengths else None) for name in names})
    count = CountExamples(stats.tasks, names)
    errors = list(on_error or ["error"] * len(sources))
    pair_examples = [PairExamples(t, i, errors[i], names[i]) for i, t in enumerate(transforms)]
    indexed = [IndexedRecords(s) for s in sources]

    def stream(shard: int, num_shards: int) -> grain.IterDataset:
        it = record_stream(indexed, pair_examples, seed=seed, process_index=shard, process_count=num_shards,
                           **stream_options)
        return it.map(count).filter(is_example).map(_KeepKeys(keys))

    if packing and getattr(transforms[0], "seq2seq", False):
        raise ValueError("encoder-decoder pairs are padded; packing them is not supported")
    steps = packing and pair_batching == "pairs"
    if pair_batching not in pair_packing.BATCHINGS:
        raise ValueError(f"pair_batching {pair_batching!r}; expected one of {pair_packing.BATCHINGS}")

    def finish(it: grain.IterDataset, rows: int) -> grain.IterDataset:
        if not packing:
            return it  # the transform pads each pair to [2, T]
        if steps:  # `rows` is this shard's pairs per step: all of them, packed into the rows they need
            return pair_packing.pack_steps(
                it, seq_len=transforms[0].seq_len, max_pairs=max_pairs, pairs=rows,
                pair_keys=[k for k in keys if k not in BATCH_KEYS],
                sequence_keys=[k for k in keys if k in pair_packing.SEQUENCE_KEYS],
                offset_keys=getattr(transforms[0], "position_keys", ()))
        return pair_packing.pack_pairs(it, seq_len=transforms[0].seq_len, max_pairs=max_pairs,
                                       pair_keys=keys[len(BATCH_KEYS):], bins=packing_bins or rows,
                                       strategy=packing_strategy)

    it = sharded_batches(stream, finish, batch_size=batch_size, shards=shards, process_index=process_index,
                         process_count=process_count, batched=steps)
    if steps:
        per_process = (shards or process_count) // process_count
        stats.step_rows = pair_packing.estimate_step_rows(
            pair_packing.sample_lengths(indexed, transforms), seq_len=transforms[0].seq_len, max_pairs=max_pairs,
            pairs_per_shard=batch_size // per_process, shards=per_process)
    return it.map(stats), stats


def preference_dataset(
    source: Sequence[dict],
    transform: PreferenceTransform,
    *,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    process_index: int = 0,
    process_count: int = 1,
    read_threads: int = 0,
    prefetch: int = 0,
) -> grain.IterDataset:
    """Endless per-process padded batches of one source: every key [batch, 2, T] (pairs) or [batch]
    (index/label/ref logps)."""
    return pair_dataset([source], [transform], batch_size=batch_size, seed=seed, shuffle=shuffle,
                        process_index=process_index, process_count=process_count, read_threads=read_threads,
                        prefetch=prefetch)[0]


def row_keys(transform) -> tuple[str, ...]:
    """The per-token keys of `transform`'s rows: both streams of an encoder-decoder's, else BATCH_KEYS."""
    return SEQ2SEQ_BATCH_KEYS if getattr(transform, "seq2seq", False) else BATCH_KEYS


def batch_keys(transform) -> tuple[str, ...]:
    """The keys a padded batch from `transform` carries, in a fixed order: the rows, then per-pair keys.
    A wrapping transform (e.g. the reward model's whole-sequence rows) declares its own `batch_keys`."""
    declared = getattr(transform, "batch_keys", None)
    if declared is not None:
        return tuple(declared)
    keys = row_keys(transform) + (INDEX_KEY,)
    if transform.unpaired:
        keys += (LABEL_KEY,)
    if transform.with_reference:
        keys += REF_KEYS
    return keys


def corpus(source: Sequence[dict], *, unpaired: bool, limit: int, chat_template: str | None = None):
    """Texts to train a from-scratch tokenizer on: prompts and completions of the first records
    (chat records rendered with `chat_template`, without special tokens: the tokenizer has none yet)."""

    def texts():
        parse = parse_unpaired if unpaired else parse_pair
        for index in range(min(len(source), limit)):
            example = parse(source[index], index)
            if not example.is_chat:
                yield str(example.fields["prompt"])
                yield from example.completions
            else:
                where = _where(source[index], index)
                pieces, completions = render_chat_completions(
                    example.messages, example.completions, _require_template(chat_template, where), where=where)
                yield from pieces
                yield from completions

    return texts
