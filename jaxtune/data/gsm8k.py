"""GSM8K-style JSONL (``question``, ``answer`` whose last line is ``#### N``) -> RL / SFT records.

Each record keeps the worked solution (everything before ``####``) for SFT and the final answer,
normalised (commas dropped), for the ``math`` reward: ``{"prompt", "solution", "answer", ...}``;
other fields of the line are kept for reward functions.
"""

from __future__ import annotations

import re
from pathlib import Path

from jaxtune.data.sources import JsonlSource
from jaxtune.errors import UserError

_FINAL_RE = re.compile(r"####\s*([^\n]+?)\s*$")


def parse_gsm8k(record: dict, where: str) -> dict:
    """One GSM8K record -> {"prompt", "solution", "answer", ...the other fields}."""
    for key in ("question", "answer"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            raise UserError(f"{where}: expected a non-empty string field {key!r} (GSM8K format: question, answer)")
    found = _FINAL_RE.search(record["answer"].strip())
    if not found:
        raise UserError(f"{where}: field 'answer' does not end with '#### <final answer>'")
    extra = {k: v for k, v in record.items() if k not in ("question", "answer", "_where")}
    return {**extra, "prompt": record["question"].strip(), "solution": record["answer"].strip(),
            "answer": found.group(1).replace(",", "").strip()}


def read_gsm8k(path: str | Path) -> list[dict]:
    """Every record of a GSM8K-style JSONL file; a bad record names its file and line."""
    source = JsonlSource(path)
    out = []
    for i in range(len(source)):
        record = source[i]
        out.append(parse_gsm8k(record, str(record.get("_where", f"{path}:{i + 1}"))))
    return out
