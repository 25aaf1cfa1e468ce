"""Self-Instruct (Wang et al. 2023): bootstrap an instruction set from a few seed tasks and a model.

Each request shows the model a numbered list of in-context instructions (k seed + k machine
ones drawn at random; the paper uses 6 human + 2 machine, and seeds fill in while the machine
pool is smaller than k) and lets it continue the list. The new instructions are filtered - too
short or long, a blacklisted keyword (tasks a text model cannot do: images, files, plots...),
starting with punctuation or a non-ASCII character, ROUGE-L >= 0.7 against any instruction in the
pool (seeds, kept ones, and the earlier candidates of the same batch, even one that later gets no
valid instance: instances are only generated for the survivors) - then the model decides whether each is
a classification task and writes instances for it: input first for ordinary tasks, label (output)
first for classification tasks, so the labels stay balanced. Instructions left without a valid
instance are dropped.

The prompts are written for base (non-chat) models that continue a pattern. All sampling is
batched: one sampler call per stage (instructions, classification, instances) for a batch of
requests. Batch b's prompts use an RNG seeded by (seed, request) and the pool as it stood after
batch b-1, and its sampler seeds are derived from (seed, batch, stage), so the output depends
only on the seed and the settings; with `progress.BatchLog` a killed run resumes exactly.

Output: one JSON line per instance in Alpaca form (`instruction`, `input`, `output`) plus
provenance (`id`, `instruction_id`, `request`, `is_classification`, `max_rouge_l` and
`most_similar`, `source`, `batch`); `data.tasks` reads it with `format="alpaca"`.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import string
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxtune.datatools import progress
from jaxtune.datatools.rouge import SELF_INSTRUCT_THRESHOLD, RougePool
from jaxtune.datatools.sampling import Metered, Sampler, derived_seed
from jaxtune.errors import UserError

log = logging.getLogger(__name__)

COMMAND = "self-instruct"
# The paper's keyword filter: tasks a language model cannot do (or do in text).
BLACKLIST = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw",
             "plot", "go to", "video", "audio", "music", "flowchart", "diagram")
CLASSIFICATION_DEMOS = 4  # per label (yes / no) in the classification prompt
INSTANCE_DEMOS = 3  # seed tasks shown in an instance prompt


@dataclasses.dataclass(frozen=True)
class SeedTask:
    instruction: str
    instances: tuple[tuple[str, str], ...]  # (input, output)
    is_classification: bool


@dataclasses.dataclass(frozen=True)
class Settings:
    """What decides the generated set (checked on resume); `num_instructions`/`max_requests` only say when to stop."""

    num_seed_examples: int = 6  # human-written instructions per prompt
    num_machine_examples: int = 2  # machine-generated instructions per prompt (seeds fill in while too few)
    batch_size: int = 8  # requests per batch: prompts per sampler call
    max_new_tokens: int = 256  # instruction lists
    instance_max_new_tokens: int = 256
    temperature: float = 0.7  # instruction lists; classification is greedy
    top_p: float | None = 0.5
    instance_temperature: float = 0.0
    similarity_threshold: float = SELF_INSTRUCT_THRESHOLD
    min_words: int = 3
    max_words: int = 150
    max_instances: int = 3  # kept per instruction
    seed: int = 0

    def check(self) -> None:
        def need(ok: bool, flag: str, what: str):
            if not ok:
                raise UserError(f"{COMMAND}: --{flag} must be {what}, got {getattr(self, flag)!r}")

        need(self.num_seed_examples >= 1, "num_seed_examples", ">= 1")
        need(self.num_machine_examples >= 0, "num_machine_examples", ">= 0")
        need(self.batch_size >= 1, "batch_size", ">= 1")
        need(self.max_new_tokens >= 1, "max_new_tokens", ">= 1")
        need(self.instance_max_new_tokens >= 1, "instance_max_new_tokens", ">= 1")
        need(self.temperature >= 0, "temperature", ">= 0 (0 = greedy)")
        need(self.instance_temperature >= 0, "instance_temperature", ">= 0 (0 = greedy)")
        need(self.top_p is None or 0 < self.top_p <= 1, "top_p", "in (0, 1]")
        need(0 < self.similarity_threshold <= 1, "similarity_threshold", "in (0, 1]")
        need(1 <= self.min_words <= self.max_words, "min_words", f"between 1 and --max_words ({self.max_words})")
        need(self.max_instances >= 1, "max_instances", ">= 1")


# ----------------------------------------------------------------------------- seed tasks


def _text(record: Mapping[str, Any], key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        found = "missing" if key not in record else f"a {type(value).__name__}"
        raise UserError(f"{where}: field {key!r} is {found}; expected text")
    return value


def read_seed_tasks(path: str) -> list[SeedTask]:
    """Seed tasks in Self-Instruct's format: `instruction`, `instances: [{input, output}]`, `is_classification`."""
    tasks = []
    for number, record in progress.read_jsonl(path, f"{COMMAND}: seed file"):
        where = f"{COMMAND}: seed file {path}:{number}"
        instruction = _text(record, "instruction", where).strip()
        if not instruction:
            raise UserError(f"{where}: field 'instruction' is empty")
        instances = record.get("instances")
        if not isinstance(instances, list) or not instances:
            raise UserError(f"{where}: field 'instances' must be a non-empty list of {{input, output}} objects")
        pairs = []
        for i, instance in enumerate(instances):
            if not isinstance(instance, Mapping):
                raise UserError(f"{where}: instances[{i}] must be an object with 'input' and 'output'")
            pairs.append((_text(instance, "input", f"{where} instances[{i}]"),
                          _text(instance, "output", f"{where} instances[{i}]")))
        is_classification = record.get("is_classification", False)
        if not isinstance(is_classification, bool):
            raise UserError(f"{where}: field 'is_classification' must be true or false")
        tasks.append(SeedTask(instruction, tuple(pairs), is_classification))
    if not tasks:
        raise UserError(f"{COMMAND}: seed file {path} holds no tasks")
    return tasks


# ----------------------------------------------------------------------------- prompts and parsing


def instruction_prompt(examples: Sequence[str]) -> str:
    """A numbered task list ending in the next number, for the model to continue."""
    lines = ["Here is a numbered list of varied tasks that people ask an assistant to do. Each task is new: "
             "it differs from the others in topic, wording and kind of answer.", ""]
    lines += [f"{i}. {_one_line(text)}" for i, text in enumerate(examples, start=1)]
    return "\n".join(lines) + f"\n{len(examples) + 1}."


def _one_line(text: str) -> str:
    return " ".join(text.split())


_ITEM = re.compile(r"(?:^|\n)\s*\d+\s*[.)]")


def parse_instructions(completion: str, *, truncated: bool) -> list[str]:
    """The list items of a continued task list (the first one has no number: the prompt wrote it).

    A completion cut by the token limit loses its last item, which may be unfinished.
    """
    items = [" ".join(part.split()) for part in _ITEM.split(completion)]
    if truncated and items:
        items = items[:-1]
    return [item for item in items if item]


def classification_prompt(demos: Sequence[SeedTask], instruction: str) -> str:
    lines = ["Does each task ask for one of a small, fixed set of labels (a classification task)? Yes or No.", ""]
    for task in demos:
        lines += [f"Task: {_one_line(task.instruction)}", f"Classification: {'Yes' if task.is_classification else 'No'}", ""]
    return "\n".join(lines + [f"Task: {_one_line(instruction)}", "Classification:"])


def parse_classification(completion: str) -> bool:
    return completion.strip().lower().startswith("yes")


def instance_prompt(demos: Sequence[SeedTask], instruction: str) -> str:
    """Input first: examples of tasks with their inputs and outputs; an empty input when none is needed."""
    lines = ["For each task, write examples: an input and the output that completes the task for it. "
             "When a task needs no input, leave the input empty.", ""]
    for task in demos:
        lines.append(f"Task: {_one_line(task.instruction)}")
        for i, (inp, out) in enumerate(task.instances, start=1):
            lines += [f"Example {i}", f"Input: {inp}", f"Output: {out}"]
        lines.append("")
    return "\n".join(lines + [f"Task: {_one_line(instruction)}", "Example 1", "Input:"])


def classification_instance_prompt(demos: Sequence[SeedTask], instruction: str) -> str:
    """Output first: each class label, then an input that has it (labels are not left to chance)."""
    lines = ["For each classification task, list its class labels and, after each label, write an input "
             "that belongs to it.", ""]
    for task in demos:
        lines.append(f"Task: {_one_line(task.instruction)}")
        for inp, out in task.instances:
            lines += [f"Class label: {out}", f"Input: {inp}"]
        lines.append("")
    return "\n".join(lines + [f"Task: {_one_line(instruction)}", "Class label:"])


_EXAMPLE = re.compile(r"\n\s*Example \d+\s*\n")
_LABEL = re.compile(r"(?:^|\n)\s*Class label:")


def parse_instances(completion: str) -> list[tuple[str, str]]:
    """(input, output) pairs of an input-first completion (its text starts right after the first 'Input:')."""
    pairs = []
    for chunk in _EXAMPLE.split("\n" + completion.split("\nTask:")[0]):
        chunk = chunk.strip("\n")
        if not chunk:
            continue
        body = chunk.split("Input:", 1)[1] if chunk.lstrip().startswith("Input:") else chunk
        if "Output:" not in body:
            continue
        inp, out = body.split("Output:", 1)
        pairs.append((inp.strip(), out.strip()))
    return pairs


def parse_classification_instances(completion: str) -> list[tuple[str, str]]:
    """(input, output) pairs of an output-first completion (its text starts right after the first 'Class label:')."""
    pairs = []
    for chunk in _LABEL.split(completion.split("\nTask:")[0]):
        if "Input:" not in chunk:
            continue
        label, inp = chunk.split("Input:", 1)
        pairs.append((inp.strip(), label.strip()))
    return pairs


# ----------------------------------------------------------------------------- filters


def _blacklisted(text: str, words: Sequence[str]) -> str | None:
    lowered = text.lower()
    return next((w for w in words if re.search(rf"\b{re.escape(w)}\b", lowered)), None)


def rejection_reason(instruction: str, settings: Settings, blacklist: Sequence[str] = BLACKLIST) -> str | None:
    """Why a generated instruction is dropped before the similarity check (None: it passes)."""
    words = len(instruction.split())
    if words < settings.min_words:
        return "too_short"
    if words > settings.max_words:
        return "too_long"
    if _blacklisted(instruction, blacklist):
        return "blacklisted_keyword"
    first = instruction[0]
    if first in string.punctuation or first.isspace():
        return "starts_with_punctuation"
    if not first.isascii():
        return "starts_non_english"
    return None


def clean_instances(pairs: Sequence[tuple[str, str]], limit: int) -> list[tuple[str, str]]:
    """Drops empty outputs, outputs equal to their input and repeats; keeps the first `limit`."""
    kept, seen = [], set()
    for inp, out in pairs:
        if not out or out == inp or (inp, out) in seen:
            continue
        seen.add((inp, out))
        kept.append((inp, out))
    return kept[:limit]


# ----------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class Result:
    instructions: int  # in the output (this run and before)
    records: int
    new_instructions: int  # written by this run
    requests: int  # sent by this run
    seconds: float  # this run's wall time in the loop
    sampler_seconds: float
    generated_tokens: int
    dropped: Counter  # this run's drop reasons

    def summary(self) -> str:
        rates, dropped = progress.run_rates(self.new_instructions, self.seconds, self.generated_tokens,
                                            self.sampler_seconds, self.dropped)
        return (f"{self.instructions} instructions ({self.records} instances) in the output; this run: "
                f"{self.new_instructions} new from {self.requests} requests in {self.seconds:.1f}s "
                f"({rates}); dropped: {dropped}")


class _Pool:
    """The ROUGE pool (seeds + kept instructions) and the machine instructions prompts draw from."""

    def __init__(self, seeds: Sequence[SeedTask]):
        self.rouge = RougePool(t.instruction for t in seeds)
        self.machine: list[str] = []

    def add_machine(self, instruction: str) -> None:
        self.rouge.add(instruction)
        self.machine.append(instruction)


def _examples_for(request: int, seeds: Sequence[SeedTask], machine: Sequence[str], settings: Settings) -> list[str]:
    rng = np.random.default_rng([settings.seed, request])
    chosen = [machine[i] for i in rng.choice(len(machine), min(settings.num_machine_examples, len(machine)), replace=False)]
    wanted = min(len(seeds), settings.num_seed_examples + settings.num_machine_examples - len(chosen))
    chosen += [seeds[i].instruction for i in rng.choice(len(seeds), wanted, replace=False)]
    return [chosen[i] for i in rng.permutation(len(chosen))]


def _instance_demos(seed: int, request: int, seeds: Sequence[SeedTask], classification: bool) -> list[SeedTask]:
    same = [t for t in seeds if t.is_classification == classification] or list(seeds)
    rng = np.random.default_rng([seed, request, int(classification), 1])
    return [same[i] for i in sorted(rng.choice(len(same), min(INSTANCE_DEMOS, len(same)), replace=False))]


def _classification_demos(seeds: Sequence[SeedTask]) -> list[SeedTask]:
    yes = [t for t in seeds if t.is_classification][:CLASSIFICATION_DEMOS]
    no = [t for t in seeds if not t.is_classification][:CLASSIFICATION_DEMOS]
    return [t for pair in zip(no, yes) for t in pair] + no[len(yes):] + yes[len(no):]


def run_batch(batch: int, sampler: Sampler, seeds: Sequence[SeedTask], pool: _Pool, settings: Settings,
              blacklist: Sequence[str] = BLACKLIST) -> tuple[list[dict], Counter]:
    """One batch of requests -> its records (grows `pool`) and its drop reasons."""
    first = batch * settings.batch_size
    requests = range(first, first + settings.batch_size)
    prompts = [instruction_prompt(_examples_for(r, seeds, pool.machine, settings)) for r in requests]
    lists = sampler.complete(prompts, max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                             top_p=settings.top_p, seed=derived_seed(settings.seed, batch, 0), stop=("\n\n",))
    dropped: Counter = Counter()
    candidates = []  # (request, index in its list, instruction, (max ROUGE-L, most similar text))
    for request, completion in zip(requests, lists):
        items = parse_instructions(completion.text, truncated=completion.truncated)
        if not items:
            dropped["no_instruction_parsed"] += 1
        for j, instruction in enumerate(items):
            reason = rejection_reason(instruction, settings, blacklist)
            if reason is None:
                added, match = pool.rouge.add_if_novel(instruction, settings.similarity_threshold)
                if added:  # the most similar text is read now: the tentative entries are undone below
                    similar = pool.rouge.texts[match.index] if match.index >= 0 else ""
                    candidates.append((request, j, instruction, (round(match.score, 4), similar)))
                    continue
                reason = "similar_to_pool"
            dropped[reason] += 1
    classes = sampler.complete(
        [classification_prompt(_classification_demos(seeds), c[2]) for c in candidates], max_new_tokens=3,
        temperature=0.0, top_p=None, seed=derived_seed(settings.seed, batch, 1), stop=("\n",))
    is_cls = [parse_classification(c.text) for c in classes]
    instance_prompts = [
        (classification_instance_prompt if cls else instance_prompt)(_instance_demos(settings.seed, request, seeds, cls), instruction)
        for (request, _, instruction, _), cls in zip(candidates, is_cls)]
    instances = sampler.complete(instance_prompts, max_new_tokens=settings.instance_max_new_tokens,
                                 temperature=settings.instance_temperature, top_p=settings.top_p,
                                 seed=derived_seed(settings.seed, batch, 2), stop=("\n\nTask:",))
    pool.rouge.truncate(len(pool.rouge) - len(candidates))  # re-added below when they get instances
    records = []
    for (request, j, instruction, match), cls, completion in zip(candidates, is_cls, instances):
        parse = parse_classification_instances if cls else parse_instances
        pairs = clean_instances(parse(completion.text), settings.max_instances)
        if not pairs:
            dropped["no_valid_instance"] += 1
            continue
        pool.add_machine(instruction)
        for i, (inp, out) in enumerate(pairs):
            records.append({"instruction": instruction, "input": inp, "output": out, "id": f"si-{request}-{j}-{i}",
                            "instruction_id": f"si-{request}-{j}", "request": request, "is_classification": cls,
                            "max_rouge_l": match[0], "most_similar": match[1], "source": COMMAND})
    return records, dropped


def _instructions(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The distinct instructions of the records, in order (records of one instruction are adjacent)."""
    return list({r["instruction_id"]: r["instruction"] for r in records}.values())


def generate(sampler: Sampler, seeds: Sequence[SeedTask], *, output: str, report: str | None = None,
             num_instructions: int, settings: Settings = Settings(), max_requests: int | None = None,
             blacklist: Sequence[str] = BLACKLIST, stop_after_batches: int | None = None) -> Result:
    """Runs (or resumes) the loop until `num_instructions` instructions are in `output` (whole batches:
    the last one may add a few more) or `max_requests` requests were sent in all (default 20 per
    instruction wanted). `stop_after_batches` ends this call early (tests: a run cut short)."""
    settings.check()
    if num_instructions < 1:
        raise UserError(f"{COMMAND}: --num_instructions must be >= 1, got {num_instructions}")
    max_requests = max_requests or 20 * num_instructions
    book = progress.BatchLog(output, report, command=COMMAND,
                             settings={**dataclasses.asdict(settings), "blacklist": list(blacklist),
                                       "seed_tasks": len(seeds),
                                       "seed_tasks_sha256": progress.digest([t.instruction for t in seeds])})
    records, batches = book.resume()
    pool = _Pool(seeds)
    for instruction in _instructions(records):
        pool.add_machine(instruction)
    meter = Metered(sampler)
    start, dropped, new, batch, done_now = time.perf_counter(), Counter(), 0, len(batches), 0
    while len(pool.machine) < num_instructions and batch * settings.batch_size < max_requests:
        if stop_after_batches is not None and done_now >= stop_after_batches:
            break
        tokens, seconds = meter.tokens, meter.seconds
        batch_records, batch_dropped = run_batch(batch, meter, seeds, pool, settings, blacklist)
        kept = len(_instructions(batch_records))
        book.write_batch(batch, batch_records, {
            "kept": kept, "records": len(batch_records), "dropped": dict(sorted(batch_dropped.items())),
            "generated_tokens": meter.tokens - tokens, "sampler_seconds": round(meter.seconds - seconds, 3)})
        records += batch_records
        dropped += batch_dropped
        new += kept
        batch += 1
        done_now += 1
        log.info("%s batch %d: kept %d, pool %d", COMMAND, batch - 1, kept, len(pool.machine))
    if len(pool.machine) < num_instructions and batch * settings.batch_size >= max_requests:
        log.warning("%s: stopped after %d requests with %d of %d instructions (--max_requests)", COMMAND,
                    batch * settings.batch_size, len(pool.machine), num_instructions)
    return Result(len(pool.machine), len(records), new, done_now * settings.batch_size,
                  time.perf_counter() - start, meter.seconds, meter.tokens, dropped)
