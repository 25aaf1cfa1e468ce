"""The objective interface and its registry: everything objective-specific lives behind it.

The trainer (state builder, jitted step, loop) names no objective. It asks the run's `Objective`
(one instance, built from the config by `build(config)`) for:

- its config keys (`config_section`: the section `config.objective.<name>`, present only when
  `objective.type` selects this objective; no key is shared between sections, settings several
  objectives read live in the shared sections such as `data`) and `validate(config)`;
- the model it trains (`adapt_model_config`, e.g. a scalar head) and the reference model it
  needs (`reference_kind`: none | copy | base | precomputed);
- its data: `load_data` (tokenizer + records), `train_dataset` (host batches of the local batch
  size), `batch_shapes` (the global batch the step is compiled for);
- its loss as *sums* plus a `weight`: the step computes `weight(global batch)` once, splits the
  batch into micro-batches, adds up each micro-batch's `loss` sums and divides by the weight
  (`normalise`), so gradient accumulation is exact whatever the objective counts (tokens, pairs,
  completions);
- hooks in the loop: `start(run)` once before the data iterator and the state exist (precompute a reference,
  keep handles for rollouts), `next_batch(state, data_iter, rng)` every step (default: the next
  data batch; an RL objective samples from the current policy here), `eval_set` / `evaluate`
  (held-out metrics during training and in `jaxtune eval`), `describe` and `data_report` (lines
  printed at the start and the end of a run).

Adding an objective = one module in `jaxtune/objectives/` with a registered subclass (found on
its own: every module of this package is imported when the registry is first read), its config
keys, and its tests. See `jaxtune/objectives/__init__.py` for a complete example.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxtune import config as config_lib
from jaxtune import loading, plugins
from jaxtune.datatools.screen import Screen
from jaxtune.errors import UserError

REFERENCE_KINDS = ("none", "copy", "base", "precomputed")


class ModelFns(Protocol):
    """What a loss gets instead of a model class (the trainer's `ModelApply` implements it).

    `params` are the trained weights (LoRA: the adapters), `frozen` a PEFT run's base (None
    otherwise); `apply(frozen, ...)` without adapters is the base model. `rows` are [N, T] batches
    with inputs/targets/positions/segment_ids (and loss_mask).
    """

    def __call__(self, params, tokens, positions, segment_ids, frozen=None, rngs=None) -> jax.Array:
        """Logits [N, T, V] (tests and small models; losses use token_stats)."""

    def token_stats(self, params, rows: dict[str, jax.Array], frozen=None, rngs=None, temperature=1.0):
        """jaxtune.logprobs.TokenStats [N, T] (float32; the LM head chunked, never [N, T, V] at once),
        of softmax(logits / temperature)."""

    def hidden_states(self, params, rows: dict[str, jax.Array], frozen=None, rngs=None) -> jax.Array:
        """Final hidden states [N, T, D] (after the final norm): for heads other than the LM head."""

    def token_stats_and_values(self, params, rows: dict[str, jax.Array], frozen=None, rngs=None, temperature=1.0):
        """(TokenStats, value estimates [N, T] float32) from one backbone pass: a model with a
        `value_head` (PPO's policy and value model on one backbone)."""


@dataclasses.dataclass
class RunContext:
    """What a running job hands its objective's hooks (`start`, `next_batch` via what `start` kept).

    `start_params()` materialises the weights the run started from (model.hf_dir, init_from or the
    seed; LoRA: the frozen base), in their shardings: the frozen reference. `put(batch)` turns a
    process-local host batch into global sharded arrays (the step's batch layout); `device_put`
    places a global batch that every process holds whole (e.g. a pass over all records).
    """

    config: ml_collections.ConfigDict
    workdir: Any  # pathlib.Path or a gs:// path
    setup: Any  # trainer.TrainSetup: mesh, model, apply_fn (ModelFns), shardings, batch_shapes
    data: Any  # what load_data returned
    data_stats: Any  # the second value train_dataset returned
    start_params: Callable[[], Any]
    put: Callable[[dict[str, np.ndarray]], dict[str, jax.Array]]  # process-local host batch -> global arrays
    device_put: Callable[[dict[str, np.ndarray]], dict[str, jax.Array]]  # the same full batch on every process
    model_variables: Callable[[Any], dict] | None = None  # TrainState -> the model's variables (sampling, scoring)
    print: Callable[[str], None] = print


def data_screen(config: ml_collections.ConfigDict) -> Screen | None:
    """The run's pre-training data screen (data.tasks.<t>.filters, data.decontaminate), or None when
    not configured: the objectives hand it to the data layer, which names no data tool itself."""
    return Screen.from_config(config.data, config.eval)


class Objective:
    """One training objective. Subclass, decorate with `@register("name")`, override what differs.

    An instance is built per run from the whole config (`self.config`); `self.section` is its own
    section, `config.objective.<name>`. Everything called inside the jitted step (`loss`, `weight`) must be pure.
    """

    name: ClassVar[str] = ""  # set by register()
    # Metric names `loss` returns as plain totals over the global batch (not divided by the weight).
    summed_metrics: ClassVar[tuple[str, ...]] = ()
    # Whether the objective trains encoder-decoder models (T5): its data and loss handle the decoder stream.
    encoder_decoder: ClassVar[bool] = False

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.section = self.section_of(config)
        # The weights the run started from (the frozen reference), as a thunk: set by `start` during
        # training (RunContext.start_params) and by `jaxtune eval`; None until then.
        self.start_params: Callable[[], Any] | None = None

    # ---- configuration -----------------------------------------------------------------------

    @classmethod
    def config_section(cls) -> ml_collections.ConfigDict:
        """This objective's keys, `config.objective.<name>.*`, with their defaults (a typed None needs a
        FieldReference); data settings only this objective reads belong here too."""
        return ml_collections.ConfigDict()

    @classmethod
    def section_of(cls, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        """`config.objective.<name>` (the config must have selected this objective: `select(config)`)."""
        return config.objective[cls.name]

    @classmethod
    def key(cls, key: str) -> str:
        """The full name of one of this objective's keys, for error messages: 'objective.<name>.<key>'."""
        return f"objective.{cls.name}.{key}"

    @classmethod
    def check_keys(cls, config: ml_collections.ConfigDict, checks) -> None:
        """`checks`: (ok, key, expected) for keys of this objective's section; the first not ok is a
        UserError naming the key, what it must be and its value."""
        s = cls.section_of(config)
        for ok, key, expected in checks:
            if not ok:
                raise UserError(f"config key '{cls.key(key)}' must be {expected}, got {s[key]!r}")

    @classmethod
    def validate(cls, config: ml_collections.ConfigDict) -> None:
        """Raise UserError naming the key and the fix for a config this objective cannot run."""

    # ---- model and reference ---------------------------------------------------------------

    def adapt_model_config(self, model_config):
        """The model config this objective trains (default: as given). E.g. a reward model adds a
        scalar head here; called wherever a run's model is built (train, plan, export, eval)."""
        return model_config

    @property
    def adapts_start_weights(self) -> bool:
        """Whether `adapt_start_weights` changes anything (a fresh state then goes through it)."""
        return False

    def adapt_start_weights(self, weights, setup, *, frozen_base: bool):
        """The weights a fresh run starts from (full fine-tuning: the params; PEFT: the frozen base,
        `frozen_base`), adapted where the objective fills part of the model itself (PPO: a separate
        value model copied from the policy or read from a reward model). Called wherever start
        weights are built, resume included (a PEFT base is re-created); must be deterministic."""
        del setup, frozen_base
        return weights

    def reference_kind(self) -> str:
        """none | copy (a frozen copy of the start weights is passed to `loss` as ref_params) |
        base (a PEFT run's base, i.e. `frozen`) | precomputed (the batches carry it; see `start`)."""
        return "none"

    # ---- data --------------------------------------------------------------------------------

    def load_data(self, workdir) -> Any:
        """Tokenizer and records for this run; the result must have a `.tokenizer`."""
        raise NotImplementedError

    def train_dataset(self, data, *, batch_size: int, process_index: int, process_count: int) -> tuple[Any, Any]:
        """(iterable of process-local host batches of `batch_size` rows, stats). The iterable's
        iterator is checkpointed with the state when it supports it (Grain); stats go to `data_report`."""
        raise NotImplementedError

    def batch_shapes(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """The global batch the step is compiled for (unsharded shapes; the trainer shards the
        leading axis over the data-parallel mesh axes). Every key here must be in every batch."""
        raise NotImplementedError

    # ---- the loss, inside the jitted step -----------------------------------------------------

    def weight(self, batch: dict[str, jax.Array]) -> jax.Array:
        """What the global batch's loss is a mean over (trained tokens, pairs, ...), a float32 scalar."""
        raise NotImplementedError

    def loss(self, model: ModelFns, params, batch: dict[str, jax.Array], *, frozen=None, rng=None,
             ref_params=None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(loss summed over this micro-batch, metrics summed over it) as float32 scalars.

        The step divides both by the global batch's `weight` (except `summed_metrics`) and adds the
        micro-batches up. A metric that is a mean over the micro-batch's n units (pairs, examples)
        is returned as mean * n. `rng` is a dropout key (None: deterministic); `ref_params` is the
        frozen reference copy when reference_kind() == 'copy'.
        """
        raise NotImplementedError

    # ---- loop hooks --------------------------------------------------------------------------

    def start(self, run: RunContext) -> None:
        """Called once inside the run's mesh, before the data iterator and the train state exist
        (the data position and the state are restored after it): precompute what batches carry,
        keep `run.setup` (model, apply_fn, mesh) and `run.data.tokenizer` for `next_batch`."""

    def next_batch(self, state, data_iter: Iterator, rng: jax.Array) -> dict[str, Any]:
        """This step's batch with the keys of `batch_shapes`: process-local host arrays (this
        process's rows, as data iterators give them) or global jax.Arrays (e.g. rollouts sampled on
        the devices with `run.model_variables(state)`). `state` is the current TrainState (its
        params are the current policy); `rng` is this step's key (the same on every process)."""
        del state, rng
        return next(data_iter)

    def plan_memory(self, setup, *, num_processes: int) -> dict[str, tuple[int, str]]:
        """Bytes per device the objective holds outside the train step, for `jaxtune plan`: name ->
        (bytes, 'always' | 'sampling'); 'always' is resident through every step (e.g. a frozen
        reference copy), 'sampling' only while rollouts are sampled (e.g. the KV cache)."""
        del setup, num_processes
        return {}

    def checkpoint_state(self) -> dict | None:
        """Host-side state the objective carries from step to step (e.g. PPO's adaptive KL
        coefficient), saved as JSON beside each checkpoint so a resumed run continues bitwise;
        None: nothing to save."""
        return None

    def restore_checkpoint_state(self, saved: dict) -> None:
        """Takes back what `checkpoint_state` returned when the resumed checkpoint was saved."""

    def eval_set(self, data) -> Any:
        """Held-out examples built from `data` (falsy: nothing to evaluate)."""
        return None

    def evaluate(self, model, variables, tokenizer, eval_set, *, show: int = 0,
                 printer: Callable[[str], None] = print) -> dict[str, float]:
        """Held-out metrics of `model` with `variables` ({"params": ...} [+ adapters]) on `eval_set`."""
        return {}

    def describe(self) -> str | None:
        """A line printed when training starts (e.g. the loss and the reference), or None."""
        return None

    def data_report(self, stats) -> list[str]:
        """Lines printed when training ends about the data (dropped/truncated records)."""
        return []


# ---- the registry ------------------------------------------------------------------------------

_REGISTRY: dict[str, type[Objective]] = {}
_ALIASES: dict[str, str] = {}


def register(name: str, *, aliases: tuple[str, ...] = ()) -> Callable[[type[Objective]], type[Objective]]:
    """Class decorator: `objective.type = name` (or an alias, e.g. an old spelling) selects the class."""

    def decorator(cls: type[Objective]) -> type[Objective]:
        for key in (name, *aliases):
            owner = _REGISTRY.get(key) or _REGISTRY.get(_ALIASES.get(key, ""))
            if owner is not None and owner.__qualname__ != cls.__qualname__:
                raise ValueError(f"objective name {key!r} is already registered by {owner.__module__}.{owner.__name__}")
        cls.name = name
        _REGISTRY[name] = cls
        for alias in aliases:
            _ALIASES[alias] = name
        return cls

    return decorator


def _discover() -> None:
    """Imports every module of jaxtune.objectives once, so each registers its objectives itself."""
    plugins.import_submodules("jaxtune.objectives")


def names(*, aliases: bool = False) -> tuple[str, ...]:
    """The registered objective names (and their aliases when asked), sorted."""
    _discover()
    return tuple(sorted(_REGISTRY) + (sorted(_ALIASES) if aliases else []))


def canonical(name: str) -> str:
    """`name` with an alias resolved (unknown names are returned as they are)."""
    _discover()
    return _ALIASES.get(name, name)


def get(name: str) -> type[Objective]:
    """The class registered as `name` (or an alias); UserError listing the choices otherwise."""
    _discover()
    cls = _REGISTRY.get(_ALIASES.get(name, name))
    if cls is None:
        raise UserError(f"config key 'objective.type' is {name!r}; expected one of {', '.join(names())}")
    return cls


def build(config: ml_collections.ConfigDict) -> Objective:
    """The run's objective instance (config.objective.type selects it; its section is filled in if missing)."""
    cls = get(config.objective.type)
    check_model_kind(cls, config)
    if cls.name not in config.objective:
        config_lib.upgrade_saved(config, config_sections())  # a config saved by an older jaxtune
        select(config)
    return cls(config)


def check_model_kind(cls: type[Objective], config: ml_collections.ConfigDict, *, resolve_hub: bool = True) -> None:
    """An objective that feeds decoder-only batches cannot train an encoder-decoder: say so before
    anything is built (config validation: not for Hub ids, which are downloaded later)."""
    where = loading.encoder_decoder_family(config, resolve_hub=resolve_hub)
    if where is not None and not cls.encoder_decoder:
        able = ", ".join(n for n in names() if get(n).encoder_decoder)
        raise UserError(f"{where} is an encoder-decoder model; objective.type={config.objective.type!r} supports "
                        f"decoder-only models so far (encoder-decoder runs: objective.type {able}; see "
                        "docs/guides/t5.md)")


def adapt_model_config(config: ml_collections.ConfigDict, model_config):
    """The model config a run with `config` trains: its objective's `adapt_model_config` (for a
    run restored from its checkpoint: `inference.load(..., adapt=objectives.adapt_model_config)`)."""
    return build(config).adapt_model_config(model_config)


class _LiveSections(Mapping):
    """name -> section factory, read from the registry at each use: an objective registered while the
    config file loads (one defined in that file) has its section like the built-in ones."""

    def __getitem__(self, name: str):
        return get(name).config_section

    def __iter__(self):
        return iter(names())

    def __len__(self) -> int:
        return len(names())


def config_sections() -> config_lib.ObjectiveSections:
    """Every registered objective's section (`config.objective.<name>`) for the config loader."""
    return config_lib.ObjectiveSections(_LiveSections(), canonical)


def select(config: ml_collections.ConfigDict) -> None:
    """Keeps `config.objective.type` and that objective's section (defaults + what the config set)."""
    get(config.objective.type)  # an unknown type names the choices
    config_lib.select_objective(config, config_sections())


def validate(config: ml_collections.ConfigDict) -> None:
    """config.objective: a known type that can train the model, then that objective's own checks."""
    cls = get(config.objective.type)
    check_model_kind(cls, config, resolve_hub=False)
    cls.validate(config)


def normalise(loss_sum: jax.Array, metric_sums: dict[str, jax.Array], weight: jax.Array,
              summed: tuple[str, ...] = ()) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Sums over a micro-batch -> its share of the global-batch mean (the step adds the shares up)."""
    weight = jnp.maximum(jnp.asarray(weight, jnp.float32), 1.0)
    loss = loss_sum / weight
    metrics = {k: v if k in summed else v / weight for k, v in metric_sums.items()}
    metrics.setdefault("loss", loss)
    return loss, metrics
