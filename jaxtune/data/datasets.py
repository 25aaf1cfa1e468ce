"""What an SFT run reads, from the `data` section of a config: tokenizer, records, templates, eval set."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from jaxtune.data import preference, templates as templates_lib
from jaxtune.data.builtin import quickstart
from jaxtune.data.pipeline import DEFAULT_TASK
from jaxtune.data.sources import JsonlSource
from jaxtune.data.tokenizers import Tokenizer, load_tokenizer, train_sentencepiece
from jaxtune.errors import UserError

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.model"
# Records rendered to train a from-scratch tokenizer on user JSONL data.
_TOKENIZER_SAMPLE = 20_000


@dataclasses.dataclass
class SftData:
    tokenizer: Tokenizer
    train_source: Sequence[dict]
    train_templates: Mapping[str, Sequence[templates_lib.Template]]
    # Generative evaluation (exact match): records + the templates they are rendered with.
    eval_records: Sequence[dict] = ()
    eval_templates: Mapping[str, Sequence[templates_lib.Template]] = dataclasses.field(default_factory=dict)


def _tokenizer(cfg: ml_collections.ConfigDict, workdir: Path, corpus) -> Tokenizer:
    """The configured tokenizer, or one trained on the data and cached in the workdir."""
    if cfg.tokenizer:
        path = Path(cfg.tokenizer)
        if not path.exists():  # a tokenizer file, or a directory holding one (HF model dirs)
            raise UserError(f"config key 'data.tokenizer': {path} does not exist")
        return load_tokenizer(path)
    cached = workdir / TOKENIZER_FILE
    if cached.is_file():
        return load_tokenizer(cached)
    log.info("training a %d-piece sentencepiece tokenizer into %s", cfg.tokenizer_vocab_size, cached)
    workdir.mkdir(parents=True, exist_ok=True)
    # Read the corpus before sentencepiece sees it, so a bad record raises our own error
    # (naming its file and line) instead of one wrapped inside the trainer.
    texts = list(corpus())
    return train_sentencepiece(texts, cached.with_suffix(""), vocab_size=cfg.tokenizer_vocab_size)


def _jsonl_corpus(source: JsonlSource, task_templates) -> Any:
    def corpus():
        for index in range(min(len(source), _TOKENIZER_SAMPLE)):
            record = source[index]
            fields = {k: v for k, v in record.items() if k not in ("task", "_where")}
            prompt, target = templates_lib.render_example(
                task_templates[DEFAULT_TASK], fields, seed=0, index=index, task=DEFAULT_TASK
            )
            yield prompt
            yield target

    return corpus


def load_sft_data(cfg: ml_collections.ConfigDict, workdir: str | Path, *, seed: int) -> SftData:
    workdir = Path(workdir)
    if cfg.source == "quickstart":
        tokenizer = _tokenizer(cfg, workdir, lambda: quickstart.tokenizer_corpus(seed=seed))
        return SftData(
            tokenizer=tokenizer,
            train_source=quickstart.generate_records(cfg.num_train_examples, seed=seed),
            train_templates=quickstart.templates("train"),
            # A different seed: held-out phrasings over (mostly) unseen inputs.
            eval_records=quickstart.generate_records(cfg.num_eval_examples, seed=seed + 1_000_003),
            eval_templates=quickstart.templates("heldout"),
        )
    task_templates = {DEFAULT_TASK: [tuple(t) for t in cfg.templates]}
    source = JsonlSource(cfg.train_path)
    tokenizer = _tokenizer(cfg, workdir, _jsonl_corpus(source, task_templates))
    data = SftData(tokenizer=tokenizer, train_source=source, train_templates=task_templates)
    if cfg.eval_path:
        eval_source = JsonlSource(cfg.eval_path)
        data.eval_records = [eval_source[i] for i in range(len(eval_source))]
        data.eval_templates = task_templates
    return data


@dataclasses.dataclass
class PreferenceData:
    tokenizer: Tokenizer
    train_source: Sequence[dict]
    train_templates: Mapping[str, Sequence[templates_lib.Template]]
    eval_records: Sequence[dict] = ()  # no generative eval for preference runs


def load_preference_data(cfg: ml_collections.ConfigDict, workdir: str | Path, *, unpaired: bool) -> PreferenceData:
    """Preference pairs (or unpaired KTO examples) from data.train_path, rendered with data.templates."""
    if cfg.source != "jsonl":
        raise UserError(f"config key 'data.source' is {cfg.source!r}; preference objectives read JSONL pairs (data.source='jsonl')")
    source = JsonlSource(cfg.train_path)
    tokenizer = _tokenizer(cfg, Path(workdir), preference.corpus(source, unpaired=unpaired, limit=_TOKENIZER_SAMPLE))
    return PreferenceData(tokenizer, source, {DEFAULT_TASK: [tuple(t) for t in cfg.templates]})
