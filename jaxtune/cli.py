"""`jaxtune` console entry point.

User mistakes (bad config keys, bad data, missing files) end in one line
`jaxtune: error: ...` and exit status 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from jaxtune import distributed, platforms
from jaxtune import workdir as workdir_lib
from jaxtune.errors import UserError

EXIT_USER_ERROR = 2
# Subcommands that use devices: they take the multi-process flags (`parents=[distributed.parent_parser()]`)
# and start the multi-process runtime before anything else.
DEVICE_COMMANDS = ("train", "eval", "generate", "plan")
EXIT_DOES_NOT_FIT = 3  # `jaxtune plan`: the step needs more memory than the devices have


class _Parser(argparse.ArgumentParser):
    """Usage mistakes end like every other user error: the usage, then one `jaxtune: error:` line."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        command = self.prog.removeprefix("jaxtune").strip()
        self.exit(EXIT_USER_ERROR, f"jaxtune: error: {command + ': ' if command else ''}{message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="jaxtune",
        description="JAX-native post-training for LLMs.",
        epilog="Config overrides: --config.KEY=VALUE, e.g. --config.optim.lr=1e-4 --config.train.steps=500",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = commands.add_parser("train", help="train (or resume) a run from a config file",
                                parents=[distributed.parent_parser()])
    train.add_argument("--config", required=True, help="path/to/config.py[:arg], e.g. configs/quickstart.py")
    train.add_argument("--workdir", required=True, help="run directory: checkpoints, metrics.jsonl, tokenizer")
    train.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")
    _add_plan_parser(commands)
    convert = commands.add_parser(
        "convert", help="Hugging Face dir -> orbax params checkpoint (--hf_dir, --out), or a run's latest "
        "checkpoint -> Hugging Face dir (--workdir, --hf_out)",
    )
    convert.add_argument("--hf_dir", help="Hugging Face model dir to read (config.json + *.safetensors), or a Hub "
                         "model id org/name[@revision]")
    convert.add_argument("--out", help="directory for the orbax params checkpoint (step 0)")
    convert.add_argument("--workdir", help="a jaxtune run directory whose latest checkpoint is exported")
    convert.add_argument("--hf_out", help="Hugging Face model dir to write")
    convert.add_argument("--dtype", default=None, help="param dtype (default: the checkpoint's)")
    convert.add_argument("--max_shard_size", default="2GB", help="safetensors shard size for --hf_out")
    _add_push_options(convert, "--hf_out")
    convert.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")
    export = commands.add_parser(
        "export", help="a LoRA/DoRA run's latest adapters -> PEFT adapter dir (--peft) and/or a merged HF model (--merged)",
    )
    export.add_argument("--workdir", required=True, help="a jaxtune run directory trained with peft.method=lora|dora|prefix")
    export.add_argument("--peft", help="directory for adapter_config.json + adapter_model.safetensors (peft library)")
    export.add_argument("--merged", help="Hugging Face model dir with the adapters merged into the base weights")
    export.add_argument("--dtype", default=None, help="merged weights dtype (default: the model's param dtype)")
    export.add_argument("--max_shard_size", default="2GB", help="safetensors shard size for --merged")
    _add_push_options(export, "--peft or --merged")
    export.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")
    _add_generate_parser(commands)
    _add_eval_parser(commands)
    data = commands.add_parser("data", help="inspect a config's input pipeline; build and clean instruction data")
    data_commands = data.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    preview = data_commands.add_parser(
        "preview", help="print rendered examples (trained span marked) and per-task stats for a config")
    preview.add_argument("--config", required=True, help="path/to/config.py[:arg]")
    preview.add_argument("--num", type=int, default=5, help="examples to print")
    preview.add_argument("--batches", type=int, default=20, help="batches drawn for the statistics")
    preview.add_argument("--workdir", default=None,
                         help="where a from-scratch tokenizer is trained/cached (default: a temporary directory)")
    preview.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")
    from jaxtune.datatools import commands as datatools_commands  # dedup, decontaminate, filter
    from jaxtune.datatools import generation_commands  # self-instruct, evolve

    datatools_commands.add_commands(data_commands, load_config=_load_validated_config)
    generation_commands.add_commands(data_commands)
    return parser


def _add_push_options(parser, folder: str) -> None:
    parser.add_argument("--push_to_hub", metavar="ORG/NAME", default=None,
                        help=f"upload the written {folder} folder (model card included) to this Hub repo")
    parser.add_argument("--private", action="store_true", help="--push_to_hub: create the repo private")
    parser.add_argument("--revision", default=None, help="--push_to_hub: the branch to commit to (created if missing)")


def _publish(args, out_dir: str, config, workdir: str, *, kind: str, step: int) -> None:
    """Every export gets its model card; with --push_to_hub the folder is uploaded as written."""
    from jaxtune import publish

    publish.write_card(out_dir, config, workdir, kind=kind, step=step)
    if args.push_to_hub and distributed.process_index() == 0:
        url = publish.push(out_dir, args.push_to_hub, private=args.private, revision=args.revision)
        print(f"jaxtune: pushed {out_dir} to {url}", flush=True)


def _check_push_options(args, outputs: list[str]) -> None:
    if (args.private or args.revision) and not args.push_to_hub:
        raise UserError("--private and --revision go with --push_to_hub ORG/NAME")
    if args.push_to_hub and len([o for o in outputs if o]) != 1:
        raise UserError("--push_to_hub uploads one exported folder: give one of --peft OUT or --merged OUT")


def _add_plan_parser(commands) -> None:
    plan = commands.add_parser(
        "plan", help="build a config's run and compile its train step (for the local devices or a TPU topology, "
        "without TPUs) to report per-device memory, the largest temporaries and a step-time/MFU bound")
    plan.add_argument("--config", required=True, help="path/to/config.py[:arg], e.g. configs/sft_llama.py:llama3.2-1b")
    plan.add_argument("--topology", default=None,
                      help="TPU topology to compile for, e.g. v5p:2x2x1, v5e:2x4 or a cloud name (v5p-8, v5litepod-8, "
                      "v5e-8, v6e-8, v4-8); needs the tpu extra. Default: the local devices")
    plan.add_argument("--num_slices", type=int, default=1, help="TPU slices joined over DCN (multi-slice)")
    plan.add_argument("--headroom", type=float, default=0.9,
                      help="a plan fits when it needs at most this fraction of a device's memory")
    plan.add_argument("--dump_dir", default=None, help="keep XLA's dump (HLO, buffer assignment) here")
    plan.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")


def _load_validated_config(spec: str, overrides: list[str]):
    """validation.load_config, imported on use (the CLI's parser and error paths stay light)."""
    from jaxtune import validation

    return validation.load_config(spec, overrides)


def _plan(args, overrides: list[str]) -> int:
    from jaxtune import validation

    config = validation.load_config(args.config, overrides, needs_data=False)
    from jaxtune import plan

    try:
        plan.run(config, config_name=args.config, topology=args.topology, num_slices=args.num_slices,
                 headroom=args.headroom, dump_dir=args.dump_dir)
    except plan.DoesNotFit as e:
        print(f"jaxtune: error: {e}", file=sys.stderr, flush=True)
        return EXIT_DOES_NOT_FIT
    return 0


def _add_generate_parser(commands) -> None:
    gen = commands.add_parser("generate", help="sample from a run's latest checkpoint (--workdir) or an HF dir (--hf_dir)",
                              parents=[distributed.parent_parser()])
    gen.add_argument("--workdir", help="a jaxtune run directory (latest checkpoint, saved config, tokenizer)")
    gen.add_argument("--hf_dir", help="a Hugging Face model dir (config.json, *.safetensors, tokenizer) or a Hub "
                     "model id org/name[@revision]")
    gen.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    gen.add_argument("--max_new_tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top_k", type=int, default=None)
    gen.add_argument("--top_p", type=float, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable); EOS always stops")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--chat", action="store_true",
                     help="interactive: read user lines from stdin (until EOF or /exit), reply with the chat template")
    gen.add_argument("--chat_template", default=None, help="--chat: built-in name, jinja string, .jinja file or "
                     "tokenizer_config.json (default: the run's chat task template, else the tokenizer's)")
    gen.add_argument("--system", default=None, help="--chat: system message opening the conversation")
    gen.add_argument("--show_prompt", action="store_true", help="--chat: print each rendered prompt to stderr")
    gen.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")


def _add_eval_parser(commands) -> None:
    ev = commands.add_parser(
        "eval", help="run the configured evaluations (loss, exact match/F1, k-shot, multiple choice, "
        "instruction following); "
        "writes WORKDIR/eval_results.json and eval/... rows in metrics.jsonl", parents=[distributed.parent_parser()],
    )
    ev.add_argument("--config", help="config file (default: the config saved with the workdir's checkpoint)")
    ev.add_argument("--workdir", help="run directory: the model (unless --hf_dir) and the results")
    ev.add_argument("--hf_dir", help="evaluate this Hugging Face model dir (or Hub model id org/name[@revision]) "
                    "instead of the workdir's checkpoint")
    _add_harness_options(ev)
    ev.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")


def _add_harness_options(ev) -> None:
    """`eval --harness` (lm-evaluation-harness tasks on the model) and `eval --responses` (no model)."""
    ev.add_argument("--harness", help="comma-separated lm-eval tasks to run on the model (needs jaxtune[harness])")
    ev.add_argument("--harness_include", help="folder of extra lm-eval task YAMLs (lm-eval's --include_path)")
    ev.add_argument("--num_fewshot", type=int, default=None, help="--harness: few-shot examples per task")
    ev.add_argument("--limit", type=float, default=None, help="--harness: documents per task (a fraction if < 1)")
    ev.add_argument("--apply_chat_template", action="store_true", help="--harness: render prompts with the chat template")
    ev.add_argument("--system_instruction", default=None, help="--harness: system message (with the chat template)")
    ev.add_argument("--harness_batch_size", type=int, default=8, help="--harness: requests per device call")
    ev.add_argument("--harness_max_length", type=int, default=None,
                    help="--harness: context length (default: config.json's max_position_embeddings)")
    ev.add_argument("--responses", help="score this JSONL of precomputed responses, no model: IFEval's "
                    "input_response_data ({prompt, response}, with --prompts) or eval-task records plus 'response'")
    ev.add_argument("--prompts", help="--responses: IFEval's input_data.jsonl the responses answer")
    ev.add_argument("--output", help="results JSON (default: WORKDIR/harness_results.json or responses_results.json)")


def _generate(args) -> int:
    from jaxtune import generate, inference, objectives
    from jaxtune.data import pipeline

    if args.chat:
        return _chat(args)
    if not args.prompt:
        raise UserError("generate: give at least one --prompt")
    if any(not p.strip() for p in args.prompt):
        raise UserError("generate: --prompt is empty")
    loaded = inference.load(workdir=args.workdir, hf_dir=args.hf_dir, adapt=objectives.adapt_model_config)
    tok = loaded.tokenizer
    outputs = generate.generate(
        loaded.model, loaded.params,
        pipeline.tokenize_prompts(tok, args.prompt, seq2seq=getattr(loaded.model, "is_encoder_decoder", False)),
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, stop_tokens=(tok.eos_id,), seed=args.seed,
        pad_id=tok.pad_id,
    )
    for tokens in outputs:
        print(generate.decode_completion(tok.decode, tokens, args.stop), flush=True)
    return 0


def _chat(args) -> int:
    from jaxtune import chat_loop, inference, objectives

    if args.prompt:
        raise UserError("generate: --chat reads the conversation from stdin; drop --prompt")
    if distributed.is_multiprocess():
        raise UserError("generate: --chat is interactive; run it as a single process")
    loaded = inference.load(workdir=args.workdir, hf_dir=args.hf_dir, adapt=objectives.adapt_model_config)
    if getattr(loaded.model, "is_encoder_decoder", False):
        raise UserError("generate: --chat needs a chat model; an encoder-decoder (T5) answers --prompt texts")
    template = chat_loop.choose_template(args.chat_template, loaded.tokenizer, loaded.config)
    sampling = chat_loop.Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed, args.stop)
    chat_loop.chat(loaded.model, loaded.params, loaded.tokenizer, template, stdin=sys.stdin, stdout=sys.stdout,
                   sampling=sampling, system=args.system, show_prompt=sys.stderr if args.show_prompt else None)
    return 0


def _eval(args, overrides: list[str]) -> int:
    if args.harness:
        return _eval_harness(args)
    if args.responses:
        return _eval_responses(args)
    if not args.workdir:
        raise UserError("eval: --workdir is required (unless --responses, or --harness with --hf_dir)")
    from jaxtune import evaluate, inference, objectives, paths, trainer, validation

    config = validation.load_config(args.config, overrides) if args.config else None
    loaded = (inference.from_hf_dir(args.hf_dir, config) if args.hf_dir
              else inference.from_workdir(args.workdir, config, adapt=objectives.adapt_model_config))
    config = loaded.config
    objective = objectives.build(config)  # the run's objective decides what its held-out evaluation is
    # A held-out pair set's reference: the weights the run started from, rebuilt as training built them.
    objective.start_params = lambda: trainer.setup.start_weights(config, objective,
                                                                 vocab_size=loaded.model.config.vocab_size)
    eval_set = objective.eval_set(objective.load_data(args.workdir))
    if not eval_set:
        raise UserError("eval: nothing to evaluate; set data.eval_path (or data.builtin=quickstart), eval.mc_path "
                        "or eval.tasks")
    scores = objective.evaluate(loaded.model, loaded.params, loaded.tokenizer, eval_set,
                                show=config.eval.show_examples)
    step = loaded.step or 0
    path = paths.path(args.workdir) / workdir_lib.EVAL_RESULTS
    if distributed.process_index() == 0:  # files are written once (a shared workdir)
        evaluate.write_results(path, scores, step=step, model=args.hf_dir or str(args.workdir))
    _log_eval_metrics(args.workdir, step, scores)
    summary = ("loss", "perplexity", "token_accuracy", "exact_match", "f1", "accuracy", "accuracy_norm",
               *evaluate.INSTRUCTION_METRICS)
    for name, value in sorted(scores.items()):
        if name.rsplit("/", 1)[-1] in summary:  # per-task rows are in the JSON file
            print(f"{name}: {value:.4f}", flush=True)
    print(f"jaxtune: wrote {path}", flush=True)
    return 0


def _log_eval_metrics(workdir: str, step: int, scores: dict) -> None:
    """An evaluation's scores as one `eval/...` row of the run's metrics.jsonl (after its last step)."""
    from jaxtune import metrics

    writer = metrics.MetricsWriter(workdir, resume_step=2**62, tensorboard=False)
    writer.write(step, {f"eval/{k}": v for k, v in scores.items()})
    writer.close()


def _eval_harness(args) -> int:
    from jaxtune import harness, inference, paths

    if args.responses:
        raise UserError("eval: --harness runs a model, --responses scores a file without one; give one of them")
    if bool(args.workdir) == bool(args.hf_dir):
        raise UserError("eval --harness: give exactly one of --workdir (a jaxtune run) or --hf_dir (an HF model dir)")
    if not args.output and not args.workdir:
        raise UserError("eval --harness --hf_dir: pass --output for the results JSON")
    tasks = [t.strip() for t in args.harness.split(",") if t.strip()]
    manager = harness.task_manager(tasks, args.harness_include)  # unknown tasks fail before the model loads
    loaded = inference.load(workdir=args.workdir, hf_dir=args.hf_dir)
    lm = harness.harness_lm(loaded, batch_size=args.harness_batch_size,
                            max_length=args.harness_max_length or harness.max_length_of(loaded, args.hf_dir))
    results = harness.run_harness(lm, tasks, manager=manager, num_fewshot=args.num_fewshot,
                                  limit=args.limit, apply_chat_template=args.apply_chat_template,
                                  system_instruction=args.system_instruction)
    scores = harness.flat_metrics(results)
    path = paths.path(args.output) if args.output else paths.path(args.workdir) / workdir_lib.HARNESS_RESULTS
    if distributed.process_index() == 0:
        harness.write_results_json(results, path)
    if args.workdir:
        _log_eval_metrics(args.workdir, loaded.step or 0, scores)
    for name, value in sorted(scores.items()):
        print(f"{name}: {value:.4f}", flush=True)
    print(f"jaxtune: wrote {path}", flush=True)
    return 0


def _eval_responses(args) -> int:
    from jaxtune import evaluate, paths

    if args.hf_dir:
        raise UserError("eval --responses scores a file without a model; drop --hf_dir")
    scores = evaluate.score_responses_file(args.responses, prompts=args.prompts)
    path = paths.path(args.output) if args.output else (
        paths.path(args.workdir) / workdir_lib.RESPONSES_RESULTS if args.workdir else None)
    if path is not None:
        evaluate.write_results(path, scores, responses=str(args.responses))
    for name, value in sorted(scores.items()):
        print(f"{name}: {value:.4f}", flush=True)
    if path is not None:
        print(f"jaxtune: wrote {path}", flush=True)
    return 0


def _convert(args) -> int:
    """HF -> orbax params checkpoint, or a run's latest params -> HF (using the run's saved config)."""
    to_orbax = bool(args.hf_dir and args.out and not (args.workdir or args.hf_out))
    to_hf = bool(args.workdir and args.hf_out and not (args.hf_dir or args.out))
    if not (to_orbax or to_hf):
        raise UserError("convert: give either --hf_dir DIR --out DIR, or --workdir DIR --hf_out DIR")
    if to_orbax and args.push_to_hub:
        raise UserError("convert: --push_to_hub uploads a Hugging Face export (--workdir W --hf_out OUT)")
    _check_push_options(args, [args.hf_out or args.out])
    import orbax.checkpoint as ocp

    from jaxtune import config as config_lib
    from jaxtune import hub, models, paths

    if to_orbax:
        from jaxtune.hf_check import validate_hf_dir

        if hub.is_hub_id(args.hf_dir):  # the checkpoint's config names the exact commit it came from
            snapshot = hub.resolve(args.hf_dir)
            hf_dir, source = str(snapshot.path), f"{snapshot.repo_id}@{snapshot.commit}"
        else:
            hf_dir = source = str(paths.absolute(args.hf_dir))
        validate_hf_dir(hf_dir, tokenizer=False, param_dtype=args.dtype)
        _, params = models.from_pretrained(hf_dir, dtype=args.dtype)
        config = config_lib.base_config()
        config.model.hf_dir = source
        config.model.param_dtype = str(_dtype_name(params))
        directory = paths.absolute(args.out) / workdir_lib.CHECKPOINTS
        with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=True)) as manager:
            manager.save(0, args=ocp.args.Composite(
                state=ocp.args.StandardSave({"params": params}),
                config=ocp.args.JsonSave(config_lib.to_json_dict(config)),
            ), force=True)
            manager.wait_until_finished()
        print(f"jaxtune: wrote params checkpoint {directory / '0'}", flush=True)
        return 0

    config, model_config, state, step, tokenizer_dir = _load_run("convert", args.workdir, args.dtype)
    if config.peft.method != "none":
        raise UserError(f"convert: {args.workdir} is a {config.peft.method} run whose checkpoints hold adapters "
                        "only; use `jaxtune export --workdir W --merged OUT` (or --peft OUT)")
    models.save_pretrained(model_config, state["params"], args.hf_out, max_shard_size=args.max_shard_size,
                           tokenizer_dir=tokenizer_dir, add_bos=config.data.get("add_bos", "auto"))
    print(f"jaxtune: wrote Hugging Face model (step {step}) to {args.hf_out}", flush=True)
    _publish(args, args.hf_out, config, args.workdir, kind="full", step=step)
    return 0


def _load_run(command: str, workdir: str, dtype: str | None = None):
    """(config, model config, saved state dict, step, tokenizer dir) of a run's latest checkpoint."""
    from jaxtune import inference, objectives

    run = inference.restore_run(workdir, command, dtype=dtype, adapt=objectives.adapt_model_config)
    tokenizer_dir = run.tokenizer_path if run.tokenizer_path.is_dir() else run.tokenizer_path.parent
    return run.config, run.model_config, run.state, run.step, str(tokenizer_dir)


def _export(args) -> int:
    """A LoRA run's adapters -> PEFT dir and/or merged HF dir (the base re-created from its pointer)."""
    if not (args.peft or args.merged):
        raise UserError("export: give --peft OUT and/or --merged OUT")
    _check_push_options(args, [args.peft, args.merged])
    from jaxtune import loading
    from jaxtune.peft import export

    config, model_config, state, step, tokenizer_dir = _load_run("export", args.workdir)
    spec = loading.peft_spec(config)
    if spec is None:
        raise UserError(f"export: {args.workdir} is a full fine-tuning run (peft.method='none'); "
                        "use `jaxtune convert --workdir W --hf_out OUT`")
    if args.peft:
        export.check_exportable(spec)
    if args.merged:
        export.check_mergeable(spec)
        if config.model.get("hf_dir"):  # the base is re-read from the run's HF dir (a Hub id: its recorded commit)
            from jaxtune.hf_check import validate_hf_dir

            validate_hf_dir(loading.hf_dir(config), tokenizer=False)
    adapters = state["params"]
    base = None
    if args.merged or getattr(model_config, "num_labels", None):  # a reward model's PEFT export writes its head
        base = loading.base_params(config, model_config)  # as training held it, on the host
    if args.peft:
        export.export_peft(model_config, spec, adapters, args.peft, base_model_name_or_path=_base_name(config),
                           base=base)
        print(f"jaxtune: wrote PEFT adapters (step {step}) to {args.peft}", flush=True)
        _publish(args, args.peft, config, args.workdir, kind="peft", step=step)
    if args.merged:
        export.export_merged(model_config, spec, base, adapters, args.merged, dtype=args.dtype,
                             tokenizer_dir=tokenizer_dir, max_shard_size=args.max_shard_size,
                             add_bos=config.data.get("add_bos", "auto"))
        print(f"jaxtune: wrote merged Hugging Face model (step {step}) to {args.merged}", flush=True)
        _publish(args, args.merged, config, args.workdir, kind="merged", step=step)
    return 0


def _base_name(config) -> str | None:
    """adapter_config.json's base_model_name_or_path: the Hub repo id (without @revision) or the folder."""
    from jaxtune import hub

    ref = config.model.get("hf_dir") or None
    return hub.parse(ref)[0] if ref and hub.is_hub_id(ref) else ref


def _dtype_name(params) -> str:
    import jax

    return jax.tree.leaves(params)[0].dtype.name


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separates `--config.a.b=v` (or `--config.a.b v`) overrides from the ordinary arguments."""
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            body = arg[len("--config."):]
            if "=" not in body and i + 1 < len(argv):
                body = f"{body}={argv[i + 1]}"
                i += 1
            overrides.append(body)
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def _train(args, overrides: list[str]) -> int:
    from jaxtune import validation

    config = validation.load_config(args.config, overrides)  # all config errors before JAX starts work
    from jaxtune import trainer

    with workdir_lib.undo_on_user_error(args.workdir):  # a failed start leaves the workdir as it was
        workdir_lib.ensure_workdir(args.workdir)
        trainer.train(config, args.workdir)  # a signal-stopped run has saved and exits cleanly too
    return 0


def _data_preview(args, overrides: list[str]) -> int:
    import tempfile

    from jaxtune import validation

    config = validation.load_config(args.config, overrides)
    from jaxtune import loading
    from jaxtune.data.preview import preview
    from jaxtune.datatools.screen import Screen

    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or tmp
        settings = loading.data_settings(config, workdir)  # the tokenizer training would use (e.g. model.hf_dir's)
        for line in preview(settings, workdir, seed=config.seed, global_batch_size=config.train.global_batch_size,
                            num=args.num, batches=args.batches, screen=Screen.from_config(config.data, config.eval)):
            print(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, overrides = _split_overrides(argv)
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    platforms.cpu_only_without_accelerators()  # no libtpu start-up noise on a machine without TPUs
    try:
        if args.command in DEVICE_COMMANDS:
            distributed.initialize(distributed.settings_from(args))
            distributed.quiet_other_processes()
        if args.command == "train":
            return _train(args, overrides)
        if args.command == "plan":
            return _plan(args, overrides)
        if args.command == "convert":
            return _convert(args)
        if args.command == "generate":
            return _generate(args)
        if args.command == "eval":
            return _eval(args, overrides)
        if args.command == "export":
            return _export(args)
        if args.command == "data":
            run = getattr(args, "run", None)  # subcommands set their handler; preview is the default
            return run(args, overrides) if run else _data_preview(args, overrides)
    except UserError as e:
        if args.debug and not distributed.is_multiprocess():
            raise
        if args.debug:
            traceback.print_exc()
        print(f"jaxtune: error: {e}", file=sys.stderr)
        status = getattr(e, "exit_status", EXIT_USER_ERROR)
        distributed.fail_all(str(e), status)  # several processes: all stop, with this message
        return status
    except Exception as e:
        if not distributed.is_multiprocess():
            raise
        traceback.print_exc()
        distributed.fail_all(f"{type(e).__name__}: {e}", 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
