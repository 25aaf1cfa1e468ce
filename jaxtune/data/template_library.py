"""Built-in FLAN-style template sets for common task types, and loading template sets by reference.

Each set is a list of `(input_pattern, target_pattern)` pairs, written for jaxtune. The fields a
set expects are listed in `LIBRARY_FIELDS`; map a dataset's columns onto them with a task's
`fields`. `{options_}` renders the record's `options` list (see flan.py); the answer field is
then rewritten to the chosen option's marker when markers are letters or numbers.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from jaxtune import paths
from jaxtune.data.templates import Template, template_fields
from jaxtune.errors import UserError

LIBRARY: dict[str, list[Template]] = {
    "nli": [
        ("Premise: {premise}\nHypothesis: {hypothesis}\nDoes the premise entail the hypothesis?\n{options_}", "{answer}"),
        ("{premise}\n\nBased on the paragraph above, can we conclude that \"{hypothesis}\"?\n\n{options_}", "{answer}"),
        ("Read the text and decide whether the sentence follows from it.\n\nText: {premise}\nSentence: {hypothesis}\n{options_}", "{answer}"),
        ("If \"{premise}\", is it true that \"{hypothesis}\"?\n{options_}", "{answer}"),
    ],
    "extractive_qa": [
        ("Read this and answer the question.\n\n{context}\n\n{question}", "{answer}"),
        ("{context}\n\nQ: {question}\nA:", "{answer}"),
        ("Answer the question using a span of the passage.\nPassage: {context}\nQuestion: {question}", "{answer}"),
        ("Question: {question}\n\nContext: {context}\n\nAnswer:", "{answer}"),
    ],
    "closed_qa": [
        ("{question}", "{answer}"),
        ("Answer the following question.\n{question}", "{answer}"),
        ("Q: {question}\nA:", "{answer}"),
        ("Question: {question}\nAnswer:", "{answer}"),
    ],
    "sentiment": [
        ("{text}\n\nWhat is the sentiment of this text?\n{options_}", "{answer}"),
        ("Review: {text}\nIs this review positive or negative?\n{options_}", "{answer}"),
        ("How would you describe the sentiment of the following?\n\n{text}\n\n{options_}", "{answer}"),
    ],
    "classification": [
        ("{text}\n\nWhich category best describes this text?\n{options_}", "{answer}"),
        ("Classify the following text.\n\n{text}\n\n{options_}", "{answer}"),
        ("Text: {text}\nLabel:\n{options_}", "{answer}"),
    ],
    "summarization": [
        ("Summarize this text:\n\n{text}", "{summary}"),
        ("{text}\n\nWrite a short summary of the text above.", "{summary}"),
        ("Article: {text}\n\nTL;DR:", "{summary}"),
        ("Give a one-paragraph summary.\n\n{text}", "{summary}"),
    ],
    "translation": [
        ("Translate from {source_language} to {target_language}:\n\n{source}", "{target}"),
        ("{source}\n\nTranslate this into {target_language}.", "{target}"),
        ("How do you say \"{source}\" in {target_language}?", "{target}"),
        ("{source_language}: {source}\n{target_language}:", "{target}"),
    ],
    "multiple_choice": [
        ("{question}\n{options_}", "{answer}"),
        ("Question: {question}\n\nPick the correct answer.\n{options_}", "{answer}"),
        ("Answer the question by choosing one option.\n\n{question}\n\n{options_}\nAnswer:", "{answer}"),
    ],
    # Alpaca / Self-Instruct records (formats "alpaca" and "self_instruct" provide these fields).
    "alpaca": [
        ("Below is an instruction that describes a task. Write a response that appropriately completes the "
         "request.\n\n### Instruction:\n{prompt}\n\n### Response:\n", "{response}"),
    ],
    "instruction": [("{prompt}", "{response}"), ("{prompt}\n\n", "{response}"), ("Task: {prompt}\nResponse:", " {response}")],
}

LIBRARY_FIELDS = {name: sorted({f for pair in pairs for p in pair for f in template_fields(p)}) for name, pairs in LIBRARY.items()}


def _pairs(value: Any, where: str) -> list[Template]:
    """Checks a loaded value is a non-empty list of (input, target) string pairs."""
    if isinstance(value, Sequence) and not isinstance(value, str) and value:
        pairs = []
        for i, pair in enumerate(value):
            if isinstance(pair, Mapping) and {"input", "target"} <= set(pair):  # {"input": ..., "target": ...}
                pair = (pair["input"], pair["target"])
            if not (isinstance(pair, Sequence) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
                raise UserError(f"{where}: template {i} must be an (input_pattern, target_pattern) pair of strings, got {pair!r}")
            for pattern in pair:  # unbalanced braces etc. now, not at the first record
                try:
                    template_fields(pattern)
                except UserError as e:
                    raise UserError(f"{where}: template {i} pattern {pattern!r}: {e}") from None
            pairs.append((pair[0], pair[1]))
        return pairs
    raise UserError(f"{where}: expected a non-empty list of (input_pattern, target_pattern) pairs, got {type(value).__name__}")


def _select(value: Any, keys: list[str], where: str) -> Any:
    for key in keys:
        if not isinstance(value, Mapping) or key not in value:
            available = ", ".join(map(str, value)) if isinstance(value, Mapping) else type(value).__name__
            raise UserError(f"{where}: no key {key!r} (available: {available})")
        value = value[key]
    return value


def load_template_set(spec: Any, *, where: str = "templates") -> list[Template]:
    """A template set from a task's `templates` value.

    Accepts pairs directly, a built-in set name, `file.json|yaml|yml[:key.subkey]`, or
    `python.module:ATTR[.key]` (e.g. a module holding FLAN's `PATTERNS = {"rte": [...]}`).
    """
    if not isinstance(spec, str):
        return _pairs(list(spec), where)
    name = spec.removeprefix("builtin:")
    if name in LIBRARY:
        return list(LIBRARY[name])
    scheme, sep, rest = spec.partition("://") if "://" in spec else ("", "", spec)  # gs://bucket/t.json:key
    location, _, key = rest.partition(":")
    location = scheme + sep + location
    keys = [k for k in key.split(".") if k]
    if location.endswith((".json", ".yaml", ".yml")):
        path = paths.path(location)
        if not path.is_file():
            raise UserError(f"{where}: template file {path} does not exist")
        text = path.read_text()
        try:
            if path.suffix == ".json":
                value = json.loads(text)
            else:
                import yaml

                value = yaml.safe_load(text)
        except Exception as e:  # json/yaml parse errors
            raise UserError(f"{where}: cannot parse {path}: {e}") from None
        return _pairs(_select(value, keys, f"{where} ({path})"), f"{where} ({path})")
    if keys:
        try:
            module = importlib.import_module(location)
        except ImportError as e:
            raise UserError(f"{where}: cannot import template module {location!r}: {e}") from None
        attr, *rest = keys
        if not hasattr(module, attr):
            raise UserError(f"{where}: module {location!r} has no attribute {attr!r}")
        return _pairs(_select(getattr(module, attr), rest, f"{where} ({spec})"), f"{where} ({spec})")
    raise UserError(
        f"{where}: {spec!r} is not a built-in template set ({', '.join(LIBRARY)}), a .json/.yaml file "
        "or a 'python.module:ATTR' reference"
    )
