"""Config checks that need the modules implementing the settings (data, models, objectives, peft).

jaxtune/config is the schema and the loader, a leaf every module may import; the checks here read
the choices each module owns (its value lists, template sets, reward names) and so sit above the
objectives and data. `load_config` = the leaf loader with the objective registry's sections + `validate`.
"""

from __future__ import annotations

import difflib
import os

import ml_collections

from jaxtune import config as config_lib
from jaxtune import loading, nonfinite, objectives, optim, paths, sharding
from jaxtune.config import EVAL_METRICS, eval_task_config, task_config
from jaxtune.data import examples, flan, formats, mixtures, pair_packing, pipeline, sources, tokenizers
from jaxtune.data.builtin import BUILTIN_DATASETS, clusters
from jaxtune.datatools.quality import QualityFilters
from jaxtune.datatools.screen import settings_from
from jaxtune.errors import UserError
from jaxtune.models import attention, layers
from jaxtune.peft import base as peft_base
from jaxtune.peft import wrapper as peft_wrapper


def load_config(spec: str, overrides=(), *, needs_data: bool = True, tasks=None) -> ml_collections.ConfigDict:
    """Loads `path.py[:arg]` with `KEY=VALUE` overrides (the objective's section selected), locked and validated.

    needs_data=False (`jaxtune plan`, which reads no data) accepts a config without data files.
    `tasks` ({name: task_config(...)}), when given, replaces data.tasks before the checks.
    """
    config = config_lib.load_config(spec, list(overrides), sections=objectives.base.config_sections())
    if tasks:
        with config.unlocked():
            config.data.tasks = {name: ml_collections.ConfigDict(task) for name, task in tasks.items()}
    validate(config, needs_data=needs_data)
    return config


def apply_overrides(config: ml_collections.ConfigDict, overrides) -> None:
    """`KEY=VALUE` strings onto a built config, as on the command line (objective.type first)."""
    config_lib.apply_overrides(config, list(overrides), objectives.base.config_sections())


def choices() -> dict[str, tuple[str, ...]]:
    """The keys with a fixed set of values; each list lives in the module that implements it."""
    return {
        "data.truncation": examples.TRUNCATION_POLICIES,
        "data.add_bos": tokenizers.ADD_BOS_CHOICES,
        "optim.schedule": optim.SCHEDULES,
        "mesh.rules": tuple(sharding.PRESETS),
        "model.remat_policy": tuple(layers.REMAT_POLICIES),
        "model.attention": attention.IMPLEMENTATIONS,
        "model.layer_loop": layers.LAYER_LOOPS,
        "model.dtype": layers.COMPUTE_DTYPES,
        "model.param_dtype": layers.PARAM_DTYPES,
        "data.on_error": examples.ON_ERROR_POLICIES,
        "data.source_kind": sources.SOURCE_KINDS,
        "data.format": formats.FORMATS,
        "data.packing_strategy": pipeline.PACKING_STRATEGIES,
        "data.pair_batching": pair_packing.BATCHINGS,
        "data.mixture.mode": mixtures.MODES,
        "train.nonfinite": nonfinite.POLICIES,
    }


def task_choices() -> dict[str, tuple[str, ...]]:
    """data.tasks / eval.tasks keys with a fixed set of values (owned by the data modules)."""
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
        raise UserError(f"config key '{key}.path' is empty; expected a data file (or the TFDS dataset name, or a 🤗 dataset id or folder)")
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
        QualityFilters.from_dict(task.filters, f"{key}.filters")


def validate(config: ml_collections.ConfigDict, *, needs_data: bool = True) -> None:
    """Rejects impossible values before any compile; the message names the key and the fix.

    Selects the objective first (objective.type's section, with its defaults; idempotent)."""
    objectives.base.select(config)
    for key, allowed in choices().items():
        value = config
        for part in key.split("."):
            value = value[part]
        if value not in allowed:
            raise UserError(f"config key '{key}' is {value!r}; expected one of {', '.join(allowed)}")
    if config.data.builtin not in ("", *BUILTIN_DATASETS):
        raise UserError(f"config key 'data.builtin' is {config.data.builtin!r}; expected '' (read data.train_path or "
                        f"data.tasks) or one of {', '.join(BUILTIN_DATASETS)}")
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
    if config.data.builtin == "clusters":
        try:
            clusters.check_clusters(config.data.clusters)
        except ValueError as e:
            raise UserError(str(e)) from None
    if config.data.templates_per_task < 0:
        raise UserError(f"config key 'data.templates_per_task' must be >= 0 (0 = all), got {config.data.templates_per_task}")
    if config.data.packing_bins < 0:
        raise UserError(f"config key 'data.packing_bins' must be >= 0, got {config.data.packing_bins}")
    if config.data.max_pairs_per_row < 1:
        raise UserError(f"config key 'data.max_pairs_per_row' must be >= 1, got {config.data.max_pairs_per_row}")
    single_jsonl = not config.data.builtin and not config.data.tasks
    if needs_data and single_jsonl and not config.data.train_path:
        raise UserError("config key 'data.train_path' is empty; expected a JSONL file (or a 🤗 dataset with "
                        "data.source_kind='hf', or data.tasks, or a built-in "
                        f"dataset: data.builtin one of {', '.join(BUILTIN_DATASETS)})")
    if single_jsonl and not config.data.templates:
        raise UserError("config key 'data.templates' is empty; expected (input_pattern, target_pattern) pairs")
    _validate_eval(config.eval)
    _validate_eval_tasks(config)
    if config.model.hf_dir and config.model.init_from:
        raise UserError("config keys 'model.hf_dir' and 'model.init_from' are both set; pick one starting point")
    if config.peft.method != "none" and config.model.init_from:
        raise UserError("config key 'model.init_from' is not supported with LoRA yet; export the SFT model "
                        "(jaxtune export) and start from it with model.hf_dir")
    objectives.base.validate(config)  # each objective checks its own section
    for prefix in ("", "dcn_"):
        for axis in ("data", "fsdp", "tensor"):
            size = config.mesh[prefix + axis]
            if size == 0 or size < -1:
                raise UserError(f"config key 'mesh.{prefix}{axis}' must be a positive size or -1, got {size}")
        if sum(config.mesh[prefix + a] == -1 for a in ("data", "fsdp", "tensor")) > 1:
            raise UserError(f"config keys mesh.{prefix}data/{prefix}fsdp/{prefix}tensor: at most one axis may be -1")
    # peft.targets name the model's projections (T5: q, k, v, o, wi / wi_0, wi_1, wo); a Hub model not
    # pinned yet accepts any family's names here and is checked when the run loads it (loading.peft_spec).
    projections = loading.projection_names(config, resolve_hub=False) if config.peft.method != "none" else None
    spec = peft_base.spec_from_config(config.peft, projections or tuple(layers.PROJECTION_NAMES))
    encoder_decoder = loading.encoder_decoder_family(config, resolve_hub=False)
    if spec is not None and encoder_decoder:
        peft_wrapper.check_model_kind(spec, True, encoder_decoder.removesuffix(", which"))


def _validate_decontaminate(config: ml_collections.ConfigDict) -> None:
    d = config.data.decontaminate
    settings_from(d)  # n, fraction
    for key in ("fields", "eval_fields", "eval_files", "eval_tfds"):
        if not isinstance(d[key], (tuple, list)) or not all(isinstance(v, str) and v for v in d[key]):
            raise UserError(f"config key 'data.decontaminate.{key}' must be a tuple of non-empty strings, got {d[key]!r}")
    screened = d.enabled or any(t.get("filters") for t in config.data.tasks.values())
    if screened and objectives.base.canonical(config.objective.type) == "grpo":
        raise UserError("config keys 'data.decontaminate' / 'data.tasks.<t>.filters': a GRPO run reads its prompts "
                        "itself (objective.grpo); clean them first with `jaxtune data decontaminate` / `jaxtune data filter`")
    if d.enabled and not config.data.tasks and config.data.builtin:
        raise UserError(f"config key 'data.decontaminate.enabled': data.builtin={config.data.builtin!r} generates its "
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
    """What makes two task sources the same data: a TFDS name or 🤗 dataset id + split, or a file path."""
    if source == "tfds" or (source == "hf" and not os.path.exists(os.path.expanduser(path))):
        return source, path, split
    if source == "hf":  # a local dataset folder: its path + split
        return source, os.path.abspath(os.path.expanduser(path)), split
    return "file", path if "://" in path else os.path.abspath(os.path.expanduser(path)), ""


def _validate_eval_tasks(config: ml_collections.ConfigDict) -> None:
    """eval.tasks entries are held out: no name or data source may be a training task's."""
    d = config.data
    trained = {name: _data_identity(t.source, t.path, t.split) for name, t in d.tasks.items()}
    if not d.tasks and not d.builtin and d.train_path:
        trained["data.train_path"] = _data_identity(d.source_kind, d.train_path, d.split)
    for name, task in config.eval.tasks.items():
        validate_task(name, task, section="eval.tasks")
        key = f"eval.tasks.{name}"
        if task.metric not in EVAL_METRICS:
            raise UserError(f"config key '{key}.metric' is {task.metric!r}; expected one of {', '.join(EVAL_METRICS)}")
        if task.format == "chat" and task.metric != "preference":
            raise UserError(f"config key '{key}.format': chat records are not evaluated as a task; "
                            "use a fields/alpaca/self_instruct format")
        if task.metric == "preference" and objectives.base.canonical(config.objective.type) == "sft":
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


def validate_for_model(config: ml_collections.ConfigDict, max_positions: int | None) -> None:
    """data.seq_len against the model's position limit (None: relative positions, no limit)."""
    if max_positions is not None and config.data.seq_len > max_positions:
        raise UserError(
            f"config key 'data.seq_len' ({config.data.seq_len}) exceeds the model's max_position_embeddings "
            f"({max_positions}); lower data.seq_len or raise model.max_position_embeddings"
        )


