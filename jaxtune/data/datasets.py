"""What a run reads, from the `data` section of a config: tokenizer, tasks and their mixture, eval set.

`data.tasks` (several tasks, each a `task_config`) or the single-task keys (`data.train_path` +
`data.templates`, or the quickstart) become `TaskSpec`s (SFT) or `PairTask`s (preference pairs and
KTO records): an opened source with its field mapping and record format, a resolved template set
or chat template, and the task's policies. Both kinds are mixed with the same `data.mixture` and
batched on the same Grain skeleton (pipeline.record_stream + sharded_batches).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import ml_collections

from jaxtune import distributed, paths
from jaxtune.workdir import TOKENIZER_FILE
from jaxtune.data import chat as chat_lib
from jaxtune.data import preference
from jaxtune.data import templates as templates_lib
from jaxtune.data.builtin import quickstart
from jaxtune.data.examples import DEFAULT_TASK, ExampleBuilder, TaskSpec
from jaxtune.data.flan import FlanSpec
from jaxtune.data.formats import DEFAULT_TEMPLATE, TaskRecords
from jaxtune.data.mixtures import Mixture, mixture_rates
from jaxtune.data.sources import open_task_source
from jaxtune.data.template_library import load_template_set
from jaxtune.data.tokenizers import Tokenizer, load_tokenizer, train_sentencepiece
from jaxtune.errors import UserError

log = logging.getLogger(__name__)

# Records rendered to train a from-scratch tokenizer on user JSONL data.
_TOKENIZER_SAMPLE = 20_000


@dataclasses.dataclass
class SftData:
    tokenizer: Tokenizer
    tasks: list[TaskSpec]
    mixture: Mixture
    # Generative evaluation (exact match): records + the templates they are rendered with.
    eval_records: Sequence[dict] = ()
    eval_templates: Mapping[str, Sequence[templates_lib.Template]] = dataclasses.field(default_factory=dict)


def run_tokenizer(cfg: ml_collections.ConfigDict, workdir: Path, corpus) -> Tokenizer:
    """`cfg.tokenizer` (resolved from the config by loading.data_settings), or one trained on the
    data (`corpus()`, texts) and cached in the workdir."""
    if cfg.tokenizer:
        path = paths.path(cfg.tokenizer)
        if not path.exists():  # a tokenizer file, or a directory holding one (HF model dirs)
            raise UserError(f"config key 'data.tokenizer': {path} does not exist")
        return load_tokenizer(path, add_bos=cfg.get("add_bos", "auto"))
    cached = workdir / TOKENIZER_FILE

    def train_once():
        if cached.is_file():
            return
        log.info("training a %d-piece sentencepiece tokenizer into %s", cfg.tokenizer_vocab_size, cached)
        workdir.mkdir(parents=True, exist_ok=True)
        # Read the corpus before sentencepiece sees it, so a bad record raises our own error
        # (naming its file and line) instead of one wrapped inside the trainer.
        texts = list(corpus())
        train_sentencepiece(texts, cached.with_suffix(""), vocab_size=cfg.tokenizer_vocab_size)

    # Multi-process: process 0 trains it into the (shared) workdir, the others wait and load it.
    distributed.on_first_process(train_once, "tokenizer")
    return load_tokenizer(cached, add_bos=cfg.get("add_bos", "auto"))


def _tasks_corpus(tasks: Sequence[TaskSpec], seed: int) -> Any:
    """Rendered text of the first records of every task (tokenizer training); bad records are left out."""

    def corpus():
        per_task = max(1, _TOKENIZER_SAMPLE // len(tasks))
        for i, task in enumerate(tasks):
            builder = ExampleBuilder(task, i, None, seq_len=0, seed=seed)
            for index in range(min(len(task.records), per_task)):
                record = task.records[index]
                if "_error" not in record:
                    yield from builder.texts(record, index)

    return corpus


def single_set(cfg: ml_collections.ConfigDict, which: str = "train") -> Sequence[dict]:
    """data.train_path or data.eval_path (`which`: "train" | "eval"), read as data.source_kind says: a JSONL
    file by default, or a 🤗 dataset (data.name, data.split / data.eval_split, data.revision)."""
    task = _single_task(cfg) if which == "train" else cfg.eval_task
    return open_task_source(task, where=f"data.{which}_path")


def _single_task(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The single-task keys (data.train_path + data.templates) as a task config: `cfg.default_task`,
    which the settings come with (loading.data_settings builds it with the config schema)."""
    if "default_task" not in cfg:
        raise ValueError("data settings without 'default_task': pass loading.data_settings(config), not config.data")
    return cfg.default_task


def has_own_templates(t: ml_collections.ConfigDict) -> bool:
    """Whether a task names templates other than the default ("{prompt}", "{response}"): then `auto`
    reads its records as fields for those templates instead of detecting their shape."""
    return isinstance(t.templates, str) or [tuple(x) for x in t.templates] != [DEFAULT_TEMPLATE]


def task_spec(name: str, t: ml_collections.ConfigDict, *, tokenizer_chat_template: str | None = None,
              where: str = "", screen: Callable | None = None) -> TaskSpec:
    """Opens a task's source and resolves its templates (errors name `where`, default `data.tasks.<name>`).
    `screen(name, t, source)` (a `Screen`, below) narrows the source first."""
    where = where or f"data.tasks.{name}"
    source = open_task_source(t, where)
    if screen is not None:
        source = screen(name, t, source)
    records = TaskRecords(source, fmt=t.format, fields=dict(t.fields), on_error=t.on_error, task=name,
                          templated=has_own_templates(t))
    common = dict(few_shot=t.few_shot, few_shot_separator=t.few_shot_separator,
                  few_shot_target_separator=t.few_shot_target_separator, few_shot_max_tokens=t.few_shot_max_tokens,
                  truncation=t.truncation, on_error=t.on_error)
    if records.chat:
        template = t.chat_template or tokenizer_chat_template
        if not template:
            raise UserError(f"config key '{where}.chat_template' is empty and the tokenizer has no chat_template; "
                            f"set it to a built-in name ({', '.join(chat_lib.BUILTIN_TEMPLATES)}) or a jinja string")
        try:
            chat_lib.check_template(template)
        except UserError as e:
            raise UserError(f"config key '{where}.chat_template': {e}") from None
        return TaskSpec(name, records, chat_template=chat_lib.resolve_template(template), **common)
    inversion = tuple(load_template_set(t.inversion_templates, where=f"{where}.inversion_templates")) if t.inversion_templates else ()
    spec = FlanSpec(
        templates=tuple(load_template_set(t.templates, where=f"{where}.templates")),
        options_style=t.options_style, options_field=t.options_field, answer_field=t.answer_field,
        cot=t.cot, cot_pattern=t.cot_pattern, cot_instruction=t.cot_instruction,
        inversion=t.inversion, inversion_templates=inversion, word_dropout=t.word_dropout,
    )
    return TaskSpec(name, records, flan={DEFAULT_TASK: spec}, **common)


def _mixture(cfg: ml_collections.ConfigDict, tasks: Sequence[TaskSpec], task_cfgs: Sequence) -> Mixture:
    return mixture_rates(
        [t.name for t in tasks], [len(t.records) for t in tasks], mode=cfg.mixture.mode,
        weights=[c.weight for c in task_cfgs], caps=[c.cap or cfg.mixture.cap for c in task_cfgs],
        temperature=cfg.mixture.temperature,
    )


class Screen(Protocol):
    """What narrows a task's records before training (filters, decontamination: datatools.screen.Screen,
    built by the layer above and passed in, so this module needs neither the config nor the data tools)."""

    def __call__(self, name: str, task: ml_collections.ConfigDict, source: Sequence[dict]) -> Sequence[dict]:
        """The records of `source` (task `name`, its settings `task`) to train on."""

    def finish(self, workdir: str | Path | None) -> None:
        """Called once every task is screened: reports what was dropped."""


def load_sft_data(cfg: ml_collections.ConfigDict, workdir: str | Path, *, seed: int,
                  screen: Screen | None = None) -> SftData:
    """An SFT run's tokenizer, tasks (narrowed by `screen` when given), mixture and held-out records.
    `cfg` is the data settings of `loading.data_settings(config)`; `cfg.seq2seq` (an encoder-decoder
    model) makes every task's examples encoder-decoder ones (prompt -> encoder, target -> decoder)."""
    data = _load_sft_data(cfg, workdir, seed=seed, screen=screen)
    if cfg.get("seq2seq", False):
        data.tasks = [dataclasses.replace(task, seq2seq=True) for task in data.tasks]
        check_first_records(data, seq_len=cfg.seq_len, seed=seed, limit=100)
    return data


def _load_sft_data(cfg: ml_collections.ConfigDict, workdir: str | Path, *, seed: int,
                   screen: Screen | None = None) -> SftData:
    workdir = paths.path(workdir)
    if cfg.builtin == "quickstart" and not cfg.tasks:
        tokenizer = run_tokenizer(cfg, workdir, lambda: quickstart.tokenizer_corpus(seed=seed))
        flan = {name: FlanSpec(tuple(t), word_dropout=cfg.word_dropout) for name, t in quickstart.templates("train").items()}
        task = TaskSpec(DEFAULT_TASK, quickstart.generate_records(cfg.num_train_examples, seed=seed), flan=flan,
                        truncation=cfg.truncation, on_error=cfg.on_error)
        return SftData(
            tokenizer=tokenizer, tasks=[task], mixture=mixture_rates([task.name], [len(task.records)]),
            # A different seed: held-out phrasings over (mostly) unseen inputs.
            eval_records=quickstart.generate_records(cfg.num_eval_examples, seed=seed + 1_000_003),
            eval_templates=quickstart.templates("heldout"),
        )
    if cfg.builtin == "verifiable" and not cfg.tasks:
        return _verifiable_sft_data(cfg, workdir, seed=seed)
    if cfg.builtin == "clusters" and not cfg.tasks:
        return _clusters_sft_data(cfg, workdir, seed=seed)
    task_cfgs = dict(cfg.tasks.items()) if cfg.tasks else {DEFAULT_TASK: _single_task(cfg)}
    given = run_tokenizer(cfg, workdir, None) if cfg.tokenizer and paths.path(cfg.tokenizer).exists() else None
    tasks = [task_spec(name, t, tokenizer_chat_template=cfg.chat_template or getattr(given, "chat_template", None),
                       where="" if cfg.tasks else "data", screen=screen)  # errors name the keys the user set
             for name, t in task_cfgs.items()]
    if screen is not None:
        screen.finish(workdir)
    tokenizer = given or run_tokenizer(cfg, workdir, _tasks_corpus(tasks, seed))
    data = SftData(tokenizer=tokenizer, tasks=tasks, mixture=_mixture(cfg, tasks, list(task_cfgs.values())))
    if cfg.eval_path and not cfg.tasks:
        eval_records = TaskRecords(single_set(cfg, "eval"), fmt=cfg.eval_task.format, task="data.eval_path",
                                   templated=has_own_templates(cfg.eval_task))
        data.eval_records = [eval_records[i] for i in range(len(eval_records))]
        data.eval_templates = {DEFAULT_TASK: [tuple(t) for t in cfg.templates]}
    check_first_records(data, seq_len=cfg.seq_len, seed=seed)
    return data


def _verifiable_sft_data(cfg: ml_collections.ConfigDict, workdir: Path, *, seed: int) -> SftData:
    """The built-in verifiable problems (builtin/verifiable.py) with their worked solutions, rendered
    with data.templates: the SFT warm start of a GRPO run; evaluated on the held-out problems."""
    from jaxtune.data.builtin import verifiable

    steps = {"min_steps": cfg.verifiable_min_steps, "max_steps": cfg.verifiable_max_steps}
    tokenizer = run_tokenizer(cfg, workdir, lambda: verifiable.tokenizer_corpus(seed=seed, **steps))
    templates = [tuple(t) for t in cfg.templates]
    families = verifiable.check_families(cfg.verifiable_families)
    task = TaskSpec(DEFAULT_TASK, verifiable.generate_records(cfg.num_train_examples, split="train", seed=seed,
                                                              families=families, **steps),
                    flan={DEFAULT_TASK: FlanSpec(tuple(templates), word_dropout=cfg.word_dropout)},
                    truncation=cfg.truncation, on_error=cfg.on_error)
    return SftData(tokenizer=tokenizer, tasks=[task], mixture=mixture_rates([task.name], [len(task.records)]),
                   eval_records=verifiable.generate_records(cfg.num_eval_examples, split="heldout", seed=seed,
                                                            families=families, **steps),
                   eval_templates={family: templates for family in families})  # eval rows keep their "task"


def _clusters_sft_data(cfg: ml_collections.ConfigDict, workdir: Path, *, seed: int) -> SftData:
    """The built-in task clusters (builtin/clusters.py): one task per training cluster, mixed
    examples-proportionally (data.mixture) as FLAN mixes its tasks, each family phrased with
    data.templates_per_task training templates; evaluated on held-out phrasings of the trained
    families and on every family of the held-out clusters (eval rows keep their family as "task")."""
    from jaxtune.data.builtin import clusters

    try:
        names = clusters.check_clusters(cfg.clusters)
    except ValueError as e:
        raise UserError(str(e)) from None
    tokenizer = run_tokenizer(cfg, workdir, lambda: clusters.tokenizer_corpus(seed=seed))
    per_family = max(cfg.num_train_examples // sum(len(clusters.CLUSTERS[c]) for c in names), 1)
    tasks = []
    for i, name in enumerate(names):
        families = clusters.CLUSTERS[name]
        flan = {f: FlanSpec(tuple(clusters.train_templates(f, cfg.templates_per_task)), word_dropout=cfg.word_dropout)
                for f in families}
        records = clusters.generate_records(families, per_family * len(families), seed=seed + i)
        tasks.append(TaskSpec(name, records, flan=flan, truncation=cfg.truncation, on_error=cfg.on_error))
    mixture = mixture_rates(names, [len(t.records) for t in tasks], mode=cfg.mixture.mode,
                            caps=[cfg.mixture.cap] * len(tasks), temperature=cfg.mixture.temperature)
    families = clusters.eval_families(names)
    return SftData(tokenizer=tokenizer, tasks=tasks, mixture=mixture,
                   eval_records=clusters.generate_records(families, cfg.num_eval_examples, seed=seed + 1_000_003),
                   eval_templates={f: clusters.eval_templates(f) for f in families})


# Records per task rendered and tokenized before a run starts (see check_first_records).
CHECK_RECORDS = 1000


def check_first_records(data: SftData, *, seq_len: int, seed: int, limit: int = CHECK_RECORDS) -> None:
    """Renders and tokenizes each task's first `limit` records exactly as training will, so a messy
    file, a template that does not fit the records or a chat template that fails on them stops the run
    before the model is built and compiled (and before anything is written to the workdir). Tasks
    with on_error='skip' are left to the pipeline, which counts what it skips. Later records are
    still checked as they are read, with the same errors."""
    for i, task in enumerate(data.tasks):
        if task.on_error == "skip":
            continue
        builder = ExampleBuilder(task, i, data.tokenizer, seq_len=seq_len, seed=seed)
        for index in range(min(len(task.records), limit)):
            record = task.records[index]
            try:
                builder(index, record)
            except UserError as e:
                where = str(record.get("_where", ""))
                if where and where not in str(e):
                    label = "" if f"task {task.name!r}" in str(e) else f" (task {task.name!r})"
                    raise UserError(f"{where}{label}: {e}") from None
                raise


def train_dataset(data: SftData, cfg: ml_collections.ConfigDict, *, batch_size: int, seed: int, process_index: int = 0,
                  process_count: int = 1, collect_lengths: bool = False):
    """The batch stream of `data` with the `data` section's packing/reading settings (see pipeline.build_dataset)."""
    from jaxtune.data.pipeline import build_dataset

    return build_dataset(
        data.tasks, data.tokenizer, rates=data.mixture.rates, seq_len=cfg.seq_len, batch_size=batch_size, seed=seed,
        packing=cfg.packing, packing_strategy=cfg.packing_strategy, packing_bins=cfg.packing_bins,
        shuffle=cfg.shuffle, process_index=process_index, process_count=process_count,
        worker_count=cfg.worker_count, read_threads=cfg.read_threads, prefetch=cfg.prefetch,
        collect_lengths=collect_lengths, shards=cfg.shards,
    )


@dataclasses.dataclass
class PairTask:
    """One source of preference pairs (or KTO records): field-mapped records, how they are rendered
    (a FLAN template set; chat records: a chat template) and the task's policies."""

    name: str
    records: Sequence[dict]
    templates: Mapping[str, Sequence[templates_lib.Template]]
    chat_template: str | None = None  # jinja text for chat records: the task's, data.chat_template, the tokenizer's
    truncation: str = "truncate"
    on_error: str = "error"


@dataclasses.dataclass
class PreferenceData:
    """What a pair-shaped run reads: tokenizer, training tasks and their mixture, held-out pair sets."""

    tokenizer: Tokenizer
    tasks: list[PairTask]
    mixture: Mixture
    eval_tasks: list[PairTask] = dataclasses.field(default_factory=list)  # data.eval_path, eval.tasks (metric=preference)
    eval_records: Sequence[dict] = ()  # no generative eval for preference runs
    seq2seq: bool = False  # an encoder-decoder model: prompts feed the encoder, completions the decoder

    # The single-source view (reference precompute, older callers): the first task.
    @property
    def train_source(self) -> Sequence[dict]:
        return self.tasks[0].records

    @property
    def train_templates(self) -> Mapping[str, Sequence[templates_lib.Template]]:
        return self.tasks[0].templates

    @property
    def chat_template(self) -> str | None:
        return self.tasks[0].chat_template


# Pair records hold prompt/chosen/rejected (or KTO's prompt/completion/label), text or chat messages, with an
# explicit or implicit prompt: TRL's (unpaired) preference formats, detected per record in any of these.
PAIR_FORMATS = ("auto", "fields", "chat")


def _pair_task(name: str, t: ml_collections.ConfigDict, *, default_chat_template: str | None, where: str,
               screen: Callable | None = None) -> PairTask:
    """A data.tasks / eval.tasks entry as a pair task: its source with the field mapping, templates, chat template."""
    if t.format not in PAIR_FORMATS:
        raise UserError(f"config key '{where}.format' is {t.format!r}; preference and KTO records are read with "
                        f"format 'auto' (TRL's preference formats: text or chat messages in prompt/chosen/rejected or "
                        "prompt/completion/label), 'fields' or 'chat'")
    source = open_task_source(t, where)
    if screen is not None:
        source = screen(name, t, source)
    records = TaskRecords(source, fmt="fields", fields=dict(t.fields), on_error=t.on_error, task=name)
    chat_template = default_chat_template
    if t.chat_template:
        try:
            chat_template = chat_lib.resolve_template(t.chat_template)
        except UserError as e:
            raise UserError(f"config key '{where}.chat_template': {e}") from None
    templates = {DEFAULT_TASK: [tuple(x) for x in load_template_set(t.templates, where=f"{where}.templates")]}
    return PairTask(name, records, templates, chat_template, truncation=t.truncation, on_error=t.on_error)


def preference_eval_tasks(cfg: ml_collections.ConfigDict, eval_cfg: ml_collections.ConfigDict | None, *,
                          chat_template: str | None) -> list[PairTask]:
    """Held-out pairs: data.eval_path (rendered like data.train_path) and eval.tasks with metric='preference'."""
    tasks = []
    if cfg.eval_path:
        tasks.append(PairTask(DEFAULT_TASK, single_set(cfg, "eval"), {DEFAULT_TASK: [tuple(t) for t in cfg.templates]},
                              chat_template, truncation=cfg.truncation))
    for name, t in (eval_cfg.tasks.items() if eval_cfg is not None else ()):
        if t.metric == "preference":
            tasks.append(_pair_task(name, t, default_chat_template=chat_template, where=f"eval.tasks.{name}"))
    return tasks


def load_preference_data(cfg: ml_collections.ConfigDict, workdir: str | Path, *, unpaired: bool,
                         eval_cfg: ml_collections.ConfigDict | None = None, screen: Screen | None = None
                         ) -> PreferenceData:
    """Preference pairs (or unpaired KTO examples) from data.tasks (mixed like SFT tasks: caps, weights,
    temperature) or data.train_path with data.templates; chat records are rendered with the task's
    chat_template, else data.chat_template, else the tokenizer's. Held-out pairs come from
    data.eval_path and the eval.tasks whose metric is 'preference'."""
    if cfg.builtin and not cfg.tasks:
        raise UserError(f"config key 'data.builtin' is {cfg.builtin!r}; preference objectives read JSONL pairs "
                        "(data.train_path, with data.builtin='') or data.tasks")
    configured = chat_lib.resolve_template(cfg.chat_template) if cfg.chat_template else None
    given = run_tokenizer(cfg, paths.path(workdir), None) if cfg.tokenizer else None  # read before the tasks (chat template)
    default_chat = configured or getattr(given, "chat_template", None)
    if cfg.tasks:
        task_cfgs = list(cfg.tasks.items())
        tasks = [_pair_task(name, t, default_chat_template=default_chat, where=f"data.tasks.{name}", screen=screen)
                 for name, t in task_cfgs]
        mixture = _mixture(cfg, tasks, [t for _, t in task_cfgs])
    else:
        source = single_set(cfg, "train")
        if screen is not None:
            source = screen(DEFAULT_TASK, _single_task(cfg), source)
        tasks = [PairTask(DEFAULT_TASK, source, {DEFAULT_TASK: [tuple(t) for t in cfg.templates]},
                          default_chat, truncation=cfg.truncation)]
        mixture = mixture_rates([DEFAULT_TASK], [len(tasks[0].records)])
    if screen is not None:
        screen.finish(workdir)

    def corpus():
        per_task = max(1, _TOKENIZER_SAMPLE // len(tasks))
        for task in tasks:
            yield from preference.corpus(task.records, unpaired=unpaired, limit=per_task,
                                         chat_template=task.chat_template or configured)()

    tokenizer = given or run_tokenizer(cfg, paths.path(workdir), corpus)
    if given is None:  # a tokenizer read from the workdir or trained here may bring its own chat template
        own = getattr(tokenizer, "chat_template", None)
        for task in tasks:
            task.chat_template = task.chat_template or own
        default_chat = default_chat or own
    return PreferenceData(tokenizer, tasks, mixture,
                          eval_tasks=preference_eval_tasks(cfg, eval_cfg, chat_template=default_chat),
                          seq2seq=bool(cfg.get("seq2seq", False)))


def pair_transforms(data: PreferenceData, tasks: Sequence[PairTask], cfg: ml_collections.ConfigDict, *, seed: int,
                    unpaired: bool, with_reference: bool = False) -> list[preference.PreferenceTransform]:
    """One transform per task: its templates / chat template and truncation, data.seq_len."""
    return [preference.PreferenceTransform(
        task.records, task.templates, data.tokenizer, seq_len=cfg.seq_len, truncation=task.truncation, seed=seed,
        unpaired=unpaired, chat_template=task.chat_template, with_reference=with_reference, seq2seq=data.seq2seq)
        for task in tasks]


@dataclasses.dataclass
class PairStats:
    """A pair run's data bookkeeping: the per-task transforms (precomputed reference log-probs attach
    to them) and the pipeline's counts (per task; packing efficiency)."""

    transforms: list[preference.PreferenceTransform]
    pipeline: Any

    @property
    def transform(self) -> preference.PreferenceTransform:
        return self.transforms[0]

    def report(self) -> list[str]:
        return self.pipeline.report()


def preference_train_dataset(data: PreferenceData, cfg: ml_collections.ConfigDict, *, batch_size: int, seed: int,
                             unpaired: bool, process_index: int = 0, process_count: int = 1,
                             precomputed_reference: bool = False, wrap: Callable | None = None,
                             packing: bool | None = None):
    """(batches, PairStats): the tasks mixed at the mixture's rates, padded [B, 2, T] pairs or, with
    data.packing, packed rows (data/pair_packing.py); the `data` section's reading settings.
    `precomputed_reference`: batches carry reference log-probs, attached to the transforms
    (`PairStats.transform.ref_logps`) before the iterator is first read. `wrap(transform, task)`
    turns each task's pair transform into the objective's own (e.g. a reward model's whole-sequence
    rows); `packing` overrides data.packing (False: an objective that cannot pack)."""
    transforms = pair_transforms(data, data.tasks, cfg, seed=seed, unpaired=unpaired,
                                 with_reference=precomputed_reference)
    if wrap is not None:
        transforms = [wrap(t, task) for t, task in zip(transforms, data.tasks)]
    packing = cfg.packing if packing is None else packing
    it, stats = preference.pair_dataset(
        [t.records for t in data.tasks], transforms, names=[t.name for t in data.tasks],
        on_error=[t.on_error for t in data.tasks], rates=data.mixture.rates, batch_size=batch_size, seed=seed,
        shuffle=cfg.shuffle, packing=packing, max_pairs=cfg.max_pairs_per_row,
        packing_strategy=cfg.packing_strategy, packing_bins=cfg.packing_bins, pair_batching=cfg.pair_batching,
        shards=cfg.shards, process_index=process_index, process_count=process_count, worker_count=cfg.worker_count,
        read_threads=cfg.read_threads, prefetch=cfg.prefetch)
    return it, PairStats(transforms, stats)


@dataclasses.dataclass
class PairEvalSet:
    """Held-out pairs, rendered and tokenized as training pairs (padded [N, 2, T], source order)."""

    name: str  # "" for data.eval_path (metrics eval/loss, eval/rewards/...), the task name for eval.tasks
    arrays: dict[str, Any]
    dropped: int = 0  # pairs the truncation policy removed


def preference_eval_sets(data: PreferenceData, cfg: ml_collections.ConfigDict, eval_cfg: ml_collections.ConfigDict | None,
                         *, seed: int, unpaired: bool) -> list[PairEvalSet]:
    """data.eval_path and eval.tasks (metric='preference'), each as one PairEvalSet (its first
    `max_examples` records for an eval task; 0 = all)."""
    import numpy as np

    limits = {name: t.max_examples for name, t in (eval_cfg.tasks.items() if eval_cfg is not None else ())}
    out = []
    for task, transform in zip(data.eval_tasks, pair_transforms(data, data.eval_tasks, cfg, seed=seed, unpaired=unpaired)):
        keys = preference.batch_keys(transform)
        count = len(task.records) if not limits.get(task.name) else min(limits[task.name], len(task.records))
        rows = [transform(i, {**task.records[i], "_index": i}) for i in range(count)]
        kept = [r for r in rows if r is not None]
        where = "data.eval_path" if task.name == DEFAULT_TASK else f"eval.tasks.{task.name}"
        if not kept:
            raise UserError(f"config key '{where}': no pair fits data.seq_len={cfg.seq_len} (all {count} dropped)")
        arrays = {k: np.stack([r[k] for r in kept]) for k in keys}
        out.append(PairEvalSet("" if task.name == DEFAULT_TASK else task.name, arrays, dropped=len(rows) - len(kept)))
    return out
