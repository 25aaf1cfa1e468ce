"""Instruction-data tooling behind `jaxtune data ...`: cleaning, decontaminating and building sets.

Modules (each imported on its own; nothing heavy is imported here):
  ngrams.py         one text normalisation and word n-gram features shared by the tools below
  records.py        reading inputs (JSONL files, a config's data.tasks / eval.tasks) and writing outputs
  dedup.py          exact and near-duplicate removal (MinHash-LSH, `datasketch`) within a set and across tasks
  decontaminate.py  n-gram overlap between training sets and evaluation sets (13-grams by default)
  quality.py        quality filters (length, script, repetition, answer format) and diverse selection
  screen.py         the `data.decontaminate` / `data.tasks.<t>.filters` hook run before training
  commands.py       argparse setup and handlers of `jaxtune data dedup | decontaminate | filter`
"""
