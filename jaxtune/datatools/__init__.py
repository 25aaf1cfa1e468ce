"""Instruction-data tooling behind `jaxtune data ...`: building, cleaning and decontaminating sets.

Modules (each imported on its own; nothing heavy is imported here):
  ngrams.py               one text normalisation and word n-gram features shared by the tools below
  records.py              reading inputs (JSONL files, a config's data.tasks / eval.tasks) and writing outputs
  dedup.py                exact and near-duplicate removal (MinHash-LSH, `datasketch`) within a set and across tasks
  decontaminate.py        n-gram overlap between training sets and evaluation sets (13-grams by default)
  quality.py              quality filters (length, script, repetition, answer format) and diverse selection
  screen.py               the `data.decontaminate` / `data.tasks.<t>.filters` hook run before training
  commands.py             argparse setup and handlers of `jaxtune data dedup | decontaminate | filter`
  rouge.py                ROUGE-L F-measure (`rouge-score`) and the max-similarity-to-a-pool filter
  sampling.py             the small text-in/text-out interface the generators call, served by jaxtune's sampler
  progress.py             resumable JSONL output (records + a per-batch report)
  self_instruct.py        the Self-Instruct loop (`jaxtune data self-instruct`)
  evolve.py               Evol-Instruct rewriting (`jaxtune data evolve`)
  generation_commands.py  argparse setup and handlers of the two generation subcommands
"""
