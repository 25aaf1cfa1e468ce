"""A data source: CSV files as records, fed to the SFT pipeline as one task.

A source is anything with `__len__` and `__getitem__(index) -> dict` (Grain's random-access
protocol) whose records are plain Python values plus a `_where` label ("file:line") that errors
and skip counts name. Every stage after it (templates, tokenization, shuffling, mixing, packing,
checkpointed data position) is the shared pipeline's.
"""

import csv
from pathlib import Path

from jaxtune.data import pipeline
from jaxtune.data.examples import TaskSpec
from jaxtune.data.flan import FlanSpec
from jaxtune.data.sources import SourceError


class CsvSource:
    """Rows of a CSV file with a header line, as dicts keyed by column name."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise SourceError(f"{self.path}: no such data file (expected a CSV file with a header line)")
        with self.path.open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            self.columns = next(reader, None)
            self.rows = [(reader.line_num, row) for row in reader if row]
        if not self.columns:
            raise SourceError(f"{self.path}: empty file (expected a header line)")

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        line, row = self.rows[index]
        where = f"{self.path}:{line}"
        if len(row) != len(self.columns):
            raise SourceError(f"{where}: {len(row)} values for {len(self.columns)} columns {self.columns}")
        return {**dict(zip(self.columns, row)), "_where": where}


def csv_batches(path, templates, tokenizer, *, seq_len, batch_size, seed=0):
    """Packed SFT batches (the batch contract's keys, [batch_size, seq_len]) from a CSV file whose
    columns fill the `{field}` placeholders of `templates`, (input_pattern, target_pattern) pairs."""
    task = TaskSpec("csv", CsvSource(path), flan={"csv": FlanSpec(tuple(templates))})
    batches, _stats = pipeline.build_dataset([task], tokenizer, seq_len=seq_len, batch_size=batch_size, seed=seed)
    return batches
