"""Resumable generation output: records appended batch by batch, and a report that says what is done.

A generator works in numbered batches whose content depends only on the settings, the seed and
the batches before them. After each batch it appends the batch's records to the output JSONL
(flushed, fsynced), then one line to the report JSONL naming the batch (with its counts and drop
reasons). The report's first line holds the settings. On restart the report says which batches
are complete; output records of an unfinished batch (a run killed between the two writes, or
mid-line) are cut off, so rerunning the same command appends the missing batches and the file
equals an uninterrupted run's. Settings that change what is generated must match the first run's.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from jaxtune import distributed
from jaxtune.data.sources import parse_json_record
from jaxtune.errors import UserError

log = logging.getLogger(__name__)


def run_rates(kept: int, seconds: float, tokens: int, sampler_seconds: float, dropped: Mapping[str, int]) -> tuple[str, str]:
    """("R instructions/s, T generated tokens/s while sampling", "reason n, ...") of a generation run's summary."""
    rate = kept / seconds if seconds else 0.0
    tps = tokens / sampler_seconds if sampler_seconds else 0.0
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(dropped.items())) or "none"
    return f"{rate:.2f} instructions/s, {tps:.1f} generated tokens/s while sampling", reasons


def digest(texts: list[str]) -> str:
    """A short fingerprint of the inputs a run started from (recorded in the report's settings)."""
    import hashlib

    return hashlib.sha256(json.dumps(texts, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


def read_jsonl(path: str | os.PathLike, what: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) of every non-blank line; a malformed line is a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path}: no such file (expected JSONL, one JSON object per line)")
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            record = parse_json_record(raw, f"{what} {path}:{number}")  # the data sources' parser and errors
            record.pop("_where")
            yield number, record


def _complete_lines(path: Path) -> list[tuple[int, int, bytes]]:
    """(start offset, end offset, line) of each newline-terminated line; a torn last line is left out."""
    if not path.is_file():
        return []
    data, out, start = path.read_bytes(), [], 0
    while (end := data.find(b"\n", start)) >= 0:
        out.append((start, end + 1, data[start:end + 1]))
        start = end + 1
    return out


def _truncate(path: Path, size: int) -> None:
    if path.is_file() and path.stat().st_size != size:
        log.warning("%s: cutting an unfinished batch's tail (%d bytes)", path, path.stat().st_size - size)
        with path.open("r+b") as f:
            f.truncate(size)


class BatchLog:
    """The output JSONL (records carry `batch`) and its report JSONL (settings, then one line per batch)."""

    def __init__(self, output: str | os.PathLike, report: str | os.PathLike | None, *, command: str,
                 settings: Mapping[str, Any]):
        self.output = Path(output)
        self.report = Path(report) if report else self.output.with_name(self.output.name + ".report.jsonl")
        self.command, self.settings = command, dict(settings)
        self.writer = distributed.process_index() == 0  # files are written once (a shared filesystem)

    def resume(self) -> tuple[list[dict], list[dict]]:
        """(records, batch report lines) of the complete batches, in order; cuts unfinished tails.

        Checks that the settings match the first run's (a mismatch would mix two different runs).
        """
        report_lines = _complete_lines(self.report)
        if not report_lines:
            if self.output.is_file() and self.output.stat().st_size and not self.report.is_file():
                raise UserError(f"{self.command}: {self.output} exists but has no report {self.report}, so what it holds "
                                "cannot be resumed; give a new --output (or move the file away)")
            self._truncate_all()
            return [], []
        header, batches = None, []
        report_end = 0
        for number, (_, end, raw) in enumerate(report_lines, start=1):
            try:
                line = json.loads(raw)
            except json.JSONDecodeError as e:
                raise UserError(f"{self.command}: report {self.report}:{number}: invalid JSON ({e})") from None
            if number == 1:
                header = line
            elif line.get("batch") != len(batches):
                raise UserError(f"{self.command}: report {self.report}:{number}: expected batch {len(batches)}, "
                                f"found {line.get('batch')!r}; the report was edited or mixes two runs")
            else:
                batches.append(line)
            report_end = end
        self._check_settings(header or {})
        records, output_end = [], 0
        done = len(batches)
        for number, (_, end, raw) in enumerate(_complete_lines(self.output), start=1):
            try:
                record = json.loads(raw)
            except json.JSONDecodeError:
                break  # a torn write of an unfinished batch: everything from here is cut off
            if not isinstance(record, dict) or not isinstance(record.get("batch"), int):
                raise UserError(f"{self.command}: {self.output}:{number}: not a record this command wrote "
                                "(no integer 'batch' field)")
            if record["batch"] >= done:
                break
            records.append(record)
            output_end = end
        if self.writer:
            _truncate(self.report, report_end)
            _truncate(self.output, output_end)
        return records, batches

    def _check_settings(self, header: Mapping[str, Any]) -> None:
        saved = header.get("settings")
        if header.get("command") != self.command or not isinstance(saved, dict):
            raise UserError(f"{self.command}: {self.report} is not a {self.command} report (its first line should "
                            "hold the settings); give a new --output")
        changed = {k: (saved.get(k), v) for k, v in self.settings.items() if saved.get(k) != v}
        if changed:
            what = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items()))
            raise UserError(f"{self.command}: {self.output} was generated with other settings ({what}); rerun with "
                            "the first run's settings to resume it, or give a new --output")

    def _truncate_all(self) -> None:
        if not self.writer:
            return
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.output.write_bytes(b"")
        self._append(self.report, [{"command": self.command, "settings": self.settings}], fresh=True)

    def _append(self, path: Path, lines: list[dict], fresh: bool = False) -> None:
        with path.open("wb" if fresh else "ab") as f:
            for line in lines:
                f.write(json.dumps(line, ensure_ascii=False).encode("utf-8") + b"\n")
            f.flush()
            os.fsync(f.fileno())

    def write_batch(self, batch: int, records: list[dict], summary: Mapping[str, Any]) -> None:
        """Appends the batch's records (each gets `batch`), then its report line: the batch is done."""
        if not self.writer:
            return
        self._append(self.output, [{**r, "batch": batch} for r in records])
        self._append(self.report, [{"batch": batch, **summary}])
