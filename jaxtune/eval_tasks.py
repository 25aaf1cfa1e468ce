"""Held-out eval tasks (`config.eval.tasks`): records rendered through the task's FLAN spec.

An eval task is configured like a training task (source, field mapping, templates, options), so
its examples read exactly as training examples do, minus the training-only noise (word dropout,
input inversion). Generative tasks become (prompt, answer) pairs; multiple-choice tasks render
the same record once per entry of its options field as the answer, which gives one prompt and
each option's target text (the option itself, or its marker like "(B)" under random options).
Instruction-following tasks (IFEval-style) become (prompt, constraints): the template's input
pattern gives the prompt (there is no reference answer), the record's ``constraints`` field (or
IFEval's ``instruction_id_list`` + ``kwargs``, mapped by `jaxtune.data.ifeval`) what is checked.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import ml_collections

from jaxtune.data import ifeval
from jaxtune.data.datasets import task_spec
from jaxtune.data.examples import EmptyTarget, ExampleBuilder
from jaxtune.data.flan import answer_index, render_flan
from jaxtune.data.sources import SourceError
from jaxtune.errors import UserError
from jaxtune.rewards.instructions import as_constraints


@dataclasses.dataclass
class EvalTask:
    """One named held-out task, rendered: generative {task, prompt, answer}, MC {.., options, answer index}
    or instructions {.., constraints}."""

    name: str
    metric: str  # generative | multiple_choice | instructions
    examples: list[dict]
    separator: str = "\n\n"  # k-shot: between solved examples and the question
    target_separator: str = "\n"  # k-shot: between a solved example's prompt and its answer
    skipped_records: int = 0  # bad records left out under on_error="skip"


def load_eval_tasks(tasks: Mapping[str, ml_collections.ConfigDict], *, seed: int) -> list[EvalTask]:
    """The generative and multiple-choice tasks (held-out pairs, metric='preference', are a pair
    objective's: datasets.preference_eval_tasks)."""
    return [load_eval_task(name, t, seed=seed) for name, t in tasks.items() if t.metric != "preference"]


def load_eval_task(name: str, t: ml_collections.ConfigDict, *, seed: int) -> EvalTask:
    where = f"eval.tasks.{name}"
    quiet = ml_collections.ConfigDict({**t.to_dict(), "word_dropout": 0.0, "inversion": 0.0, "few_shot": 0})
    if t.metric == "instructions" and t.get("format", "auto") == "auto":
        quiet.format = "fields"  # IFEval-shaped records ({prompt, instruction_id_list, kwargs}) are no TRL shape
    spec = task_spec(name, quiet, where=where)
    count = len(spec.records) if not t.max_examples else min(t.max_examples, len(spec.records))
    render = {"multiple_choice": _render_choices, "instructions": _render_instructions}.get(t.metric, _render_answer)
    builder = ExampleBuilder(spec, 0, None, seq_len=0, seed=seed)
    examples, skipped = [], 0
    for index in range(count):
        record = spec.records[index]
        try:
            if "_error" in record:
                raise SourceError(record["_error"])
            example = {"task": name, "where": str(record.get("_where", f"{where} record {index}")),
                       **render(builder, record, index)}
        except (SourceError, EmptyTarget):
            if t.on_error != "skip":
                raise
            skipped += 1
            continue
        examples.append(example)
    if not examples:
        raise UserError(f"config key '{where}': no examples to evaluate in {t.path!r}")
    return EvalTask(name, t.metric, examples, t.few_shot_separator, t.few_shot_target_separator, skipped)


def _render_answer(builder: ExampleBuilder, record: Mapping, index: int) -> dict:
    prompt, answer = builder.render(record, index)
    return {"prompt": prompt, "answer": answer}


def _render_choices(builder: ExampleBuilder, record: Mapping, index: int) -> dict:
    _, spec = builder.task.flan_spec(record)
    where = str(record.get("_where", "record"))
    options = record.get(spec.options_field)
    if not isinstance(options, (list, tuple)) or len(options) < 2 or not all(isinstance(o, str) for o in options):
        raise SourceError(f"{where}: field {spec.options_field!r} must be a list of at least two option strings")
    if len(set(options)) != len(options):
        raise SourceError(f"{where}: field {spec.options_field!r} repeats an option: {options!r}")
    answer = answer_index(list(options), record.get(spec.answer_field), where)
    rendered = [render_flan(spec, {**record, spec.answer_field: option}, seed=builder.seed, index=index,
                            task=builder.task.name)[:2] for option in options]
    prompts = {prompt for prompt, _ in rendered}
    if len(prompts) != 1:
        raise UserError(f"{where}: the prompt changes with the answer (field {spec.answer_field!r} is in the input "
                        "pattern); a multiple-choice task's input pattern must not show the answer")
    return {"prompt": rendered[0][0], "options": [target for _, target in rendered], "answer": answer}


def _render_instructions(builder: ExampleBuilder, record: Mapping, index: int) -> dict:
    """The prompt (the template's input pattern) and the constraints its response is checked against."""
    _, spec = builder.task.flan_spec(record)
    where = str(record.get("_where", "record"))
    prompt_only = dataclasses.replace(spec, templates=tuple((t[0], "") for t in spec.templates))
    prompt, _, _ = render_flan(prompt_only, record, seed=builder.seed, index=index, task=builder.task.name)
    label = f"{where}: eval task {builder.task.name!r}"
    try:
        if record.get("constraints") is not None:
            return {"prompt": prompt, "constraints": as_constraints(record["constraints"], f"{label}: field 'constraints'")}
        if ifeval.is_ifeval_record(record):
            constraints = ifeval.constraints_from_ifeval(record, label)
            return {"prompt": prompt, "constraints": as_constraints(constraints, f"{label}: IFEval instructions")}
    except UserError as e:  # a bad record: subject to the task's on_error policy
        raise SourceError(str(e)) from None
    raise SourceError(f"{label} (metric 'instructions'): the record has no 'constraints' field (a list of "
                      "{\"type\": ..., <arguments>} dicts) and no IFEval 'instruction_id_list'")
