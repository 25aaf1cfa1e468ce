"""One task's records -> training examples (tokens, shifted targets, loss mask), and per-task counts.

`ExampleBuilder` is the Grain map (with the task-stream index) that renders a record through its
FLAN spec (few-shot included) or its chat template, tokenizes and applies the truncation policy.
It never returns None: a skipped or dropped record becomes a small marker dict, so every input
index yields exactly one output and the stream order does not depend on how many worker processes
share the work. `CountExamples` (in the main process) tallies markers and examples per task,
then the markers are filtered out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxtune.data import chat as chat_lib
from jaxtune.data.flan import FlanSpec, few_shot_prompt, render_flan
from jaxtune.data.formats import TRAINED_FROM_KEY
from jaxtune.data.sources import SourceError
from jaxtune.data.tokenizers import Tokenizer, encode_prompt, encode_with_specials, start_sequence
from jaxtune.errors import UserError

DEFAULT_TASK = "default"
TRUNCATION_POLICIES = ("truncate", "drop", "error")  # an over-long example
ON_ERROR_POLICIES = ("error", "skip")  # a bad record
EXAMPLE_KEYS = ("inputs", "targets", "loss_mask")
SEQ2SEQ_EXAMPLE_KEYS = ("inputs", "decoder_inputs", "targets", "loss_mask")  # encoder-decoder examples
TASK_KEY, SKIP_KEY, TRUNCATED_KEY = "_task", "_skip", "_truncated"
_FEW_SHOT_STREAM = 0x0F1C


class EmptyTarget(SourceError):
    """A record whose rendered target is empty (subject to `on_error`)."""


@dataclasses.dataclass
class TokenizeStats:
    """Counts of examples changed or removed by the truncation policy."""

    examples: int = 0
    truncated: int = 0
    dropped: int = 0


@dataclasses.dataclass
class TaskStats(TokenizeStats):
    """What a task contributed: kept examples and their tokens, and what the policies removed."""

    tokens: int = 0  # non-pad tokens of kept examples
    target_tokens: int = 0  # tokens trained on
    empty: int = 0  # empty targets skipped (on_error=skip)
    skipped: int = 0  # bad records skipped (on_error=skip)
    lengths: list[int] | None = None  # example lengths, when collected (data preview)

    def summary(self) -> str:
        return (f"{self.examples} examples, {self.tokens} tokens ({self.target_tokens} trained), "
                f"{self.truncated} truncated, {self.dropped} dropped, {self.empty} empty, {self.skipped} skipped")


@dataclasses.dataclass
class TaskSpec:
    """Everything a worker needs to turn one task's records into examples (picklable)."""

    name: str
    records: Sequence[dict]  # random access: formats.TaskRecords or any sequence of field dicts
    flan: Mapping[str, FlanSpec] = dataclasses.field(default_factory=dict)  # by record "task" (quickstart)
    chat_template: str | None = None  # jinja text; set for chat-format tasks
    few_shot: int = 0
    few_shot_separator: str = "\n\n"
    few_shot_target_separator: str = "\n"
    few_shot_max_tokens: int = 0
    truncation: str = "truncate"
    on_error: str = "error"
    # Encoder-decoder examples (`seq2seq_example`): the prompt feeds the encoder, the target the decoder.
    seq2seq: bool = False

    def flan_spec(self, record: Mapping[str, Any]) -> tuple[str, FlanSpec]:
        if len(self.flan) == 1:
            return next(iter(self.flan.items()))
        key = record.get("task", DEFAULT_TASK)
        if key not in self.flan:
            where = record.get("_where", "record")
            raise UserError(f"{where}: no templates for task {key!r}; known tasks: {', '.join(sorted(self.flan))}")
        return key, self.flan[key]


def _fit(ids: list[int], *, seq_len: int, truncation: str, where: str, stream: str) -> tuple[list[int] | None, bool]:
    """One encoder-decoder stream cut to `seq_len` as transformers' tokenizer truncates: keep the start
    and the closing </s>; (None, False) when the policy drops it."""
    if len(ids) <= seq_len:
        return ids, False
    if truncation == "error":
        raise UserError(f"{where or 'example'}: the {stream} has {len(ids)} tokens, more than data.seq_len={seq_len} "
                        "(set the truncation policy to 'truncate' or 'drop')")
    if truncation == "drop":
        return None, False
    return ids[: seq_len - 1] + ids[-1:], True


def seq2seq_example(encoder_ids: Sequence[int], target_ids: Sequence[int], *, decoder_start_id: int, seq_len: int,
                    truncation: str, where: str = "") -> tuple[dict[str, np.ndarray] | None, bool]:
    """(encoder inputs, decoder inputs, targets, loss mask) of one encoder-decoder example, or (None, False).

    As transformers builds a T5 batch: `inputs` = tokenizer(prompt) (`seq2seq_ids`: ids + </s>),
    `targets` = the labels, `decoder_inputs` = the targets shifted right behind the decoder start
    token. Every target token is trained. Both streams are at most `seq_len` long.
    """
    encoder, cut_encoder = _fit(list(encoder_ids), seq_len=seq_len, truncation=truncation, where=where,
                                stream="input (encoder)")
    targets, cut_targets = _fit(list(target_ids), seq_len=seq_len, truncation=truncation, where=where,
                                stream="target (decoder)")
    if encoder is None or targets is None or not targets:
        return None, False
    return {
        "inputs": np.asarray(encoder, np.int32),
        "decoder_inputs": np.asarray([decoder_start_id, *targets[:-1]], np.int32),
        "targets": np.asarray(targets, np.int32),
        "loss_mask": np.ones(len(targets), np.int32),
    }, cut_encoder or cut_targets


def seq2seq_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """`tokenizer(text)` of a T5 tokenizer: the ids and a closing </s> (an encoder input or a label)."""
    return tokenizer.encode(text) + [tokenizer.eos_id]


def shift_and_truncate(tokens: Sequence[int], trained: Sequence[int], *, seq_len: int, truncation: str,
                       where: str = "") -> tuple[dict[str, np.ndarray] | None, bool]:
    """(aligned inputs/targets/loss_mask, truncated?) or (None, False) when the example is dropped.

    `trained[i]` marks token i as one the model learns to produce. `truncate` keeps the start and as
    much as fits; an example left with no trained token is dropped, as is any over-long one under `drop`.
    """
    if len(tokens) - 1 > seq_len:
        if truncation == "error":
            raise UserError(
                f"{where or 'example'}: {len(tokens) - 1} tokens exceed data.seq_len={seq_len} "
                "(set the truncation policy to 'truncate' or 'drop')"
            )
        if truncation == "drop" or not any(trained[1 : seq_len + 1]):
            return None, False
        tokens, trained, truncated = tokens[: seq_len + 1], trained[: seq_len + 1], True
    else:
        truncated = False
    if not any(trained[1:]):
        return None, False
    return {
        "inputs": np.asarray(tokens[:-1], np.int32),
        "targets": np.asarray(tokens[1:], np.int32),
        "loss_mask": np.asarray(trained[1:], np.int32),
    }, truncated


class ExampleBuilder:
    """Grain map `(index, record) -> example | marker` for one task (see the module docstring)."""

    def __init__(self, task: TaskSpec, task_index: int, tokenizer: Tokenizer, *, seq_len: int, seed: int):
        self.task, self.task_index, self.tokenizer = task, task_index, tokenizer
        self.seq_len, self.seed = seq_len, seed
        self._failures_in_a_row = 0

    def _marker(self, reason: str) -> dict[str, Any]:
        self._failures_in_a_row += 1
        if self._failures_in_a_row > max(1000, 2 * len(self.task.records)):
            raise UserError(f"task {self.task.name!r}: the last {self._failures_in_a_row} records were all skipped "
                            "or dropped; check the data, templates and data.seq_len")
        return {TASK_KEY: self.task_index, SKIP_KEY: reason}

    def __call__(self, index: int, record: dict) -> dict[str, Any]:
        index = int(index)
        where = str(record.get("_where", f"task {self.task.name!r}, example {index}"))
        try:
            if "_error" in record:  # a source read that failed under on_error=skip (formats.TaskRecords)
                return self._marker("skipped")
            if self.task.seq2seq:
                return self._seq2seq(record, index, where)
            if self.task.chat_template is not None:
                tokens, trained = self.chat_tokens(record)
            else:
                tokens, trained = self.flan_tokens(record, index)
        except EmptyTarget:
            if self.task.on_error != "skip":
                raise
            return self._marker("empty")
        except SourceError:
            if self.task.on_error != "skip":
                raise
            return self._marker("skipped")
        example, truncated = shift_and_truncate(tokens, trained, seq_len=self.seq_len,
                                                truncation=self.task.truncation, where=where)
        if example is None:
            return self._marker("dropped")
        self._failures_in_a_row = 0
        example[TASK_KEY] = self.task_index
        example[TRUNCATED_KEY] = int(truncated)
        return example

    def _seq2seq(self, record: Mapping[str, Any], index: int, where: str) -> dict[str, Any]:
        if self.task.chat_template is not None:
            raise UserError(f"task {self.task.name!r} reads conversations, which an encoder-decoder model does not "
                            "train on; give the task FLAN templates (a prompt for the encoder, a target for the decoder)")
        prompt, target = self.render(record, index)
        example, truncated = seq2seq_example(
            seq2seq_ids(self.tokenizer, prompt), seq2seq_ids(self.tokenizer, target), decoder_start_id=self.tokenizer.pad_id,
            seq_len=self.seq_len, truncation=self.task.truncation, where=where)
        if example is None:
            return self._marker("dropped")
        self._failures_in_a_row = 0
        return {**example, TASK_KEY: self.task_index, TRUNCATED_KEY: int(truncated)}

    # -- FLAN-templated records ----------------------------------------------------------------

    def render(self, record: Mapping[str, Any], index: int) -> tuple[str, str]:
        """(prompt, target) of a templated record, few-shot exemplars included."""
        name, spec = self.task.flan_spec(record)
        label = self.task.name if name == DEFAULT_TASK else name
        prompt, target, template_index = render_flan(spec, record, seed=self.seed, index=index, task=label)
        if not target.strip():
            raise EmptyTarget(f"{record.get('_where', 'record')}: task {label!r}, template {template_index}: "
                              "the target is empty (set on_error='skip' to skip such records)")
        if self.task.few_shot:
            prompt = self._with_exemplars(record, index, spec, template_index, prompt, target)
        return prompt, target

    def flan_tokens(self, record: Mapping[str, Any], index: int) -> tuple[list[int], list[int]]:
        prompt, target = self.render(record, index)
        prompt_ids = encode_prompt(self.tokenizer, prompt)
        target_ids = self.tokenizer.encode(target) + [self.tokenizer.eos_id]
        return prompt_ids + target_ids, [0] * len(prompt_ids) + [1] * len(target_ids)

    def _with_exemplars(self, record, index, spec: FlanSpec, template_index: int, prompt: str, target: str) -> str:
        """k exemplars from the same task, rendered with the example's template, pruned to the token budget."""
        t, records = self.task, self.task.records
        rng = np.random.default_rng([self.seed, index, _FEW_SHOT_STREAM])
        candidates = rng.choice(len(records), size=min(len(records), t.few_shot + 1), replace=False)
        exemplars = []
        for c in candidates.tolist():
            other = records[c]
            if len(exemplars) == t.few_shot or "_error" in other:
                continue
            if {k: v for k, v in other.items() if k != "_where"} == {k: v for k, v in record.items() if k != "_where"}:
                continue  # never the example itself
            try:
                p, tgt, _ = render_flan(spec, other, seed=self.seed + _FEW_SHOT_STREAM, index=c, template_index=template_index,
                                      word_dropout=0.0, style_of=(self.seed, index))
            except SourceError:
                continue
            if tgt.strip():
                exemplars.append((p, tgt))
        budget = t.few_shot_max_tokens or self.seq_len
        used = len(self.tokenizer.encode(prompt)) + len(self.tokenizer.encode(target)) + 2
        kept = []
        for p, tgt in exemplars:
            cost = len(self.tokenizer.encode(few_shot_prompt([(p, tgt)], "", separator=t.few_shot_separator,
                                                             target_separator=t.few_shot_target_separator)))
            if used + cost > budget:
                break
            kept.append((p, tgt))
            used += cost
        return few_shot_prompt(kept, prompt, separator=t.few_shot_separator, target_separator=t.few_shot_target_separator)

    # -- chat records --------------------------------------------------------------------------

    def chat_segments(self, record: Mapping[str, Any]) -> list[tuple[str, bool]]:
        if "messages" not in record:
            raise SourceError(f"{record.get('_where', 'record')}: task {self.task.name!r} reads conversations, but "
                              "the record has no 'messages' (or conversational 'prompt'/'completion')")
        return chat_lib.assistant_segments(record["messages"], self.task.chat_template,
                                           bos_token=getattr(self.tokenizer, "bos_token", None),
                                           eos_token=getattr(self.tokenizer, "eos_token", None),
                                           trained_from=int(record.get(TRAINED_FROM_KEY, 0)))

    def chat_tokens(self, record: Mapping[str, Any]) -> tuple[list[int], list[int]]:
        tokens: list[int] = []
        trained: list[int] = []
        for text, on in self.chat_segments(record):
            ids = encode_with_specials(self.tokenizer, text)
            tokens.extend(ids)
            trained.extend([int(on)] * len(ids))
        started = start_sequence(self.tokenizer, tokens, chat=True)  # adds BOS only under data.add_bos='true'
        return started, [0] * (len(started) - len(tokens)) + trained

    def texts(self, record: Mapping[str, Any], index: int) -> list[str]:
        """The text an example shows the model (tokenizer training corpus); no few-shot."""
        if self.task.chat_template is not None:
            return [text for text, _ in self.chat_segments(record)]
        _, spec = self.task.flan_spec(record)
        prompt, target, _ = render_flan(spec, record, seed=self.seed, index=index, task=self.task.name)
        return [prompt, target]


class CountExamples:
    """Main-process Grain map: tallies examples and markers per task (`stats[name]`), passes them on."""

    def __init__(self, stats: Mapping[str, TaskStats], names: Sequence[str]):
        self.stats, self.names = stats, list(names)

    def __call__(self, example: dict[str, Any]) -> dict[str, Any]:
        stats = self.stats[self.names[example[TASK_KEY]]]
        reason = example.get(SKIP_KEY)
        if reason is not None:
            setattr(stats, reason, getattr(stats, reason) + 1)
            return example
        # Real tokens: an SFT example is unpadded; a preference pair is two padded rows.
        n = int(np.count_nonzero(example["segment_ids"])) if "segment_ids" in example else len(example["inputs"])
        stats.examples += 1
        stats.tokens += n
        if "loss_mask" in example:  # reward-model rows train no token targets
            stats.target_tokens += int(example["loss_mask"].sum())
        stats.truncated += example[TRUNCATED_KEY]
        if stats.lengths is not None:
            stats.lengths.append(n)
        return example


def is_example(example: dict[str, Any]) -> bool:
    return SKIP_KEY not in example


def strip_meta(example: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: example[k] for k in (SEQ2SEQ_EXAMPLE_KEYS if "decoder_inputs" in example else EXAMPLE_KEYS)}
