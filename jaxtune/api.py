"""The Python API: what notebooks and scripts call instead of the `jaxtune` command.

    import jaxtune
    config = jaxtune.load_config("configs/quickstart.py", {"train.steps": 100})
    summary = jaxtune.train(config, "runs/qs", on_metrics=print)   # each logged row, as it is written
    rows = jaxtune.read_metrics("runs/qs")                         # metrics.jsonl as a list of dicts
    model = jaxtune.load("runs/qs")                                # the latest checkpoint
    model.generate(["Give it in uppercase: cat"])
    rewards = jaxtune.reward_fn("runs/rm")                         # a reward model: rewards(prompts, completions)

Every function takes the same paths as the CLI (local or `gs://...`) and raises
`jaxtune.errors.UserError` for the mistakes the CLI reports as `jaxtune: error: ...`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections

from jaxtune import validation
from jaxtune.errors import UserError

MetricsCallback = Callable[[dict], None]


def load_config(spec: str, overrides: Mapping[str, Any] | Sequence[str] = (), *,
                tasks: Mapping[str, ml_collections.ConfigDict] | None = None) -> ml_collections.ConfigDict:
    """`path/to/config.py[:arg]` with overrides, locked and validated exactly as `--config.KEY=VALUE` does.

    `overrides` is a dict {"train.steps": 100, "optim.lr": 1e-3} (values are converted like
    command-line strings, so a typo'd key names the closest valid one) or a list of "KEY=VALUE".
    `tasks` ({name: jaxtune.config.task_config(...)}, e.g. a Hub dataset) replaces data.tasks.
    """
    if isinstance(overrides, Mapping):
        overrides = [f"{key}={_as_text(value)}" for key, value in overrides.items()]
    return validation.load_config(str(spec), list(overrides), tasks=tasks)


def _as_text(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return repr(tuple(value))
    return str(value)


def train(config: ml_collections.ConfigDict, workdir: str, *, on_metrics: MetricsCallback | None = None):
    """Trains (or resumes) `config` in `workdir`, like `jaxtune train`; returns the run's `RunSummary`
    (steps, wall/train seconds, tokens/s, last logged metrics, held-out eval before/after).

    `on_metrics(row)` receives every row as it is appended to `metrics.jsonl` (train rows: "step",
    "loss", "lr", ...; evaluation rows: "step" and "eval/..." keys), e.g. to draw a live loss curve.
    """
    from jaxtune import distributed, trainer

    distributed.initialize()  # multi-host pods/SLURM: before anything touches devices; no-op for one process
    return trainer.train(config, workdir, on_metrics=on_metrics)


def read_metrics(workdir: str) -> list[dict]:
    """The rows of `<workdir>/metrics.jsonl` (one dict per logged step; evaluations as "eval/..." keys)."""
    from jaxtune import metrics

    return metrics.read_metrics(workdir)


@dataclasses.dataclass
class Model:
    """A model with its tokenizer, ready to sample: `load(...)` or `starting_model(...)`."""

    model: Any
    params: Any  # the weights, or a variables dict (a PEFT run's base + adapters)
    tokenizer: Any
    config: ml_collections.ConfigDict
    step: int | None = None  # the checkpoint's step (None: not a checkpoint)

    def generate(self, prompts: str | Sequence[str], *, max_new_tokens: int = 32, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, stop: Sequence[str] = (),
                 seed: int = 0) -> list[str]:
        """Each prompt's completion (text), sampled as `jaxtune generate` does (greedy by default)."""
        from jaxtune import generate as generate_lib
        from jaxtune.data import pipeline

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        tok = self.tokenizer
        outputs = generate_lib.generate(
            self.model, self.params,
            pipeline.tokenize_prompts(tok, prompts, seq2seq=getattr(self.model, "is_encoder_decoder", False)),
            max_new_tokens=max_new_tokens,
            temperature=temperature, top_k=top_k, top_p=top_p, stop_tokens=(tok.eos_id,), seed=seed, pad_id=tok.pad_id,
        )
        return [generate_lib.decode_completion(tok.decode, tokens, stop) for tokens in outputs]


def load(workdir: str | None = None, *, hf_dir: str | None = None) -> Model:
    """The latest checkpoint of a run (its saved config and tokenizer; a PEFT run: base + adapters),
    or a Hugging Face model directory."""
    from jaxtune import inference, objectives

    loaded = inference.load(workdir=workdir, hf_dir=hf_dir, adapt=objectives.adapt_model_config)
    return Model(loaded.model, loaded.params, loaded.tokenizer, loaded.config, loaded.step)


def starting_model(config: ml_collections.ConfigDict, workdir: str) -> Model:
    """The model `train(config, workdir)` starts from, before any step: `model.hf_dir`, the latest
    checkpoint of `model.init_from`, or the seed's random init (for LoRA/DoRA runs the base, which
    is what zero-initialised adapters compute; QLoRA's base unquantised). A tokenizer trained on first use is trained into
    `workdir` now, exactly as training would, and reused by it.
    """
    from jaxtune import loading, models, objectives

    if config.model.hf_dir:
        return load(hf_dir=config.model.hf_dir)
    if config.model.init_from:
        return load(config.model.init_from)
    if config.peft.method == "prefix":
        raise UserError("starting_model: prefix tuning changes the model from its first step; "
                        "use load(workdir) after training")
    objective = objectives.build(config)
    tokenizer = objective.load_data(workdir).tokenizer
    model_config = loading.model_config_from(config, vocab_size=tokenizer.vocab_size, adapt=objective.adapt_model_config)
    params = loading.base_params(config, model_config, as_held=False)  # the seed's init, as the state builder makes it
    return Model(models.build(model_config), params, tokenizer, config, step=0)


def reward_fn(workdir: str | None = None, *, hf_dir: str | None = None, batch_size: int = 16):
    """A trained reward model as `rewards(prompts, completions, **fields) -> list[float]`: the latest
    checkpoint of a run with objective.type='reward', or a Hugging Face `*ForSequenceClassification`
    directory (jaxtune/scoring.py: tokenized and pooled exactly as the reward objective trains)."""
    from jaxtune import scoring

    return scoring.reward_fn(workdir, hf_dir=hf_dir, batch_size=batch_size)


def export(workdir: str, *, peft: str | None = None, merged: str | None = None, dtype: str | None = None,
           max_shard_size: str = "2GB", push_to_hub: str | None = None, private: bool = False,
           revision: str | None = None) -> None:
    """`jaxtune export`: a LoRA/DoRA/prefix run's latest adapters in peft's format (`peft` dir) and/or
    merged into a full Hugging Face model (`merged` dir), each with its model card; `push_to_hub`
    ("org/name") uploads the one folder written."""
    import argparse

    from jaxtune import cli

    cli._export(argparse.Namespace(workdir=str(workdir), peft=peft, merged=merged, dtype=dtype,
                                   max_shard_size=max_shard_size, push_to_hub=push_to_hub, private=private,
                                   revision=revision))
