"""`jaxtune data self-instruct` and `jaxtune data evolve`: argparse setup and handlers.

`add_commands(data_commands)` registers both under `jaxtune data`; each parser sets `run`
(cli.main calls it with the parsed args and the --config overrides). The model comes from `inference.load`, as for
`jaxtune generate`: a run's latest checkpoint (--workdir) or a Hugging Face dir (--hf_dir). Input
files are read and checked before the model is loaded, so a bad file fails fast.
"""

from __future__ import annotations

import argparse

from jaxtune import distributed
from jaxtune.datatools.evolve import MUTATIONS
from jaxtune.errors import UserError


def _model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", help="a jaxtune run directory (latest checkpoint, saved config, tokenizer)")
    parser.add_argument("--hf_dir", help="a Hugging Face model dir (config.json, *.safetensors, tokenizer) or a Hub "
                        "model id org/name[@revision]")
    parser.add_argument("--output", required=True, help="JSONL written (appended to when resuming)")
    parser.add_argument("--report", default=None, help="progress/report JSONL (default: OUTPUT.report.jsonl)")
    parser.add_argument("--batch_size", type=int, default=8, help="requests per batch (prompts per sampler call)")
    parser.add_argument("--device_batch_size", type=int, default=64, help="rows per device call of the sampler")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chat_template", default=None,
                        help="send each prompt as a user turn of this chat template (built-in name, jinja string, "
                        "file, tokenizer_config.json, or 'auto': the run's / tokenizer's); default: plain text")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")


def add_commands(data_commands) -> None:
    si = data_commands.add_parser(
        "self-instruct", parents=[distributed.parent_parser()],
        help="bootstrap instructions + instances from seed tasks with a model (Self-Instruct); resumable")
    si.add_argument("--seed_file", required=True,
                    help="seed tasks JSONL: instruction, instances [{input, output}], is_classification")
    si.add_argument("--num_instructions", type=int, default=100, help="stop once this many are in the output")
    si.add_argument("--num_seed_examples", type=int, default=6, help="seed instructions per prompt")
    si.add_argument("--num_machine_examples", type=int, default=2, help="generated instructions per prompt")
    si.add_argument("--instance_max_new_tokens", type=int, default=256)
    si.add_argument("--instance_temperature", type=float, default=0.0, help="instances (0 = greedy)")
    si.add_argument("--similarity_threshold", type=float, default=0.7, help="drop when ROUGE-L >= this vs the pool")
    si.add_argument("--min_words", type=int, default=3)
    si.add_argument("--max_words", type=int, default=150)
    si.add_argument("--max_instances", type=int, default=3, help="instances kept per instruction")
    si.add_argument("--max_requests", type=int, default=None,
                    help="give up after this many requests in all (default 20 x --num_instructions)")
    _model_flags(si)
    si.set_defaults(top_p=0.5, run=_self_instruct)

    ev = data_commands.add_parser(
        "evolve", parents=[distributed.parent_parser()],
        help="rewrite instructions into harder/new ones over rounds with a model (Evol-Instruct); resumable")
    ev.add_argument("--input", required=True,
                    help="JSONL with 'instruction' (+ optional 'input', 'id'): Alpaca, Self-Instruct seeds or output")
    ev.add_argument("--rounds", type=int, default=4, help="evolution rounds (a rerun with more continues)")
    ev.add_argument("--mutations", default=",".join(MUTATIONS),
                    help=f"comma-separated, drawn uniformly per item and round: {', '.join(MUTATIONS)}")
    ev.add_argument("--response_max_new_tokens", type=int, default=256)
    ev.add_argument("--response_temperature", type=float, default=0.0, help="responses (0 = greedy)")
    ev.add_argument("--no_gain_threshold", type=float, default=0.9,
                    help="eliminate when ROUGE-L F against the parent >= this (no information gain)")
    ev.add_argument("--judge", action="store_true", help="also ask the model whether parent and child are equal")
    ev.add_argument("--limit", type=int, default=0, help="evolve only the first N instructions (0 = all)")
    _model_flags(ev)
    ev.set_defaults(run=_evolve)


def _load_sampler(args):
    from jaxtune import inference
    from jaxtune.datatools.sampling import ModelSampler

    if args.device_batch_size < 1:
        raise UserError(f"--device_batch_size must be >= 1, got {args.device_batch_size}")
    return ModelSampler(inference.load(workdir=args.workdir, hf_dir=args.hf_dir), batch_size=args.device_batch_size,
                        chat_template=args.chat_template)


def _self_instruct(args, overrides: list[str]) -> int:
    from jaxtune.datatools import self_instruct

    if overrides:
        raise UserError(f"data self-instruct: takes no --config overrides, got --config.{overrides[0]}")
    distributed.initialize(distributed.settings_from(args))
    settings = self_instruct.Settings(
        num_seed_examples=args.num_seed_examples, num_machine_examples=args.num_machine_examples,
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        instance_max_new_tokens=args.instance_max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        instance_temperature=args.instance_temperature, similarity_threshold=args.similarity_threshold,
        min_words=args.min_words, max_words=args.max_words, max_instances=args.max_instances, seed=args.seed)
    settings.check()
    if args.num_instructions < 1:
        raise UserError(f"data self-instruct: --num_instructions must be >= 1, got {args.num_instructions}")
    seeds = self_instruct.read_seed_tasks(args.seed_file)
    sampler = _load_sampler(args)
    result = self_instruct.generate(sampler, seeds, output=args.output, report=args.report,
                                    num_instructions=args.num_instructions, settings=settings,
                                    max_requests=args.max_requests)
    print(f"jaxtune: self-instruct: {result.summary()}; wrote {args.output}", flush=True)
    return 0


def _evolve(args, overrides: list[str]) -> int:
    from jaxtune.datatools import evolve

    if overrides:
        raise UserError(f"data evolve: takes no --config overrides, got --config.{overrides[0]}")
    distributed.initialize(distributed.settings_from(args))
    settings = evolve.Settings(
        mutations=tuple(m.strip() for m in args.mutations.split(",") if m.strip()), batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, response_max_new_tokens=args.response_max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, response_temperature=args.response_temperature,
        no_gain_threshold=args.no_gain_threshold, judge=args.judge, limit=args.limit, seed=args.seed)
    settings.check()
    if args.rounds < 1:
        raise UserError(f"data evolve: --rounds must be >= 1, got {args.rounds}")
    inputs = evolve.read_instructions(args.input, settings.limit)
    sampler = _load_sampler(args)
    result = evolve.evolve(sampler, inputs, output=args.output, report=args.report, rounds=args.rounds,
                           settings=settings)
    print(f"jaxtune: evolve: {result.summary()}; wrote {args.output}", flush=True)
    return 0
