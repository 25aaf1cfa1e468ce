"""FLAN-style rendering of one example: template choice, answer options, chain of thought, inversion.

Every random choice (template, option style, inversion) draws from its own stream seeded by
`(seed, index, stream)`, so an example renders identically after a resume and on any number of
worker processes. Few-shot assembly needs the tokenizer and the task's records and lives in the
example builder (examples.py); it calls `render_flan` for each exemplar.
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxtune.data.sources import SourceError
from jaxtune.data.templates import DROPOUT_STREAM, Template, choose_template, render, template_fields

OPTIONS_PLACEHOLDER = "options_"
TARGET_PLACEHOLDER = "target_"  # the rendered target, in cot_pattern and the generic inversion
GENERIC_INVERSION = ("{target_}\n\nWrite the instruction or question that the text above answers.", "")

_OPTIONS_STREAM = 0x0F1A
_INVERSION_STREAM = 0x0F1B

# The FLAN-collection default rendering of answer options.
DETERMINISTIC_HEADING = "OPTIONS:"
HEADINGS = ("OPTIONS:", "Options:", "Choose your answer from:", "Pick your answer from:", "Available choices:",
            "Select from the following.", "Choices:", "Possible answers:", "Answer options:")
# (marker format, label kind); labels rewrite the answer to the marker ("(B)", "2.").
MARKERS = (("-", None), ("*", None), ("({})", "upper"), ("{}.", "upper"), ("{})", "lower"), ("({})", "number"),
           ("{}.", "number"), ("[{}]", "upper"))


def _label(kind: str, i: int) -> str:
    if kind == "upper":
        return string.ascii_uppercase[i % 26]
    if kind == "lower":
        return string.ascii_lowercase[i % 26]
    return str(i + 1)


def answer_index(options: list[str], answer: Any, where: str) -> int:
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(options):
        return answer
    if isinstance(answer, str) and answer in options:
        return options.index(answer)
    raise SourceError(f"{where}: answer {answer!r} is neither one of the options {options!r} nor an index into them")


def render_options(fields: Mapping[str, Any], *, style: str, options_field: str, answer_field: str,
                   rng: np.random.Generator | None) -> dict[str, Any]:
    """Fields plus `options_` (heading + one marked option per line); the answer follows the marker."""
    where = str(fields.get("_where", "record"))
    options = fields.get(options_field)
    if not isinstance(options, (list, tuple)) or not options or not all(isinstance(o, str) for o in options):
        raise SourceError(f"{where}: field {options_field!r} must be a non-empty list of strings for {{options_}}")
    options = list(options)
    if style == "random":
        heading = HEADINGS[int(rng.integers(len(HEADINGS)))]
        marker, kind = MARKERS[int(rng.integers(len(MARKERS)))]
    else:
        heading, (marker, kind) = DETERMINISTIC_HEADING, MARKERS[0]
    out = dict(fields)
    marks = [marker if kind is None else marker.format(_label(kind, i)) for i in range(len(options))]
    lines = [f"{m} {o}" for m, o in zip(marks, options)]
    if answer_field in fields:
        answer = answer_index(options, fields[answer_field], where)
        out[answer_field] = options[answer] if kind is None else marks[answer]
    out[OPTIONS_PLACEHOLDER] = heading + "\n" + "\n".join(lines)
    return out


OPTIONS_STYLES = ("deterministic", "random")


@dataclasses.dataclass(frozen=True)
class FlanSpec:
    """How a task renders: its template set and the FLAN variations applied on top."""

    templates: tuple[Template, ...]
    options_style: str = "deterministic"
    options_field: str = "options"
    answer_field: str = "answer"
    cot: bool = False
    cot_pattern: str = "{rationale}\nSo the answer is {target_}."
    cot_instruction: str = "\nLet's think step by step."
    inversion: float = 0.0
    inversion_templates: tuple[Template, ...] = ()
    word_dropout: float = 0.0

    def uses_options(self, template: Template) -> bool:
        return any(OPTIONS_PLACEHOLDER in template_fields(p) for p in template)


def render_flan(spec: FlanSpec, fields: Mapping[str, Any], *, seed: int, index: int, task: str = "",
                template_index: int | None = None, word_dropout: float | None = None,
                style_of: tuple[int, int] | None = None) -> tuple[str, str, int]:
    """`(prompt, target, template_index)` of one example.

    Few-shot exemplars pass the main example's template index and `(seed, index)` as `style_of`,
    so they share its option heading/marker style.
    """
    i = choose_template(spec.templates, seed=seed, index=index) if template_index is None else template_index
    inverted = spec.inversion > 0 and np.random.default_rng([seed, index, _INVERSION_STREAM]).random() < spec.inversion
    templates = spec.inversion_templates if inverted and spec.inversion_templates else spec.templates
    if templates is not spec.templates:
        i = choose_template(templates, seed=seed, index=index)
    template = templates[i]
    label = f"task {task!r}, {'inversion ' if templates is not spec.templates else ''}template {i}" if task else f"template {i}"
    if spec.uses_options(template):
        rng = np.random.default_rng([*(style_of or (seed, index)), _OPTIONS_STREAM]) if spec.options_style == "random" else None
        fields = render_options(fields, style=spec.options_style, options_field=spec.options_field,
                                answer_field=spec.answer_field, rng=rng)
    dropout = spec.word_dropout if word_dropout is None else word_dropout
    rng = np.random.default_rng([seed, index, DROPOUT_STREAM]) if dropout > 0 else None
    prompt = render(template[0], fields, word_dropout=dropout, rng=rng, where=label)
    target = render(template[1], fields, where=label)
    if spec.cot and not inverted:
        target = render(spec.cot_pattern, {**fields, TARGET_PLACEHOLDER: target.strip()}, where=f"{label} cot_pattern")
        prompt += spec.cot_instruction
    if inverted and not spec.inversion_templates:
        prompt, target = render(GENERIC_INVERSION[0], {TARGET_PLACEHOLDER: target.strip()}), prompt
    return prompt, target, i


def few_shot_prompt(exemplars: Sequence[tuple[str, str]], prompt: str, *, separator: str, target_separator: str) -> str:
    """Exemplars (input, target) joined FLAN-style, then the example's own input."""
    shots = [f"{p}{target_separator}{t}" for p, t in exemplars]
    return separator.join([*shots, prompt])
