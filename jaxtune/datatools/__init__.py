"""Instruction-data tools behind `jaxtune data ...`: generation and cleaning of instruction sets.

Modules (imported where used, nothing here):
- rouge: ROUGE-L F-measure (rouge-score) and the max-similarity-to-a-pool check used as a filter.
- self_instruct: the Self-Instruct loop (`jaxtune data self-instruct`).
- evolve: Evol-Instruct rewriting (`jaxtune data evolve`).
- sampling: the small text-in/text-out interface the generators call, served by jaxtune's sampler.
- progress: resumable JSONL output (records + a per-batch report).
- generation_commands: argparse setup and handlers of the two generation subcommands.
"""
