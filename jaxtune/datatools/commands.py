"""`jaxtune data dedup | decontaminate | filter`: argparse setup and handlers.

Inputs are JSONL files (any record shape: Alpaca/Self-Instruct {instruction, input, output}, the
project's task files, chat `messages`) and/or a `--config` whose training tasks (data.tasks, else
data.train_path) are read; `decontaminate` also reads the config's evaluation sets (eval.tasks,
data.eval_path, eval.mc_path, data.decontaminate.eval_files). Each set is written cleaned to
OUT_DIR/<name>.jsonl (a file's stem, or the task name), with a JSON report; stdout gets one line.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jaxtune.errors import UserError


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return value


def _count(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


def _names(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated field names, e.g. instruction,input,output")
    return names


def _common(parser: argparse.ArgumentParser, *, fields_help: str) -> None:
    parser.add_argument("inputs", nargs="*", help="JSONL files (one JSON object per line)")
    parser.add_argument("--config", help="read the training tasks of this config (data.tasks, else data.train_path); "
                        "--config.KEY=VALUE overrides apply")
    parser.add_argument("--out_dir", required=True, help="cleaned sets go to OUT_DIR/<file stem or task name>.jsonl")
    parser.add_argument("--report", help="JSON report path (default: OUT_DIR/<command>_report.json)")
    parser.add_argument("--fields", type=_names, default=(), help=fields_help)
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")


def add_commands(data_commands, load_config: Callable[[str, list[str]], Any]) -> None:
    """Adds dedup, decontaminate and filter to the `jaxtune data` subcommands (handler in `run`).
    `load_config(spec, overrides)` loads and validates a --config (the CLI passes validation.load_config:
    validation sits above the data tools, which the objectives use for their data screen)."""
    fields = ("text fields compared, comma-separated (a.b.0 reads nested values); default: every string in the "
              "record (chat contents, Self-Instruct instances)")
    dedup = data_commands.add_parser(
        "dedup", help="remove exact and near duplicates (MinHash-LSH over word n-grams) within and across sets; "
        "the first occurrence (earlier file/task, earlier line) is kept")
    _common(dedup, fields_help=fields)
    dedup.add_argument("--threshold", type=_fraction, default=0.8, help="estimated Jaccard similarity of word n-gram "
                       "sets at which a record is a near duplicate (default 0.8)")
    dedup.add_argument("--ngram", type=_count(1), default=5, help="words per shingle (default 5)")
    dedup.add_argument("--num_perm", type=_count(16), default=128, help="MinHash permutations (default 128)")
    dedup.add_argument("--seed", type=int, default=1, help="MinHash permutation seed (default 1)")
    dedup.add_argument("--exact_only", action="store_true", help="only remove exact (normalised-text) duplicates")
    dedup.set_defaults(run=_dedup, load_config=load_config)

    decon = data_commands.add_parser(
        "decontaminate", help="drop training records sharing a word n-gram (13 by default) with evaluation sets")
    _common(decon, fields_help="training fields compared, comma-separated; " + fields.split("; ", 1)[1])
    decon.add_argument("--eval", action="append", default=[], metavar="FILE",
                       help="an evaluation set as a JSONL file (repeatable); with --config, its eval.tasks, "
                       "data.eval_path, eval.mc_path and data.decontaminate.eval_files are added")
    decon.add_argument("--eval_tfds", action="append", default=[], metavar="NAME[:SPLIT]",
                       help="an evaluation set as a prepared TFDS split (default split: test; nothing is downloaded)")
    decon.add_argument("--tfds_data_dir", default="", help="TFDS data_dir for --eval_tfds")
    decon.add_argument("--eval_fields", type=_names, default=(), help="evaluation fields compared (default: every string)")
    decon.add_argument("--n", type=_count(1), default=None, help="words per n-gram (default 13, or the config's "
                       "data.decontaminate.n)")
    decon.add_argument("--fraction", type=_fraction, default=None,
                       help="0 (default): one shared n-gram contaminates a record; > 0: this fraction of its n-grams")
    decon.set_defaults(run=_decontaminate, load_config=load_config)

    filt = data_commands.add_parser(
        "filter", help="quality filters (length, script, repetition, answer format) and LIMA-style selection of "
        "the N most diverse records per set")
    _common(filt, fields_help="text measured by the length/script/repetition filters; " + fields.split("; ", 1)[1])
    for name, what in (("min_words", "fewest words"), ("max_words", "most words (0: no bound)"),
                       ("min_chars", "fewest characters"), ("max_chars", "most characters (0: no bound)")):
        filt.add_argument(f"--{name}", type=_count(0), default=0, help=what)
    filt.add_argument("--scripts", type=_names, default=(), help="allowed scripts of letters, comma-separated "
                      "(latin, cyrillic, greek, cjk, arabic, ..., or ascii)")
    filt.add_argument("--min_script_fraction", type=_fraction, default=0.9,
                      help="with --scripts: fraction of letters that must be in them (default 0.9)")
    filt.add_argument("--max_duplicate_line_fraction", type=_fraction, default=1.0,
                      help="drop records whose repeated lines exceed this fraction (Gopher: 0.3; default off)")
    filt.add_argument("--max_top_ngram_fraction", type=_fraction, default=1.0,
                      help="drop records whose most frequent word n-gram covers more than this fraction of their "
                      "characters (Gopher: 0.2 for 2-grams; default off)")
    filt.add_argument("--top_ngram", type=_count(1), default=2, help="n of --max_top_ngram_fraction (default 2)")
    filt.add_argument("--nonempty", action="append", default=[], metavar="FIELD",
                      help="this field must hold non-blank text (repeatable), e.g. --nonempty output")
    filt.add_argument("--regex", action="append", default=[], metavar="FIELD=PATTERN",
                      help="this field must match the regular expression (re.search; repeatable)")
    filt.add_argument("--select_diverse", type=_count(1), default=0, metavar="N",
                      help="after filtering, keep the N most diverse records of each set (greedy k-center on MinHash "
                      "of word 3-grams)")
    filt.add_argument("--seed", type=int, default=1, help="MinHash seed of --select_diverse (default 1)")
    filt.set_defaults(run=_filter, load_config=load_config)


def _load_config(args, overrides):
    if not args.config:
        if overrides:
            raise UserError(f"data {args.data_command}: --config.{overrides[0]} given without --config")
        return None
    return args.load_config(args.config, overrides)


def _train_sets(args, config):
    from jaxtune.datatools import records

    sets = records.read_files(args.inputs)
    if config is not None:
        for s in records.config_train_sets(config):
            if any(other.name == s.name for other in sets):
                raise UserError(f"data {args.data_command}: an input file and a config task are both named {s.name!r}")
            sets.append(s)
    if not sets:
        raise UserError(f"data {args.data_command}: nothing to read; give JSONL files and/or --config")
    return sets


def _write(args, sets, kept_records, report: dict, summary: str) -> None:
    from jaxtune.datatools import records

    out = Path(args.out_dir)
    written = {}
    for s in sets:
        path = out / f"{s.name.replace('/', '_').replace(':', '_')}.jsonl"
        records.write_jsonl(path, kept_records(s.name))
        written[s.name] = str(path)
    report["outputs"] = written
    report_path = Path(args.report or out / f"{args.data_command}_report.json")
    records.write_json(report_path, report)
    print(f"jaxtune: {summary}; wrote {out}/ and {report_path}", flush=True)


def _dedup(args, overrides) -> int:
    from jaxtune.datatools.dedup import DedupSettings, dedup

    sets = _train_sets(args, _load_config(args, overrides))
    settings = DedupSettings(ngram=args.ngram, threshold=args.threshold, num_perm=args.num_perm, seed=args.seed,
                             near=not args.exact_only, fields=args.fields)
    result = dedup(sets, settings)
    _write(args, sets, result.kept_records, result.report(settings), result.summary())
    return 0


def _decontaminate(args, overrides) -> int:
    from jaxtune.datatools import records
    from jaxtune.datatools.decontaminate import DecontaminationSettings, decontaminate

    config = _load_config(args, overrides)
    sets = _train_sets(args, config)
    evals = records.read_files(args.eval) + records.read_tfds(args.eval_tfds, args.tfds_data_dir)
    defaults = DecontaminationSettings()
    if config is not None:
        from jaxtune.datatools import screen

        evals += screen.config_eval_sets(config.data, config.eval)
        defaults = screen.settings_from(config.data.decontaminate)
    settings = DecontaminationSettings(
        n=args.n or defaults.n, fraction=defaults.fraction if args.fraction is None else args.fraction,
        fields=args.fields or defaults.fields, eval_fields=args.eval_fields or defaults.eval_fields)
    result = decontaminate(sets, evals, settings)
    _write(args, sets, result.kept_records, result.report(settings), result.summary())
    return 0


def _filter(args, overrides) -> int:
    from jaxtune.datatools import quality
    from jaxtune.datatools.records import record_id

    sets = _train_sets(args, _load_config(args, overrides))
    regex = []
    for item in args.regex:
        field, sep, pattern = item.partition("=")
        if not sep or not field:
            raise UserError(f"data filter: --regex {item!r}: expected FIELD=PATTERN, e.g. --regex 'output=\\S'")
        regex.append((field, pattern))
    filters = quality.QualityFilters(
        min_words=args.min_words, max_words=args.max_words, min_chars=args.min_chars, max_chars=args.max_chars,
        scripts=args.scripts, min_script_fraction=args.min_script_fraction,
        max_duplicate_line_fraction=args.max_duplicate_line_fraction,
        max_top_ngram_fraction=args.max_top_ngram_fraction, top_ngram=args.top_ngram,
        nonempty=tuple(args.nonempty), regex=tuple(regex), fields=args.fields)
    filters.check("data filter")
    if not filters.active and not args.select_diverse:
        raise UserError("data filter: no filter given (e.g. --min_words 3, --nonempty output, --select_diverse 1000)")
    kept: dict[str, list[dict]] = {}
    import dataclasses

    report = {"filters": {**dataclasses.asdict(filters), "select_diverse": args.select_diverse, "seed": args.seed},
              "sets": {}}
    total = dropped_total = unselected_total = 0
    for s in sets:
        indices, dropped = quality.apply_filters(s.records, filters)
        survivors = [s.records[i] for i in indices]
        selected = survivors
        if args.select_diverse:
            order = quality.select_diverse(survivors, args.select_diverse, seed=args.seed, fields=args.fields)
            selected = [survivors[i] for i in sorted(order)]  # written in source order
        kept[s.name] = selected
        reasons: dict[str, int] = {}
        for _, why in dropped:
            rule = why.split(":", 1)[0]
            reasons[rule] = reasons.get(rule, 0) + 1
        report["sets"][s.name] = {
            "origin": s.origin, "records": len(s.records), "dropped": len(dropped), "passed": len(survivors),
            "kept": len(selected), "dropped_records": [{"id": record_id(s.records[i]), "reason": why} for i, why in dropped],
        }
        total += len(s.records)
        dropped_total += len(dropped)
        unselected_total += len(survivors) - len(selected)
    summary = f"filter: {total} records in {len(sets)} set(s), dropped {dropped_total} by the filters"
    if args.select_diverse:
        summary += f", {unselected_total} not among the {args.select_diverse} most diverse per set"
    _write(args, sets, kept.__getitem__, report, summary + f", kept {total - dropped_total - unselected_total}")
    return 0
