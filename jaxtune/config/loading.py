"""Loading a config file and applying `KEY=VALUE` overrides, with errors that name the key.

`load_config` runs the file's `get_config(arg)`, rejects keys the schema does not have (a key that
moved names its new place), selects the objective (`objective.type`; its section's defaults come
from the objective registry, passed in as `ObjectiveSections` because objectives sit above this
module) and applies the overrides. Validation against the other modules is jaxtune/validation.py's;
`jaxtune.load_config` (the Python API) and the CLI do both.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from jaxtune.config.keys import moved_key_error, unknown_key_error
from jaxtune.config.schema import base_config, task_config
from jaxtune.errors import UserError

# Sections whose children are named by the user (task names), checked by validation.validate_task.
_FREE_SECTIONS = ("data.tasks", "eval.tasks")


@dataclasses.dataclass(frozen=True)
class ObjectiveSections:
    """What the loader needs from the objective registry (objectives.base.config_sections builds it).

    `defaults` maps each objective name to a function returning its section with defaults;
    `canonical` resolves an old spelling of `objective.type` (e.g. 'preference' -> 'dpo').
    """

    defaults: Mapping[str, Callable[[], ml_collections.ConfigDict]]
    canonical: Callable[[str], str] = lambda name: name

    def sections(self) -> dict[str, ml_collections.ConfigDict]:
        return {name: make() for name, make in self.defaults.items()}


def load_config(spec: str, overrides: Sequence[str] = (), *,
                sections: ObjectiveSections | None = None) -> ml_collections.ConfigDict:
    """Loads `path.py[:arg]`, selects its objective and applies `a.b=value` overrides; locked, not validated.

    `sections` come from the objective registry (objectives.base.config_sections()); in Python,
    `jaxtune.load_config(spec, overrides)` passes them and validates the result."""
    if sections is None:
        raise UserError("jaxtune.config.load_config needs the objectives' config sections; load configs with "
                        "jaxtune.load_config(spec, overrides), which also validates them")
    path, _, arg = spec.partition(":")
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--config {path}: no such file (expected a Python file with get_config(arg))")
    module_spec = importlib.util.spec_from_file_location(f"jaxtune_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module
    try:
        module_spec.loader.exec_module(module)
    except UserError:
        raise
    except Exception as e:  # a config file is user code: report where it broke
        raise UserError(f"--config {path}: failed to load{_line_in(file, e)}: {type(e).__name__}: {e}") from e
    if not hasattr(module, "get_config"):
        raise UserError(f"--config {path}: defines no get_config(arg) function")
    try:
        config = module.get_config(arg or None)
    except UserError as e:
        if str(e).startswith(_ARG_ERROR):  # parse_arg's: name the file
            raise UserError(f"--config {spec}: {str(e)[len(_ARG_ERROR):]}") from None
        raise
    except Exception as e:
        raise UserError(f"--config {spec}: get_config raised{_line_in(file, e)}: {type(e).__name__}: {e}") from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise UserError(f"--config {path}: get_config must return an ml_collections.ConfigDict")
    try:
        check_schema_keys(config, sections)
    except UserError as e:
        raise UserError(f"--config {spec}: {e}") from None
    config.lock()
    apply_overrides(config, overrides, sections)
    return config


def check_schema_keys(config: ml_collections.ConfigDict, sections: ObjectiveSections) -> None:
    """Every key a config file set is in the schema (a renamed key names its replacement)."""
    schema = base_config()

    def walk(node, known, prefix):
        for key, value in node.items():
            full = prefix + key
            if full == "objective" or full in _FREE_SECTIONS:
                continue
            if key not in known:
                raise moved_key_error(full, sections.sections()) or unknown_key_error(schema, full)
            if isinstance(known[key], ml_collections.ConfigDict) and isinstance(value, ml_collections.ConfigDict):
                walk(value, known[key], full + ".")

    walk(config, schema, "")


def select_objective(config: ml_collections.ConfigDict, sections: ObjectiveSections) -> None:
    """`config.objective` = its `type` plus that objective's section: the objective's defaults updated
    with what the config file set. Other objectives' sections (e.g. inherited from a config file this
    one derives from) are dropped. Idempotent; keeps the config locked if it was."""
    node = config.objective
    all_sections = sections.sections()
    name = sections.canonical(node.type)
    if name not in all_sections:
        raise UserError(f"config key 'objective.type' is {node.type!r}; "
                        f"expected one of {', '.join(sorted(all_sections))}")
    for key in node:
        if key != "type" and key not in all_sections:
            raise (moved_key_error(f"objective.{key}", all_sections, name)
                   or unknown_key_error(ml_collections.ConfigDict({"type": "", name: all_sections[name]}), key,
                                        "objective."))
    section = all_sections[name]
    given = node.get(name)
    if given is not None:
        if not isinstance(given, (ml_collections.ConfigDict, dict)):
            raise UserError(f"config key 'objective.{name}' must be a dict of {name}'s keys, "
                            f"found {type(given).__name__}")
        for key, value in given.items():
            if key not in section:
                raise unknown_key_error(section, key, f"objective.{name}.")
            try:
                section[key] = value
            except (TypeError, ValueError) as e:
                raise UserError(f"config key 'objective.{name}.{key}': cannot use {value!r}: {e}") from None
    selected = ml_collections.ConfigDict({"type": node.type})
    selected[name] = section
    locked = config.is_locked
    with config.unlocked():
        config.objective = selected
    if locked:
        config.lock()


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str],
                    sections: ObjectiveSections) -> None:
    """Applies `KEY=VALUE` strings: `objective.type` first (it selects the objective's section), then the rest."""
    items = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"override --config.{item}: expected --config.KEY=VALUE")
        items.append((key, value))
    for key, value in items:
        if key == "objective.type":
            set_value(config, key, value)
    select_objective(config, sections)
    name = sections.canonical(config.objective.type)
    all_sections = sections.sections()
    for key, value in items:
        if key == "objective.type":
            continue
        moved = moved_key_error(key, all_sections, name)
        if moved is not None:
            raise moved
        parts = key.split(".")
        if parts[0] == "objective" and len(parts) > 2 and parts[1] in all_sections and parts[1] != name:
            raise UserError(f"config key '{key}': objective.{parts[1]}.* applies when objective.type='{parts[1]}'; "
                            f"this config's objective.type is {config.objective.type!r}")
        set_value(config, key, value)


def _line_in(file: Path, error: BaseException) -> str:
    """' at line N' of the deepest traceback frame (or syntax error) inside the config file, else ''."""
    if isinstance(error, SyntaxError) and error.lineno:
        return f" at line {error.lineno}"
    frames = traceback.extract_tb(error.__traceback__)
    lines = [f.lineno for f in frames if Path(f.filename).resolve() == file.resolve()]
    return f" at line {lines[-1]}" if lines else ""


_ARG_ERROR = "config file argument: "


def parse_arg(arg: str | None, **defaults: Any) -> dict[str, Any]:
    """Parses a config file's `k=v,k2=v2` argument (the part after `path.py:`); a bare word is `variant`.

    With `defaults` (`parse_arg(arg, variant="tiny", steps=100)`) the argument is typed: each value
    is converted to its default's type by the same rules as `--config.KEY=VALUE` overrides, a name
    not among the defaults is an error naming the closest one, and the result holds every default.
    Without defaults every value stays a string.
    """
    raw: dict[str, str] = {}
    for part in (arg or "").split(","):
        if not part:
            continue
        k, sep, v = part.partition("=")
        raw[k.strip() if sep else "variant"] = v.strip() if sep else k.strip()
    if not defaults:
        return raw
    unknown = sorted(set(raw) - set(defaults))
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(defaults), n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UserError(f"{_ARG_ERROR}unknown arguments {unknown} after ':'{hint} "
                        f"(expected some of {', '.join(defaults)})")
    out = dict(defaults)
    for key, value in raw.items():
        default = defaults[key]
        try:
            out[key] = _convert(value, default, str if default is None else type(default))
        except ValueError as e:
            raise UserError(f"{_ARG_ERROR}argument '{key}={value}': {e}") from None
    return out



def set_value(config: ml_collections.ConfigDict, key: str, raw: str) -> None:
    """Sets `a.b.c` from a command-line string, converted to the type the key already has."""
    parts = key.split(".")
    node = config
    for part in parts[:-1]:
        if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
            raise unknown_key_error(config, key)
        node = node[part]
    leaf = parts[-1]
    if leaf not in node:
        raise unknown_key_error(config, key)
    current = node[leaf]
    field_type = node.get_type(leaf) if hasattr(node, "get_type") else type(current)
    try:
        value = _convert(raw, current, field_type)
    except ValueError as e:
        raise UserError(f"config key '{key}': cannot use {raw!r}: {e}") from None
    try:
        node[leaf] = value
    except (TypeError, KeyError) as e:
        raise UserError(f"config key '{key}': cannot use {raw!r}: {e}") from None


def _convert(raw: str, current: Any, field_type: Any) -> Any:
    if raw.lower() in ("none", "null") and field_type is not str:
        return None
    if field_type is bool or isinstance(current, bool):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected true or false")
    if field_type is int or (isinstance(current, int) and not isinstance(current, bool)):
        try:
            value = float(raw) if any(c in raw for c in ".eE") else int(raw)
        except ValueError:
            raise ValueError("expected an integer") from None
        if isinstance(value, float) and not value.is_integer():
            raise ValueError("expected an integer")
        return int(value)
    if field_type is float or isinstance(current, float):
        try:
            return float(raw)
        except ValueError:
            raise ValueError("expected a number") from None
    if field_type is str or isinstance(current, str):
        return raw
    try:
        return ast.literal_eval(raw)  # tuples, lists, dicts
    except (ValueError, SyntaxError):
        raise ValueError("expected a Python literal such as (1, 2) or ('a', 'b')") from None



def upgrade_saved(config: ml_collections.ConfigDict, sections: ObjectiveSections | None = None) -> None:
    """Brings a config saved by an older jaxtune (a run's checkpoint) to today's keys, in place:
    data.source -> data.builtin and, given `sections`, the objective's flat keys -> objective.<name>.*
    (other objectives' keys dropped). Old runs stay loadable; old keys a user writes are errors."""
    data = config.get("data")
    if data is not None and "source" in data:
        with data.unlocked():
            source = data.source
            del data["source"]
            data.builtin = "" if source == "jsonl" else source
    if data is not None:
        _add_new_data_keys(config)
    if sections is None or "objective" not in config:
        return
    node = config.objective
    all_sections = sections.sections()
    name = sections.canonical(node.type)
    if name not in all_sections or name in node:
        return
    section = all_sections[name]
    prompts = node.get("prompts")
    if prompts is not None and name == "grpo":
        with config.data.unlocked():
            config.data.builtin = "verifiable" if prompts == "verifiable" else ""
        if prompts == "gsm8k" and "format" in section:
            section.format = "gsm8k"
    for key, value in node.items():
        if key in section:
            section[key] = value
    with config.unlocked():
        config.objective = ml_collections.ConfigDict({"type": node.type, name: section})


def _add_new_data_keys(config: ml_collections.ConfigDict) -> None:
    """Data keys added since a run was saved, at values that read its data as it was read then
    (records as plain fields: `format` was 'fields' before 'auto' existed)."""
    was = {"format": "fields"}
    tasks = [t for section in ("data", "eval") if section in config and "tasks" in config[section]
             for t in config[section].tasks.values() if isinstance(t, ml_collections.ConfigDict)]
    for node, schema in [(config.data, base_config().data)] + [(t, task_config()) for t in tasks]:
        with node.unlocked():
            for key, value in schema.items():
                if key not in node:
                    node[key] = was.get(key, value)


def to_json_dict(config: ml_collections.ConfigDict) -> dict:
    """A JSON-safe plain dict (tuples become lists) for checkpoints and logs."""
    return _plain(config.to_dict())


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
