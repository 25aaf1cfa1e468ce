"""Evol-Instruct (WizardLM, Xu et al. 2023): rewrite instructions into harder or new ones, round by round.

Each round gives every instruction of the current generation one mutation, drawn at random:
in-depth evolution (add a constraint, deepen, concretise, require more reasoning steps, complicate
the input with data to work on) makes it harder; in-breadth evolution writes a new, rarer task in
the same domain. The model then answers the evolved instruction, and the evolution is eliminated
when (the paper's four rules):
- it gains no information over its parent: equal after normalising, or ROUGE-L F against the
  parent >= `no_gain_threshold` (a cheap deterministic stand-in for the paper's model judgement,
  which `judge=True` adds: the model is asked whether the two are equal);
- the model fails to answer it: an empty response, or one that says "sorry" in under 80 words;
- the response is only punctuation and stop words;
- it copies words of the rewriting prompt ("Rewritten task", "given prompt", ...).
A surviving child replaces its parent in the next generation; an eliminated one leaves the parent
there, to be mutated again next round.

The rewriting prompts are written for this project (they follow the paper's method descriptions,
not its text) and end where a base model continues; they work with instruction-tuned models too.
Batching, seeding and resuming are as in `self_instruct`: batch b of round r covers items
b*B..b*B+B-1 of that round's generation, its sampler seeds come from (seed, global batch, stage)
and its mutations from (seed, round, item). The output holds the surviving evolutions with their
lineage (`id`, `parent_id`, `root_id`, `round`, `index`, `mutation`, `rouge_l_parent`); the report
lists each eliminated one with its reason.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxtune.datatools import progress
from jaxtune.datatools.sampling import Metered, Sampler, derived_seed
from jaxtune.errors import UserError

log = logging.getLogger(__name__)

COMMAND = "evolve"
_INTRO = ("Rewrite the task below into a harder version that a capable person could still understand and "
          "answer. Keep everything the task already asks for. ")
_OUTRO = " The rewritten task must stand on its own, grow by at most about 20 words, and must not mention these directions."
MUTATIONS = {
    "add_constraints": _INTRO + "Add one more requirement or constraint the answer has to meet." + _OUTRO,
    "deepen": _INTRO + "Where the task asks about a subject, make it probe that subject more deeply and widely." + _OUTRO,
    "concretize": _INTRO + "Replace general ideas in the task with more specific, concrete ones." + _OUTRO,
    "increase_reasoning": _INTRO + ("If a few simple steps would solve the task, make it explicitly ask for reasoning "
                                    "in several steps.") + _OUTRO,
    "complicate_input": _INTRO + ("Give the task input data to work with - a short table, code snippet, formula or "
                                  "passage - and make the task depend on it.") + _OUTRO,
    "breadth": ("Invent a new task inspired by the task below: the same broad domain, but a rarer, more specialised "
                "topic, about as long and as hard. Write only the new task, not these directions."),
}
DEPTH = ("add_constraints", "deepen", "concretize", "increase_reasoning", "complicate_input")
# Words of the rewriting prompts (and the paper's) that must not leak into an evolved instruction.
LEAKS = ("rewritten task", "original task", "given task", "new task:", "rewritten prompt", "given prompt",
         "created prompt", "#rewritten", "#given")
SORRY_MAX_WORDS = 80  # the paper: a response that says sorry in under 80 words is a failure
STOP_WORDS = frozenset("""a about above after again against all am an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from further had has have having he her
here hers herself him himself his how i if in into is it its itself just me more most my myself no nor not now of off
on once only or other our ours ourselves out over own same she should so some such than that the their theirs them
themselves then there these they this those through to too under until up very was we were what when where which while
who whom why will with would you your yours yourself yourselves ok okay yes""".split())


@dataclasses.dataclass(frozen=True)
class Item:
    id: str
    root_id: str
    text: str  # the instruction (with its input after a blank line, when it had one)


@dataclasses.dataclass(frozen=True)
class Settings:
    """What decides the evolved set (checked on resume); `rounds` only says when to stop."""

    mutations: tuple[str, ...] = tuple(MUTATIONS)
    batch_size: int = 8
    max_new_tokens: int = 256  # evolved instructions
    response_max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float | None = None
    response_temperature: float = 0.0
    no_gain_threshold: float = 0.9
    judge: bool = False
    limit: int = 0  # evolve only the first `limit` inputs (0 = all)
    seed: int = 0

    def check(self) -> None:
        unknown = [m for m in self.mutations if m not in MUTATIONS]
        if unknown or not self.mutations:
            raise UserError(f"{COMMAND}: --mutations: unknown {', '.join(unknown) or '(none given)'}; expected some of "
                            f"{', '.join(MUTATIONS)}")
        for flag, ok, what in [("batch_size", self.batch_size >= 1, ">= 1"), ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"),
                               ("response_max_new_tokens", self.response_max_new_tokens >= 1, ">= 1"),
                               ("temperature", self.temperature >= 0, ">= 0"),
                               ("response_temperature", self.response_temperature >= 0, ">= 0"),
                               ("top_p", self.top_p is None or 0 < self.top_p <= 1, "in (0, 1]"),
                               ("no_gain_threshold", 0 < self.no_gain_threshold <= 1, "in (0, 1]"),
                               ("limit", self.limit >= 0, ">= 0")]:
            if not ok:
                raise UserError(f"{COMMAND}: --{flag} must be {what}, got {getattr(self, flag)!r}")


def read_instructions(path: str, limit: int = 0) -> list[Item]:
    """Instructions to evolve: JSONL with `instruction` (+ optional `input`, `id`); Alpaca files,
    Self-Instruct seed files and `jaxtune data self-instruct` output all qualify."""
    items = []
    for number, record in progress.read_jsonl(path, f"{COMMAND}: input file"):
        where = f"{COMMAND}: input file {path}:{number}"
        instruction = record.get("instruction")
        if not isinstance(instruction, str) or not instruction.strip():
            found = "missing" if "instruction" not in record else "empty or not text"
            raise UserError(f"{where}: field 'instruction' is {found}; expected the instruction text")
        extra = record.get("input", "")
        if not isinstance(extra, str):
            raise UserError(f"{where}: field 'input' must be text, found {type(extra).__name__}")
        text = f"{instruction.strip()}\n\n{extra.strip()}" if extra.strip() else instruction.strip()
        item_id = str(record.get("id", f"line{number}"))
        items.append(Item(item_id, item_id, text))
        if limit and len(items) == limit:
            break
    if not items:
        raise UserError(f"{COMMAND}: input file {path} holds no instructions")
    return items


def mutation_prompt(mutation: str, text: str) -> str:
    label = "New task:" if mutation == "breadth" else "Rewritten task:"
    return f"{MUTATIONS[mutation]}\n\nTask:\n{text}\n\n{label}\n"


def parse_evolved(completion: str) -> str:
    """The evolved instruction: the completion without surrounding blank space or a repeated label."""
    text = completion.strip()
    return re.sub(r"^(rewritten task|new task)\s*:\s*", "", text, flags=re.IGNORECASE).strip()


def response_prompt(text: str) -> str:
    return f"Instruction:\n{text}\n\nResponse:\n"


def judge_prompt(parent: str, child: str) -> str:
    return ("Do these two tasks ask for the same thing, with the same requirements, depth and scope? "
            f"Answer Equal or Different.\n\nFirst task:\n{parent}\n\nSecond task:\n{child}\n\nAnswer:")


def _normalised(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def instruction_problem(parent: str, child: str, threshold: float) -> tuple[str | None, float]:
    """(elimination reason or None, ROUGE-L F against the parent) from the instruction alone."""
    from jaxtune.datatools.rouge import rouge_l  # here: rouge-score imports nltk (seconds), not wanted at CLI start

    if not child:
        return "empty_evolution", 0.0
    lowered = child.lower()
    if any(leak in lowered for leak in LEAKS):
        return "copied_prompt_words", rouge_l(parent, child)
    score = rouge_l(parent, child)
    if _normalised(parent) == _normalised(child) or score >= threshold:
        return "no_information_gain", score
    return None, score


def response_problem(response: str) -> str | None:
    """Why a response shows the model failed on the evolved instruction (None: it did not)."""
    words = response.split()
    if not words:
        return "empty_response"
    if "sorry" in response.lower() and len(words) < SORRY_MAX_WORDS:
        return "sorry_response"
    if all(w in STOP_WORDS for w in re.findall(r"[^\W_]+", response.lower())):
        return "only_punctuation_and_stop_words"
    return None


@dataclasses.dataclass
class Result:
    records: int  # evolved instructions in the output
    new_records: int  # written by this run
    rounds_done: int
    evolutions: int  # attempted by this run
    seconds: float
    sampler_seconds: float
    generated_tokens: int
    dropped: Counter

    def summary(self) -> str:
        rates, dropped = progress.run_rates(self.new_records, self.seconds, self.generated_tokens,
                                            self.sampler_seconds, self.dropped)
        return (f"{self.records} evolved instructions in the output after {self.rounds_done} rounds; this run: "
                f"{self.new_records} kept of {self.evolutions} evolutions in {self.seconds:.1f}s ({rates}); "
                f"eliminated: {dropped}")


def _mutation(settings: Settings, round_: int, index: int) -> str:
    rng = np.random.default_rng([settings.seed, round_, index])
    return settings.mutations[int(rng.integers(len(settings.mutations)))]


def run_batch(global_batch: int, round_: int, start: int, items: Sequence[Item], sampler: Sampler,
              settings: Settings) -> tuple[list[dict], list[dict]]:
    """Evolves `items` (positions start.. of round `round_`'s generation): (kept records, dropped entries)."""
    mutations = [_mutation(settings, round_, start + k) for k in range(len(items))]
    evolved = sampler.complete([mutation_prompt(m, it.text) for m, it in zip(mutations, items)],
                               max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                               top_p=settings.top_p, seed=derived_seed(settings.seed, global_batch, 0),
                               stop=("\nTask:", "\n\n\n"))
    children, dropped, scores, reasons = [parse_evolved(c.text) for c in evolved], [], {}, {}
    for k, (item, child) in enumerate(zip(items, children)):
        reasons[k], scores[k] = instruction_problem(item.text, child, settings.no_gain_threshold)
    if settings.judge:
        pending = [k for k in reasons if reasons[k] is None]
        verdicts = sampler.complete([judge_prompt(items[k].text, children[k]) for k in pending], max_new_tokens=3,
                                    temperature=0.0, top_p=None, seed=derived_seed(settings.seed, global_batch, 1),
                                    stop=("\n",))
        for k, verdict in zip(pending, verdicts):
            if verdict.text.strip().lower().startswith("equal"):
                reasons[k] = "no_information_gain_judged"
    pending = [k for k in reasons if reasons[k] is None]
    responses = dict(zip(pending, sampler.complete(
        [response_prompt(children[k]) for k in pending], max_new_tokens=settings.response_max_new_tokens,
        temperature=settings.response_temperature, top_p=settings.top_p,
        seed=derived_seed(settings.seed, global_batch, 2), stop=("\nInstruction:",))))
    records = []
    for k, item in enumerate(items):
        lineage = {"id": f"ev-{round_}-{start + k}", "parent_id": item.id, "root_id": item.root_id, "round": round_,
                   "index": start + k, "mutation": mutations[k], "rouge_l_parent": round(scores[k], 4)}
        response = responses[k].text.strip() if k in responses else ""
        reason = reasons[k] or response_problem(response)
        if reason:
            dropped.append({**lineage, "reason": reason, "instruction": children[k]})
        else:
            records.append({"instruction": children[k], "input": "", "output": response, **lineage, "source": COMMAND})
    return records, dropped


def evolve(sampler: Sampler, inputs: Sequence[Item], *, output: str, report: str | None = None, rounds: int,
           settings: Settings = Settings(), stop_after_batches: int | None = None) -> Result:
    """Runs (or resumes) `rounds` rounds over `inputs`; `stop_after_batches` ends this call early (tests)."""
    settings.check()
    if rounds < 1:
        raise UserError(f"{COMMAND}: --rounds must be >= 1, got {rounds}")
    book = progress.BatchLog(output, report, command=COMMAND, settings={
        **dataclasses.asdict(settings), "mutations": list(settings.mutations), "inputs": len(inputs),
        "inputs_sha256": progress.digest([f"{it.id}\t{it.text}" for it in inputs])})
    records, batches = book.resume()
    per_round = math.ceil(len(inputs) / settings.batch_size)
    children = {(r["round"], r["index"]): Item(r["id"], r["root_id"], r["instruction"]) for r in records}
    meter = Metered(sampler)
    start_time, dropped, new, attempted, done_now = time.perf_counter(), Counter(), 0, 0, 0
    generation = list(inputs)
    for round_ in range(1, rounds + 1):
        following = list(generation)
        for b in range(per_round):
            global_batch = (round_ - 1) * per_round + b
            lo, hi = b * settings.batch_size, min(len(inputs), (b + 1) * settings.batch_size)
            if global_batch < len(batches):  # done before: its children are in the output
                for i in range(lo, hi):
                    following[i] = children.get((round_, i), generation[i])
                continue
            if stop_after_batches is not None and done_now >= stop_after_batches:
                return _result(records, new, round_ - 1, attempted, start_time, meter, dropped)
            tokens, seconds = meter.tokens, meter.seconds
            kept, eliminated = run_batch(global_batch, round_, lo, generation[lo:hi], meter, settings)
            counts = Counter(d["reason"] for d in eliminated)
            book.write_batch(global_batch, kept, {
                "round": round_, "kept": len(kept), "eliminated": dict(sorted(counts.items())), "dropped": eliminated,
                "generated_tokens": meter.tokens - tokens, "sampler_seconds": round(meter.seconds - seconds, 3)})
            batches.append({"batch": global_batch})
            for r in kept:
                following[r["index"]] = Item(r["id"], r["root_id"], r["instruction"])
            records += kept
            dropped += counts
            new += len(kept)
            attempted += hi - lo
            done_now += 1
        generation = following
        log.info("%s round %d done: %d evolved so far", COMMAND, round_, len(records))
    return _result(records, new, rounds, attempted, start_time, meter, dropped)


def _result(records, new, rounds_done, attempted, start_time, meter, dropped) -> Result:
    return Result(len(records), new, rounds_done, attempted, time.perf_counter() - start_time, meter.seconds,
                  meter.tokens, dropped)


def lineage(records: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
    """id -> the ids from its root input down to it (for reports and tests)."""
    parents = {r["id"]: r["parent_id"] for r in records}
    out = {}
    for r in records:
        chain, node = [r["id"]], r["parent_id"]
        while node in parents:
            chain.append(node)
            node = parents[node]
        out[r["id"]] = [node, *reversed(chain)]
    return out
