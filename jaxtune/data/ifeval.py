"""IFEval's own record format (google-research `instruction_following_eval/data/input_data.jsonl`).

A record is ``{"key", "prompt", "instruction_id_list": ["punctuation:no_comma", ...], "kwargs": [{...}, ...]}``
(one kwargs dict per instruction; ``{}``, null, or null-valued keys where an instruction takes none,
as in the Hugging Face copy). `constraints_from_ifeval` turns each instruction into a constraint
``{"type": <instruction id>, **kwargs}``, which `jaxtune.rewards.instructions` validates and
scores with IFEval's own checker rules (`jaxtune.rewards.ifeval_checkers`, the one implementation
GRPO rewards use too). All 25 instruction ids are scored, ``language:response_language``
included; Google's file loads as it is (its ``letter`` kwargs ``#`` and ``!`` are counted as given).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxtune.data.sources import SourceError

RESPONSE_FIELD = "response"  # IFEval's input_response_data: {"prompt", "response"}


def is_ifeval_record(record: Mapping[str, Any]) -> bool:
    return "instruction_id_list" in record


def constraints_from_ifeval(record: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    """The constraints of one IFEval record, one per instruction, in order (validated when scored).

    Raises SourceError (naming `where` and the instruction) for a malformed record: ids not a
    list of strings, or kwargs not a list of objects aligned with them."""
    ids, kwargs = record.get("instruction_id_list"), record.get("kwargs")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise SourceError(f"{where}: field 'instruction_id_list' must be a non-empty list of IFEval instruction ids, "
                          f"got {ids!r}")
    if kwargs is None:
        kwargs = [None] * len(ids)
    if not isinstance(kwargs, list) or len(kwargs) != len(ids):
        raise SourceError(f"{where}: field 'kwargs' must be a list with one entry per instruction "
                          f"({len(ids)}), got {kwargs!r}")
    constraints = []
    for i, (instruction, args) in enumerate(zip(ids, kwargs)):
        if args is not None and not isinstance(args, Mapping):
            raise SourceError(f"{where}: instruction {i} ({instruction!r}): kwargs must be an object, got {args!r}")
        args = {k: v for k, v in (args or {}).items() if v is not None and k != "type"}  # HF copy: null = absent
        constraints.append({**args, "type": instruction})
    return constraints
