"""Config files, overrides and up-front validation.

A config is a Python file with `get_config(arg: str | None) -> ml_collections.ConfigDict`.
`base_config()` holds every key jaxtune understands, so config files only set what differs and a
typo in an override is caught (with the closest valid key) before anything compiles.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import math
import os
import sys
from pathlib import Path
from typing import Any

import ml_collections

from jaxtune import paths
from jaxtune.errors import UserError


def base_config() -> ml_collections.ConfigDict:
    """Every key with its default; config files derive from this rather than copying it."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.family = "llama"
    c.model.variant = "tiny"
    # A Hugging Face model dir (config.json + safetensors): when set, the architecture comes from
    # it (family/variant/architecture overrides are ignored), params start from its weights and
    # its tokenizer is used unless data.tokenizer is set.
    c.model.hf_dir = ""
    # The workdir of an earlier jaxtune run (e.g. SFT): params start from its latest checkpoint
    # (optimizer state and step start fresh). The architecture must match this config's.
    c.model.init_from = ""
    c.model.dtype = "float32"  # compute dtype; "bfloat16" on accelerators
    c.model.param_dtype = "float32"  # master weights
    c.model.remat_policy = "none"  # none | full | projections | offload | dots | dots_no_batch (README "Memory")
    # How attention is computed (jaxtune/models/attention.py): auto picks splash on TPU, cuDNN on
    # GPU where it applies (else blockwise), and on CPU the einsum for short rows, blockwise above.
    c.model.attention = "auto"  # auto | splash | blockwise | cudnn | reference
    # Architecture overrides on top of the variant; None keeps the variant's value.
    # vocab_size None means "take it from the tokenizer" when the variant is trained from scratch.
    c.model.vocab_size = ml_collections.FieldReference(None, field_type=int)
    c.model.hidden_size = ml_collections.FieldReference(None, field_type=int)
    c.model.intermediate_size = ml_collections.FieldReference(None, field_type=int)
    c.model.num_layers = ml_collections.FieldReference(None, field_type=int)
    c.model.num_heads = ml_collections.FieldReference(None, field_type=int)
    c.model.num_kv_heads = ml_collections.FieldReference(None, field_type=int)
    c.model.head_dim = ml_collections.FieldReference(None, field_type=int)
    c.model.max_position_embeddings = ml_collections.FieldReference(None, field_type=int)
    c.model.rope_theta = ml_collections.FieldReference(None, field_type=float)
    c.model.tie_word_embeddings = ml_collections.FieldReference(None, field_type=bool)

    c.data = ml_collections.ConfigDict()
    c.data.source = "jsonl"  # jsonl | quickstart | verifiable (built-in RL problems, builtin/verifiable.py)
    c.data.train_path = ""
    c.data.eval_path = ""
    # FLAN-style (input_pattern, target_pattern) pairs with {field} placeholders; one is chosen
    # per example from a seeded RNG.
    c.data.templates = (("{prompt}", "{response}"),)
    c.data.seq_len = 128
    c.data.packing = True  # preference/KTO: packed pairs (padding-free DPO), see data.max_pairs_per_row
    c.data.shuffle = True
    c.data.word_dropout = 0.0  # drop template (instruction) words in training prompts
    c.data.truncation = "truncate"  # truncate | drop | error
    c.data.tokenizer = ""  # path to a tokenizer file; "" trains one on the data (quickstart)
    c.data.tokenizer_vocab_size = 512
    # BOS before each prompt: auto = as the tokenizer's own config says (tokenizer.json post-processor,
    # add_bos_token beside a sentencepiece .model; chat templates write their own) | true | false.
    c.data.add_bos = "auto"
    c.data.num_train_examples = 100_000  # quickstart: generated training records
    c.data.num_eval_examples = 300  # quickstart: held-out phrasings evaluated by exact match
    c.data.verifiable_families = ("arithmetic", "constraints")  # data.source=verifiable: problem families
    # Built-in arithmetic problems take min..max operations (3 operations: ~20x more distinct problems,
    # too many to memorise; RL then has to improve the arithmetic itself, see README's RL section).
    c.data.verifiable_min_steps = 1
    c.data.verifiable_max_steps = 2
    c.data.worker_count = 0  # Grain multiprocessing workers (0 = in-process)
    c.data.read_threads = 0  # Grain reader threads (0 = read in the training thread)
    c.data.prefetch = 0  # elements prefetched by the reader threads
    c.data.on_error = "error"  # bad records (malformed JSON, wrong types, empty targets): error | skip (counted)
    c.data.packing_strategy = "first_fit"  # first_fit | best_fit
    c.data.packing_bins = 0  # open bins the packer fills at once; 0 = the per-process batch size
    # Slices of the data stream, each packed on its own (0 = one per process). A fixed count, divisible
    # by every process count you use, makes packed batches (and losses) independent of the process count.
    c.data.shards = 0
    # Packed preference pairs: rows of 2 * data.seq_len tokens (the room of one padded pair) hold whole
    # pairs, at most this many; per-pair arrays in a batch are [rows, max_pairs_per_row].
    c.data.max_pairs_per_row = 16
    # Preference/KTO/GRPO records with chat `messages`: a built-in name (llama3, gemma, chatml, qwen, alpaca,
    # plain), a jinja string, a .jinja file or a tokenizer_config.json; "" = the tokenizer's own template.
    # GRPO: when set, plain prompts are sent as the user turn through it too.
    c.data.chat_template = ""
    # Several tasks (FLAN-style templated files, TFDS, chat), mixed: a ConfigDict keyed by task name
    # whose values come from task_config(...). When empty, the single task above (data.train_path +
    # data.templates) is used.
    c.data.tasks = ml_collections.ConfigDict()
    c.data.mixture = ml_collections.ConfigDict()
    c.data.mixture.mode = "examples_proportional"  # examples_proportional | weights | temperature
    c.data.mixture.cap = 0  # examples_proportional/temperature: examples counted per task at most (0 = no cap)
    c.data.mixture.temperature = 1.0  # temperature mode: rate ~ min(n, cap) ** (1 / temperature)
    # Before training, drop training records that share a word n-gram with an evaluation set
    # (jaxtune/datatools/screen.py; report in WORKDIR/data_screen.json). The evaluation sets are the
    # config's own (eval.tasks, data.eval_path, eval.mc_path) plus eval_files / eval_tfds.
    c.data.decontaminate = ml_collections.ConfigDict()
    c.data.decontaminate.enabled = False
    c.data.decontaminate.n = 13  # words per n-gram (GPT-3, Tulu 3)
    c.data.decontaminate.fraction = 0.0  # 0: one shared n-gram contaminates; > 0: this fraction of a record's n-grams
    c.data.decontaminate.fields = ()  # training fields compared; () = every string in the record
    c.data.decontaminate.eval_fields = ()  # evaluation fields compared; () = every string
    c.data.decontaminate.eval_files = ()  # more evaluation sets: JSONL files
    c.data.decontaminate.eval_tfds = ()  # more evaluation sets: prepared TFDS splits, "name:split"

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000
    c.train.global_batch_size = 64
    c.train.grad_accum_steps = 1
    c.train.log_every = 10
    c.train.eval_every = 0  # 0 = only before and after training
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 2
    c.train.async_checkpoints = True
    c.train.z_loss = 0.0
    # The loss runs the LM head this many sequence positions at a time (per device it holds
    # [batch per device, logits_chunk, vocab] float32 logits, never [batch, seq_len, vocab]);
    # also used by evaluation log-likelihoods. 0 = unchunked (full logits).
    c.train.logits_chunk = 512
    c.train.max_seconds = 0.0  # >0: time budget; stop early, checkpoint, run the final eval
    c.train.progress_bar = True
    # A step whose loss or gradients are not finite: "halt" saves a diagnostic checkpoint
    # (WORKDIR/diagnostics/step_N) and exits with status 3; "skip" drops that update and goes on.
    c.train.nonfinite = "halt"

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 3e-4
    c.optim.schedule = "cosine"  # cosine | linear | constant
    c.optim.warmup_steps = 100
    c.optim.min_lr_ratio = 0.1  # final lr as a fraction of lr (cosine/linear)
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.1
    c.optim.clip_norm = 1.0  # 0 disables clipping

    # Parameter-efficient fine-tuning (jaxtune/peft): adapters train, the base stays frozen and
    # is not checkpointed (the config points to it: model.hf_dir, or family/variant + seed).
    c.peft = ml_collections.ConfigDict()
    c.peft.method = "none"  # none (full fine-tuning) | lora | dora | prefix
    c.peft.rank = 8
    c.peft.alpha = 16.0
    c.peft.dropout = 0.0  # on the adapter input, training only
    c.peft.rslora = False  # scaling alpha/sqrt(rank) instead of alpha/rank
    c.peft.targets = "q,k,v,o"  # comma list of q,k,v,o,gate,up,down, or "all-linear"
    c.peft.quantize = "none"  # none | nf4 | int8: QLoRA base weights (decoder projections)
    c.peft.quant_block_size = 64
    c.peft.prefix_length = 16  # prefix: learned key/value slots per layer (PEFT num_virtual_tokens)
    c.peft.prefix_projection = 0  # prefix: >0 trains them through an MLP of this hidden size (0: directly)
    # dtype the frozen base is held in: "" = model.param_dtype; "bfloat16" halves its memory on
    # accelerators (adapters and their optimizer state stay in model.param_dtype).
    c.peft.base_dtype = ""

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1 takes the devices left over by the other axes
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.rules = "fsdp"  # dp | fsdp | fsdp_tp
    # Multi-slice TPU jobs (devices on several slices joined by the data-centre network): the sizes
    # above are per slice (ICI) and these are across slices (DCN); each mesh axis is their product.
    # -1 takes the slices left over, so by default slices are data parallel. Ignored on one slice.
    c.mesh.dcn_data = -1
    c.mesh.dcn_fsdp = 1
    c.mesh.dcn_tensor = 1

    # objective.type: sft | dpo (paired preference losses; objective.loss_type) | kto (unpaired KTO).
    # Each objective owns its keys, defaults and checks (jaxtune/objectives/); they are merged here.
    from jaxtune import objectives  # imports jax: only when a config is built

    c.objective = objectives.base.config_defaults()

    c.eval = ml_collections.ConfigDict()
    c.eval.max_new_tokens = 12
    c.eval.batch_size = 128
    c.eval.show_examples = 6
    # Evaluations on the held-out set (data.eval_path / quickstart), before/after training, every
    # train.eval_every steps, and by `jaxtune eval`; results in eval/step_<n>.json + eval/... metrics.
    c.eval.loss = True  # token-weighted loss / perplexity of the held-out answers
    c.eval.generative = True  # greedy generation scored by exact match and token F1
    c.eval.num_shots = (0,)  # FLAN-style k-shot prompts (same-task solved examples first)
    c.eval.stop_strings = ()  # generation is cut at the first of these (besides EOS)
    c.eval.mc_path = ""  # JSONL multiple-choice set: fields + options + answer (index or text)
    c.eval.mc_templates = (("{prompt}", " {option}"),)  # prompt pattern, option pattern
    c.eval.peak_tflops = 0.0  # per device, for MFU; 0 = look up the device kind
    # Named held-out tasks (never trained on), keyed by name: eval_task_config(metric=..., <task_config keys>).
    c.eval.tasks = ml_collections.ConfigDict()
    # lm-evaluation-harness tasks scored with the other evaluations (needs jaxtune[harness]); metrics
    # eval/harness/<task>/<metric>. "" = none; e.g. "arc_easy,my_task" with harness_include="my_tasks/"
    c.eval.harness = ""
    c.eval.harness_include = ""  # folder of extra lm-eval task YAMLs
    c.eval.harness_limit = 0  # documents per task; 0 = all
    c.eval.harness_num_fewshot = -1  # -1 = each task's own default
    return c


def task_config(**overrides) -> ml_collections.ConfigDict:
    """One task of `config.data.tasks`: every key with its default; a misspelt key names the closest one.

    A task = source + field mapping + record format + template set (or chat template) + policies.
    """
    t = ml_collections.ConfigDict()  # defaults; `overrides` replace them below (any value type)
    t.source = "jsonl"  # jsonl | json | parquet | array_record | tfds
    t.path = ""  # file path (local or gs://...; globs for array_record), or the TFDS dataset name
    t.split = "train"  # tfds split
    t.data_dir = ""  # tfds data_dir
    t.format = "fields"  # fields | alpaca | self_instruct | chat
    t.fields = {}  # {template_field: source_column}; "a.b.0" reads nested values
    # (input_pattern, target_pattern) pairs; or a built-in set name ("nli", "extractive_qa", ...),
    # "file.json|yaml[:key]" or "python.module:ATTR[.key]" (e.g. FLAN's own pattern lists).
    t.templates = (("{prompt}", "{response}"),)
    t.chat_template = ""  # format=chat: built-in name, jinja string, tokenizer_config.json; "" = the tokenizer's
    t.options_style = "deterministic"  # {options_}: deterministic | random (heading/marker styles)
    t.options_field = "options"
    t.answer_field = "answer"  # rewritten to the option's marker when markers are letters/numbers
    t.few_shot = 0  # k exemplars from the same task (0 = zero-shot)
    t.few_shot_separator = "\n\n"  # between exemplars and before the example
    t.few_shot_target_separator = "\n"  # between an exemplar's input and its target
    t.few_shot_max_tokens = 0  # prompt budget for exemplars + example (0 = data.seq_len)
    t.cot = False  # chain-of-thought target: cot_pattern over the rationale field and the answer
    t.cot_pattern = "{rationale}\nSo the answer is {target_}."
    t.cot_instruction = "\nLet's think step by step."  # appended to the prompt when cot is on
    t.inversion = 0.0  # probability of an input-inverted example (target -> input)
    t.inversion_templates = ()  # template set for inverted examples; () = a generic swap
    t.word_dropout = 0.0
    t.truncation = "truncate"  # truncate | drop | error
    t.on_error = "error"  # error | skip (counted)
    t.weight = 1.0  # mixture.mode=weights
    t.cap = 0  # this task's examples-proportional cap (0 = data.mixture.cap)
    # Quality filters applied before training (datatools/quality.py QualityFilters keys), e.g.
    # {"min_words": 3, "nonempty": ("output",), "max_duplicate_line_fraction": 0.3}; {} = none.
    t.filters = {}
    for key in overrides:
        if key not in t:
            raise _unknown_key(t, key)
    return ml_collections.ConfigDict({**t.to_dict(), **overrides})


EVAL_METRICS = ("generative", "multiple_choice", "preference", "instructions")


def eval_task_config(metric: str = "generative", max_examples: int = 0, **task_keys) -> ml_collections.ConfigDict:
    """One held-out task of `config.eval.tasks`: a `task_config` (source, fields, templates, options...)
    plus its metric (generative: exact match/F1, zero- and k-shot; multiple_choice: option log-likelihood
    over the task's options field; preference: held-out pairs scored by a pair objective's loss,
    reward accuracy and margin; instructions: IFEval-style prompt/instruction-level strict/loose
    accuracy of greedy responses against each record's `constraints`, or IFEval's own records; the
    prompt is the template's input pattern) and `max_examples` (0 = all records)."""
    t = task_config(**task_keys)
    t.metric, t.max_examples = metric, max_examples
    return t


# --------------------------------------------------------------------------------------------
# Loading and overrides
# --------------------------------------------------------------------------------------------


def load_config(spec: str, overrides: list[str] = (), *, needs_data: bool = True) -> ml_collections.ConfigDict:
    """Loads `path.py[:arg]`, applies `a.b=value` overrides, locks and validates it.

    needs_data=False (`jaxtune plan`, which reads no data) accepts a config without data files.
    """
    path, _, arg = spec.partition(":")
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--config {path}: no such file (expected a Python file with get_config(arg))")
    module_spec = importlib.util.spec_from_file_location(f"jaxtune_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module
    try:
        module_spec.loader.exec_module(module)
    except UserError:
        raise
    except Exception as e:  # a config file is user code: report where it broke
        raise UserError(f"--config {path}: failed to load{_line_in(file, e)}: {type(e).__name__}: {e}") from e
    if not hasattr(module, "get_config"):
        raise UserError(f"--config {path}: defines no get_config(arg) function")
    try:
        config = module.get_config(arg or None)
    except UserError as e:
        if str(e).startswith(_ARG_ERROR):  # parse_arg's: name the file
            raise UserError(f"--config {spec}: {str(e)[len(_ARG_ERROR):]}") from None
        raise
    except Exception as e:
        raise UserError(f"--config {spec}: get_config raised{_line_in(file, e)}: {type(e).__name__}: {e}") from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise UserError(f"--config {path}: get_config must return an ml_collections.ConfigDict")
    config.lock()
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"override --config.{item}: expected --config.KEY=VALUE")
        set_value(config, key, value)
    validate(config, needs_data=needs_data)
    return config


def _line_in(file: Path, error: BaseException) -> str:
    """' at line N' of the deepest traceback frame (or syntax error) inside the config file, else ''."""
    import traceback

    if isinstance(error, SyntaxError) and error.lineno:
        return f" at line {error.lineno}"
    lines = [f.lineno for f in traceback.extract_tb(error.__traceback__) if Path(f.filename).resolve() == file.resolve()]
    return f" at line {lines[-1]}" if lines else ""


_ARG_ERROR = "config file argument: "


def parse_arg(arg: str | None, **defaults: Any) -> dict[str, Any]:
    """Parses a config file's `k=v,k2=v2` argument (the part after `path.py:`); a bare word is `variant`.

    With `defaults` (`parse_arg(arg, variant="tiny", steps=100)`) the argument is typed: each value
    is converted to its default's type by the same rules as `--config.KEY=VALUE` overrides, a name
    not among the defaults is an error naming the closest one, and the result holds every default.
    Without defaults every value stays a string.
    """
    raw: dict[str, str] = {}
    for part in (arg or "").split(","):
        if not part:
            continue
        k, sep, v = part.partition("=")
        raw[k.strip() if sep else "variant"] = v.strip() if sep else k.strip()
    if not defaults:
        return raw
    unknown = sorted(set(raw) - set(defaults))
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(defaults), n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UserError(f"{_ARG_ERROR}unknown arguments {unknown} after ':'{hint} "
                        f"(expected some of {', '.join(defaults)})")
    out = dict(defaults)
    for key, value in raw.items():
        default = defaults[key]
        try:
            out[key] = _convert(value, default, str if default is None else type(default))
        except ValueError as e:
            raise UserError(f"{_ARG_ERROR}argument '{key}={value}': {e}") from None
    return out


def all_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in config.items():
        full = f"{prefix}{k}"
        keys.append(full)
        if isinstance(v, ml_collections.ConfigDict):
            keys.extend(all_keys(v, full + "."))
    return keys


def _unknown_key(config, key: str) -> UserError:
    close = difflib.get_close_matches(key, all_keys(config), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return UserError(f"unknown config key '{key}'{hint}")


def set_value(config: ml_collections.ConfigDict, key: str, raw: str) -> None:
    """Sets `a.b.c` from a command-line string, converted to the type the key already has."""
    parts = key.split(".")
    node = config
    for i, part in enumerate(parts[:-1]):
        if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
            raise _unknown_key(config, key)
        node = node[part]
    leaf = parts[-1]
    if leaf not in node:
        raise _unknown_key(config, key)
    current = node[leaf]
    field_type = node.get_type(leaf) if hasattr(node, "get_type") else type(current)
    try:
        value = _convert(raw, current, field_type)
    except ValueError as e:
        raise UserError(f"config key '{key}': cannot use {raw!r}: {e}") from None
    try:
        node[leaf] = value
    except (TypeError, KeyError) as e:
        raise UserError(f"config key '{key}': cannot use {raw!r}: {e}") from None


def _convert(raw: str, current: Any, field_type: Any) -> Any:
    if raw.lower() in ("none", "null") and field_type is not str:
        return None
    if field_type is bool or isinstance(current, bool):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected true or false")
    if field_type is int or (isinstance(current, int) and not isinstance(current, bool)):
        try:
            value = float(raw) if any(c in raw for c in ".eE") else int(raw)
        except ValueError:
            raise ValueError("expected an integer") from None
        if isinstance(value, float) and not value.is_integer():
            raise ValueError("expected an integer")
        return int(value)
    if field_type is float or isinstance(current, float):
        try:
            return float(raw)
        except ValueError:
            raise ValueError("expected a number") from None
    if field_type is str or isinstance(current, str):
        return raw
    try:
        return ast.literal_eval(raw)  # tuples, lists, dicts
    except (ValueError, SyntaxError):
        raise ValueError("expected a Python literal such as (1, 2) or ('a', 'b')") from None


# --------------------------------------------------------------------------------------------
# Validation that needs no devices and no model
# --------------------------------------------------------------------------------------------

def choices() -> dict[str, tuple[str, ...]]:
    """The keys with a fixed set of values; each list lives in the module that implements it."""
    from jaxtune import nonfinite, optim, sharding
    from jaxtune.data import datasets, examples, mixtures, pipeline, tokenizers
    from jaxtune.models import attention, layers

    return {
        "data.source": datasets.SOURCES,
        "data.truncation": examples.TRUNCATION_POLICIES,
        "data.add_bos": tokenizers.ADD_BOS_CHOICES,
        "optim.schedule": optim.SCHEDULES,
        "mesh.rules": tuple(sharding.PRESETS),
        "model.remat_policy": tuple(layers.REMAT_POLICIES),
        "model.attention": attention.IMPLEMENTATIONS,
        "model.dtype": layers.COMPUTE_DTYPES,
        "model.param_dtype": layers.PARAM_DTYPES,
        "data.on_error": examples.ON_ERROR_POLICIES,
        "data.packing_strategy": pipeline.PACKING_STRATEGIES,
        "data.mixture.mode": mixtures.MODES,
        "train.nonfinite": nonfinite.POLICIES,
    }


def task_choices() -> dict[str, tuple[str, ...]]:
    """data.tasks / eval.tasks keys with a fixed set of values (owned by the data modules)."""
    from jaxtune.data import examples, flan, formats, sources

    return {
        "source": sources.SOURCE_KINDS,
        "format": formats.FORMATS,
        "options_style": flan.OPTIONS_STYLES,
        "truncation": examples.TRUNCATION_POLICIES,
        "on_error": examples.ON_ERROR_POLICIES,
    }


def validate_task(name: str, task: ml_collections.ConfigDict, section: str = "data.tasks") -> None:
    """Checks one entry of data.tasks (or eval.tasks); errors name the task and the key."""
    key = f"{section}.{name}"
    builder = "eval_task_config" if section == "eval.tasks" else "task_config"
    if not isinstance(task, ml_collections.ConfigDict):
        raise UserError(f"config key '{key}' must be a {builder}(...), found {type(task).__name__}")
    known = eval_task_config() if section == "eval.tasks" else task_config()
    for k in task:
        if k not in known:
            close = difflib.get_close_matches(k, list(known), n=1, cutoff=0.5)
            raise UserError(f"config key '{key}.{k}' is not a task key" + (f"; did you mean '{close[0]}'?" if close else ""))
    for k in known:
        if k not in task:
            raise UserError(f"config key '{key}' lacks '{k}'; build tasks with jaxtune.config.{builder}(...)")
    for k, allowed in task_choices().items():
        if task[k] not in allowed:
            raise UserError(f"config key '{key}.{k}' is {task[k]!r}; expected one of {', '.join(allowed)}")
    if not task.path:
        raise UserError(f"config key '{key}.path' is empty; expected a data file (or the TFDS dataset name)")
    if not task.templates and task.format != "chat":
        raise UserError(f"config key '{key}.templates' is empty; expected (input_pattern, target_pattern) pairs or a set name")
    for k in ("weight", "cap", "few_shot", "few_shot_max_tokens"):
        if task[k] < 0:
            raise UserError(f"config key '{key}.{k}' must be >= 0, got {task[k]}")
    for k in ("inversion", "word_dropout"):
        if not 0.0 <= task[k] < 1.0 + (k == "inversion"):
            raise UserError(f"config key '{key}.{k}' must be in [0, 1{']' if k == 'inversion' else ')'}, got {task[k]}")
    if task.filters:
        if section == "eval.tasks":
            raise UserError(f"config key '{key}.filters': filters apply to training tasks (data.tasks), "
                            "not to held-out tasks")
        from jaxtune.datatools.quality import QualityFilters

        QualityFilters.from_dict(task.filters, f"{key}.filters")


def validate(config: ml_collections.ConfigDict, *, needs_data: bool = True) -> None:
    """Rejects impossible values before any compile; the message names the key and the fix."""
    for key, allowed in choices().items():
        value = config
        for part in key.split("."):
            value = value[part]
        if value not in allowed:
            raise UserError(f"config key '{key}' is {value!r}; expected one of {', '.join(allowed)}")
    positive = {
        "optim.lr": config.optim.lr,
        "train.steps": config.train.steps,
        "train.global_batch_size": config.train.global_batch_size,
        "train.grad_accum_steps": config.train.grad_accum_steps,
        "train.log_every": config.train.log_every,
        "train.checkpoint_every": config.train.checkpoint_every,
        "train.keep_checkpoints": config.train.keep_checkpoints,
        "data.seq_len": config.data.seq_len,
    }
    for key, value in positive.items():
        if not value > 0:
            raise UserError(f"config key '{key}' must be > 0, got {value}")
    chunk = config.train.logits_chunk
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
        raise UserError(f"config key 'train.logits_chunk' must be an integer >= 0 (sequence positions per LM-head "
                        f"chunk; 0 = unchunked), got {chunk!r}")
    if config.optim.warmup_steps < 0:
        raise UserError(f"config key 'optim.warmup_steps' must be >= 0, got {config.optim.warmup_steps}")
    if not 0.0 <= config.optim.min_lr_ratio <= 1.0:
        raise UserError(f"config key 'optim.min_lr_ratio' must be in [0, 1], got {config.optim.min_lr_ratio}")
    if not 0.0 <= config.data.word_dropout < 1.0:
        raise UserError(f"config key 'data.word_dropout' must be in [0, 1), got {config.data.word_dropout}")
    for name, task in config.data.tasks.items():
        validate_task(name, task)
    _validate_decontaminate(config)
    if config.data.mixture.cap < 0 or not config.data.mixture.temperature > 0:
        raise UserError("config keys data.mixture.cap must be >= 0 and data.mixture.temperature > 0")
    if config.data.shards < 0:
        raise UserError(f"config key 'data.shards' must be >= 0, got {config.data.shards}")
    if not 1 <= config.data.verifiable_min_steps <= config.data.verifiable_max_steps <= 8:
        raise UserError("config keys 'data.verifiable_min_steps' and 'data.verifiable_max_steps' must satisfy "
                        f"1 <= min <= max <= 8, got {config.data.verifiable_min_steps} and {config.data.verifiable_max_steps}")
    if config.data.packing_bins < 0:
        raise UserError(f"config key 'data.packing_bins' must be >= 0, got {config.data.packing_bins}")
    if config.data.max_pairs_per_row < 1:
        raise UserError(f"config key 'data.max_pairs_per_row' must be >= 1, got {config.data.max_pairs_per_row}")
    single_jsonl = config.data.source == "jsonl" and not config.data.tasks
    if needs_data and single_jsonl and not config.data.train_path:
        raise UserError("config key 'data.train_path' is empty; data.source='jsonl' needs a JSONL file")
    if single_jsonl and not config.data.templates:
        raise UserError("config key 'data.templates' is empty; expected (input_pattern, target_pattern) pairs")
    _validate_eval(config.eval)
    _validate_eval_tasks(config)
    if config.model.hf_dir and config.model.init_from:
        raise UserError("config keys 'model.hf_dir' and 'model.init_from' are both set; pick one starting point")
    if config.peft.method != "none" and config.model.init_from:
        raise UserError("config key 'model.init_from' is not supported with LoRA yet; export the SFT model "
                        "(jaxtune export) and start from it with model.hf_dir")
    from jaxtune import objectives  # each objective checks its own keys

    objectives.base.validate(config)
    for prefix in ("", "dcn_"):
        for axis in ("data", "fsdp", "tensor"):
            size = config.mesh[prefix + axis]
            if size == 0 or size < -1:
                raise UserError(f"config key 'mesh.{prefix}{axis}' must be a positive size or -1, got {size}")
        if sum(config.mesh[prefix + a] == -1 for a in ("data", "fsdp", "tensor")) > 1:
            raise UserError(f"config keys mesh.{prefix}data/{prefix}fsdp/{prefix}tensor: at most one axis may be -1")
    from jaxtune.peft import lora  # a leaf module: spec parsing and validation

    lora.spec_from_config(config.peft)


def _validate_decontaminate(config: ml_collections.ConfigDict) -> None:
    d = config.data.decontaminate
    from jaxtune.datatools.screen import settings_from

    settings_from(d)  # n, fraction
    for key in ("fields", "eval_fields", "eval_files", "eval_tfds"):
        if not isinstance(d[key], (tuple, list)) or not all(isinstance(v, str) and v for v in d[key]):
            raise UserError(f"config key 'data.decontaminate.{key}' must be a tuple of non-empty strings, got {d[key]!r}")
    screened = d.enabled or any(t.get("filters") for t in config.data.tasks.values())
    if screened and config.objective.type == "grpo":
        raise UserError("config keys 'data.decontaminate' / 'data.tasks.<t>.filters': a GRPO run reads its prompts from "
                        "objective.grpo; clean them first with `jaxtune data decontaminate` / `jaxtune data filter`")
    if d.enabled and not config.data.tasks and config.data.source != "jsonl":
        raise UserError(f"config key 'data.decontaminate.enabled': data.source={config.data.source!r} generates its "
                        "own records; decontamination screens data.tasks or data.train_path files")


def _validate_eval(e: ml_collections.ConfigDict) -> None:
    for key in ("max_new_tokens", "batch_size"):
        if not e[key] > 0:
            raise UserError(f"config key 'eval.{key}' must be > 0, got {e[key]}")
    shots = e.num_shots
    if not isinstance(shots, (tuple, list)) or not shots or not all(isinstance(k, int) and k >= 0 for k in shots):
        raise UserError(f"config key 'eval.num_shots' must be a non-empty tuple of integers >= 0, e.g. (0, 2); got {shots!r}")
    if not isinstance(e.stop_strings, (tuple, list)) or not all(isinstance(s, str) and s for s in e.stop_strings):
        raise UserError(f"config key 'eval.stop_strings' must be a tuple of non-empty strings, got {e.stop_strings!r}")
    if e.mc_path and not paths.path(e.mc_path).is_file():
        raise UserError(f"config key 'eval.mc_path': {e.mc_path} does not exist (expected a JSONL file)")
    templates = e.mc_templates
    if not templates or not all(isinstance(t, (tuple, list)) and len(t) == 2 for t in templates):
        raise UserError(f"config key 'eval.mc_templates' must hold (prompt_pattern, option_pattern) pairs, got {templates!r}")
    if not all("{option}" in t[1] for t in templates):
        raise UserError("config key 'eval.mc_templates': every option pattern must contain '{option}'")


def _data_identity(source: str, path: str, split: str) -> tuple[str, str, str]:
    """What makes two task sources the same data: a TFDS name + split, or a file path."""
    if source == "tfds":
        return source, path, split
    return "file", path if "://" in path else os.path.abspath(os.path.expanduser(path)), ""


def _validate_eval_tasks(config: ml_collections.ConfigDict) -> None:
    """eval.tasks entries are held out: no name or data source may be a training task's."""
    d = config.data
    trained = {name: _data_identity(t.source, t.path, t.split) for name, t in d.tasks.items()}
    if not d.tasks and d.source == "jsonl" and d.train_path:
        trained["data.train_path"] = _data_identity("jsonl", d.train_path, "")
    for name, task in config.eval.tasks.items():
        validate_task(name, task, section="eval.tasks")
        key = f"eval.tasks.{name}"
        if task.metric not in EVAL_METRICS:
            raise UserError(f"config key '{key}.metric' is {task.metric!r}; expected one of {', '.join(EVAL_METRICS)}")
        if task.format == "chat" and task.metric != "preference":
            raise UserError(f"config key '{key}.format': chat records are not evaluated as a task; "
                            "use a fields/alpaca/self_instruct format")
        if task.metric == "preference" and config.objective.type == "sft":
            raise UserError(f"config key '{key}.metric' is 'preference': held-out pairs are scored by a preference "
                            "objective's loss and rewards; an SFT run evaluates generative, multiple_choice or "
                            "instructions tasks")
        if task.max_examples < 0:
            raise UserError(f"config key '{key}.max_examples' must be >= 0, got {task.max_examples}")
        if task.metric == "instructions" and (task.few_shot or task.cot):
            bad = "few_shot" if task.few_shot else "cot"
            raise UserError(f"config key '{key}.{bad}' is {task[bad]!r}: an 'instructions' task is scored zero-shot "
                            "on the response to its prompt alone (its records have no reference responses); "
                            f"set it to {0 if bad == 'few_shot' else False}")
        if name in d.tasks:
            raise UserError(f"config key '{key}': '{name}' is also a training task (data.tasks.{name}); "
                            "eval tasks must be held out")
        identity = _data_identity(task.source, task.path, task.split)
        for trained_name, trained_identity in trained.items():
            if identity == trained_identity:
                where = trained_name if trained_name == "data.train_path" else f"data.tasks.{trained_name}"
                raise UserError(f"config key '{key}.path': {task.path!r} is also trained on ({where}); "
                                "eval tasks must be held out")


def validate_for_devices(config: ml_collections.ConfigDict, mesh_shape: dict[str, int], process_count: int) -> None:
    """Batch checks that depend on the mesh: every device and every micro-batch gets whole rows."""
    dp = mesh_shape["data"] * mesh_shape["fsdp"]
    batch, accum = config.train.global_batch_size, config.train.grad_accum_steps
    if batch % accum:
        raise UserError(
            f"config key 'train.global_batch_size' ({batch}) is not divisible by train.grad_accum_steps ({accum})"
        )
    if (batch // accum) % dp:
        raise UserError(
            f"config key 'train.global_batch_size' ({batch}) / grad_accum_steps ({accum}) = {batch // accum} "
            f"is not divisible by the data-parallel size {dp} (mesh data={mesh_shape['data']} x fsdp={mesh_shape['fsdp']}); "
            f"use a multiple of {dp * accum}"
        )
    if batch % process_count:
        raise UserError(
            f"config key 'train.global_batch_size' ({batch}) is not divisible by the process count {process_count}"
        )
    shards = config.data.shards
    if shards and (shards % process_count or batch % shards):
        raise UserError(
            f"config key 'data.shards' ({shards}) must be a multiple of the process count {process_count} and "
            f"divide train.global_batch_size ({batch})"
        )


def validate_for_model(config: ml_collections.ConfigDict, max_positions: int) -> None:
    if config.data.seq_len > max_positions:
        raise UserError(
            f"config key 'data.seq_len' ({config.data.seq_len}) exceeds the model's max_position_embeddings "
            f"({max_positions}); lower data.seq_len or raise model.max_position_embeddings"
        )


def resolve_mesh_shape(config: ml_collections.ConfigDict, device_count: int, *, prefix: str = "",
                       what: str = "devices") -> dict[str, int]:
    """Fills the one -1 axis so the mesh covers all devices; errors when sizes don't multiply out.

    prefix="dcn_" resolves the across-slice sizes against the slice count (what="slices").
    """
    shape = {a: config.mesh[prefix + a] for a in ("data", "fsdp", "tensor")}
    keys = f"mesh.{prefix}data x mesh.{prefix}fsdp x mesh.{prefix}tensor"
    known = math.prod(v for v in shape.values() if v != -1)
    if any(v == -1 for v in shape.values()):
        if device_count % known:
            raise UserError(
                f"config keys {keys}: fixed axes multiply to {known}, which does not divide the {device_count} {what}"
            )
        for a, v in shape.items():
            if v == -1:
                shape[a] = device_count // known
    elif known != device_count:
        raise UserError(f"config keys {keys} = {known}, but there are {device_count} {what}; set one axis to -1 to fill")
    return shape


def resolve_hybrid_mesh_shape(config: ml_collections.ConfigDict, device_count: int,
                              num_slices: int) -> tuple[dict[str, int], dict[str, int]]:
    """(within-slice, across-slice) axis sizes; one slice gives across-slice sizes of 1."""
    if num_slices == 1:
        return resolve_mesh_shape(config, device_count), {a: 1 for a in ("data", "fsdp", "tensor")}
    ici = resolve_mesh_shape(config, device_count // num_slices, what="devices per slice")
    return ici, resolve_mesh_shape(config, num_slices, prefix="dcn_", what="slices")


def data_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """config.data, reading the HF dir's own tokenizer when model.hf_dir is set and data.tokenizer is not."""
    if not config.model.hf_dir or config.data.tokenizer:
        return config.data
    data_cfg = ml_collections.ConfigDict(config.data.to_dict())
    data_cfg.tokenizer = config.model.hf_dir  # load_tokenizer picks tokenizer.json, else tokenizer.model
    return data_cfg


def to_json_dict(config: ml_collections.ConfigDict) -> dict:
    """A JSON-safe plain dict (tuples become lists) for checkpoints and logs."""
    return _plain(config.to_dict())


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
