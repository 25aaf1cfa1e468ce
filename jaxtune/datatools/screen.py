"""The data screen run before training: per-task quality filters and decontamination against eval sets.

`data.tasks.<t>.filters` (a dict of quality.QualityFilters keys) and `data.decontaminate` (enabled,
n, fraction, fields, eval_fields, eval_files, eval_tfds) are applied where a task's source is opened
(datasets.task_spec / the pair tasks), before any shuffling: a task's records become the
`Subset` of its source that passed, in source order. The subset is a pure function of the data
and the config, so every process and every resumed run computes the same one and the Grain
iterator state (indices into it) stays valid. The evaluation sets are the config's own held-out
sets (eval.tasks, data.eval_path, eval.mc_path) plus data.decontaminate.eval_files / eval_tfds.
What was dropped is printed (one line per task) and written to WORKDIR/data_screen.json.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from jaxtune.data.sources import SourceError, open_source, open_task_source
from jaxtune.datatools import records as records_lib
from jaxtune.datatools.decontaminate import DecontaminationSettings, EvalIndex, contamination
from jaxtune.datatools.quality import QualityFilters
from jaxtune import workdir as workdir_lib
from jaxtune.errors import UserError

log = logging.getLogger(__name__)
REPORT_FILE = workdir_lib.DATA_SCREEN_REPORT


def settings_from(d: ml_collections.ConfigDict) -> DecontaminationSettings:
    """data.decontaminate as settings: `fraction` is the coverage threshold (0: any shared n-gram); the
    optional keys part (default "all": the config compares answers too), mode and min_words pass through."""
    settings = DecontaminationSettings(n=d.n, threshold=float(d.fraction), part=d.get("part", "all"),
                                       mode=d.get("mode", "ngram"), min_words=d.get("min_words", 0),
                                       fields=tuple(d.fields), eval_fields=tuple(d.eval_fields))
    settings.check("config key 'data.decontaminate'", threshold_key="fraction")
    return settings


def config_eval_sets(data: ml_collections.ConfigDict, eval_cfg: ml_collections.ConfigDict | None) -> list:
    """The held-out sets of a config (eval.tasks, data.eval_path, eval.mc_path) plus
    data.decontaminate.eval_files (JSONL) and eval_tfds ("name:split")."""
    sets = []
    if eval_cfg is not None:
        for name, t in eval_cfg.tasks.items():
            source = open_task_source(t, f"eval.tasks.{name}")
            sets.append(records_lib.RecordSet(name, records_lib.SourceRecords(source), t.path, (t.path,)))
        if eval_cfg.mc_path:
            sets += [records_lib.RecordSet("eval.mc_path", s.records, s.origin, s.paths)
                     for s in records_lib.read_files([eval_cfg.mc_path])]
    if data.eval_path and not data.tasks and data.get("source_kind", "jsonl") != "jsonl":  # e.g. a 🤗 dataset split
        source = open_source(data.source_kind, data.eval_path, split=data.eval_split, name=data.name,
                             revision=data.revision, where="data.eval_path")
        sets.append(records_lib.RecordSet("data.eval_path", records_lib.SourceRecords(source), data.eval_path,
                                          (data.eval_path,)))
    elif data.eval_path and not data.tasks:
        sets += [records_lib.RecordSet("data.eval_path", s.records, s.origin, s.paths)
                 for s in records_lib.read_files([data.eval_path])]
    for path in data.decontaminate.eval_files:
        sets += [records_lib.RecordSet(f"file:{s.name}", s.records, s.origin, s.paths)
                 for s in records_lib.read_files([path])]
    sets += records_lib.read_tfds(tuple(data.decontaminate.eval_tfds))
    return sets


class Subset:
    """The records of `source` at `indices` (random access, picklable for Grain workers)."""

    def __init__(self, source, indices: np.ndarray):
        self.source, self.indices = source, np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        return self.source[int(self.indices[index])]

    def __repr__(self) -> str:
        return f"Subset({self.source!r}, {len(self)} of {len(self.source)} records)"


class Screen:
    """Applies a config's filters and decontamination to each training task's source (see the module docstring)."""

    def __init__(self, data: ml_collections.ConfigDict, eval_cfg: ml_collections.ConfigDict | None):
        self.data, self.eval_cfg = data, eval_cfg
        self.decontaminate = bool(data.decontaminate.enabled)
        self.settings = settings_from(data.decontaminate)
        self._index: EvalIndex | None = None
        self.report: dict[str, Any] = {"filters": {}, "decontamination": {}}
        self.lines: list[str] = []

    @classmethod
    def from_config(cls, data: ml_collections.ConfigDict, eval_cfg: ml_collections.ConfigDict | None):
        """A Screen when the config asks for one (data.decontaminate.enabled or any task's filters), else None."""
        if "decontaminate" not in data:
            return None
        filtered = any(t.get("filters") for t in data.tasks.values())
        return cls(data, eval_cfg) if data.decontaminate.enabled or filtered else None

    @property
    def index(self) -> EvalIndex:
        if self._index is None:
            sets = config_eval_sets(self.data, self.eval_cfg)
            if not sets:
                raise UserError("config key 'data.decontaminate.enabled' is True but the config has no evaluation "
                                  "sets (eval.tasks, data.eval_path, eval.mc_path, data.decontaminate.eval_files)")
            self._index = EvalIndex(sets, self.settings)
            self.report["decontamination"]["settings"] = {**dataclasses.asdict(self.settings),
                                                          "eval_sets": self._index.examples}
        return self._index

    def __call__(self, name: str, task: ml_collections.ConfigDict, source) -> Any:
        """The records of `source` that pass `task`'s filters and are not contaminated."""
        filters = QualityFilters.from_dict(task.get("filters") or {}, f"data.tasks.{name}.filters")
        dropped: dict[str, list] = {"filters": [], "decontamination": []}
        kept = []
        for i in range(len(source)):
            try:
                record = source[i]
            except SourceError:
                if task.on_error != "skip":
                    raise
                kept.append(i)  # the pipeline skips and counts it
                continue
            why = filters.reason(record) if filters.active else None
            if why is not None:
                dropped["filters"].append({"id": records_lib.record_id(record), "reason": why})
                continue
            hit = contamination(record, self.index, self.settings) if self.decontaminate else None
            if hit is not None:
                dropped["decontamination"].append({"id": records_lib.record_id(record), "ngram": hit.text,
                                                   "eval_set": hit.eval_set, "eval_id": hit.eval_id,
                                                   "coverage": round(hit.coverage, 4)})
                continue
            kept.append(i)
        if not kept:
            raise UserError(f"data.tasks.{name}: every record was dropped by its filters / decontamination "
                              f"(see {REPORT_FILE} rules); loosen them")
        n = len(source)
        if filters.active:
            self.report["filters"][name] = {"records": n, "dropped": len(dropped["filters"]),
                                            "records_dropped": dropped["filters"]}
            self.lines.append(f"filters: task {name!r}: dropped {len(dropped['filters'])} of {n} records")
        if self.decontaminate:
            by_set: dict[str, int] = {}
            for d in dropped["decontamination"]:
                by_set[d["eval_set"]] = by_set.get(d["eval_set"], 0) + 1
            self.report["decontamination"][name] = {"records": n, "contaminated": len(dropped["decontamination"]),
                                                    "by_eval_set": by_set, "examples": dropped["decontamination"]}
            where = ", ".join(f"{k}: {v}" for k, v in by_set.items()) or "none"
            self.lines.append(f"decontamination: task {name!r}: dropped {len(dropped['decontamination'])} of {n} "
                              f"records sharing a {self.settings.n}-gram with an eval set ({where})")
        return source if len(kept) == n else Subset(source, np.asarray(kept))

    def finish(self, workdir: str | Path | None) -> None:
        """Prints the per-task lines and writes WORKDIR/data_screen.json (process 0)."""
        from jaxtune import distributed, paths

        if distributed.process_index() != 0:
            return
        path = None
        if workdir is not None:
            path = paths.path(workdir) / REPORT_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            import json

            path.write_text(json.dumps(self.report, indent=1, ensure_ascii=False) + "\n")
        for line in self.lines:
            print(f"jaxtune: {line}" + (f" (report: {path})" if path else ""), flush=True)
