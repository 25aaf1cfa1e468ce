"""Key lookups shared by the schema and the loader: the closest valid key, and keys that moved.

A key that was renamed or moved into an objective's section gives one error naming its new place
(`RENAMED`, plus every objective key that used to sit flat under `objective.`), so an old command
line or config file says what to write instead of "unknown key".
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping

import ml_collections

from jaxtune.errors import UserError

# Old key -> what replaces it (keys that moved into `objective.<name>.` are derived, see moved_key_error).
RENAMED: dict[str, str] = {
    "data.source": "data.builtin ('' reads data.train_path or data.tasks; quickstart and verifiable as before)",
    "objective.prompts": ("data.builtin='verifiable' for the built-in problems, or data.train_path for JSONL prompts "
                          "(objective.grpo.format='gsm8k' for GSM8K question/answer records)"),
}


def all_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every dotted key of `config`, sections included."""
    keys = []
    for k, v in config.items():
        full = f"{prefix}{k}"
        keys.append(full)
        if isinstance(v, ml_collections.ConfigDict):
            keys.extend(all_keys(v, full + "."))
    return keys


def unknown_key_error(config: ml_collections.ConfigDict, key: str, prefix: str = "") -> UserError:
    """'unknown config key' naming the closest key of `config` (keys shown with `prefix`)."""
    close = difflib.get_close_matches(key, all_keys(config), n=1, cutoff=0.5)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
    return UserError(f"unknown config key '{prefix}{key}'{hint}")


def moved_key_error(key: str, sections: Mapping[str, ml_collections.ConfigDict] | None = None,
                    selected: str = "") -> UserError | None:
    """The error for an old key (RENAMED, or `objective.K` for a key K of an objective's section), else None.

    `sections` maps objective names to their sections; `selected` is the config's objective, whose
    section is named first.
    """
    if key in RENAMED:
        return UserError(f"config key '{key}' was renamed: use {RENAMED[key]}")
    sections = sections or {}
    head, _, rest = key.partition(".")
    if head != "objective" or not rest or rest == "type":
        return None
    leaf = rest.split(".")[0]
    if leaf in sections:
        return None
    owners = [name for name, section in sections.items() if leaf in section]
    if not owners:
        return None
    if selected in owners:
        return UserError(f"config key '{key}' moved to 'objective.{selected}.{rest}' (objective keys live in the "
                         "selected objective's section)")
    new = " / ".join(f"'objective.{name}.{rest}'" for name in owners)
    return UserError(f"config key '{key}' moved to {new} (objective keys live in the section of the objective that "
                     f"reads them; this config's objective.type is {selected!r})")
