"""The PEFT method interface and its registry: a method is code that wraps a model from outside.

A PEFT method never edits model code. `peft.wrap(model, spec)` applies the model under Flax
method interception (`nn.intercept_methods`): every call of a module method inside the model
(e.g. a `Projection.contract`, an `Attention.prefix_slots`) passes through the run's
`Method.intercept`, which may create trainable variables in the module's own scope (collection
`COLLECTION`, beside the frozen "params") and change the call's result. Applied without that
collection, the wrapped model is exactly the base model (the free DPO reference).

Adding a method = one module in `jaxtune/peft/` with a registered `Method` subclass (found on its
own: every module of this package is imported when the registry is first read) and its tests.
See `jaxtune/peft/__init__.py` for a complete example.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, ClassVar

import jax
from flax import linen as nn

from jaxtune import plugins
from jaxtune.errors import UserError
from jaxtune.models import layers

# The variable collection of every method's trainable variables (the checkpointed "adapters").
COLLECTION = "lora"
# The decoder-only families' projections (HF / PEFT module names) by their short config names; a
# family with other names (T5: q, k, v, o, wi, wi_0, wi_1, wo) gives `parse_targets` its own.
DECODER_PROJECTIONS = layers.DECODER_PROJECTIONS
TARGETS = {name.removesuffix("_proj"): name for name in DECODER_PROJECTIONS}
BASE_DTYPES = ("", "float32", "bfloat16")
QUANT_KINDS = ("nf4", "int8")  # peft/quant.py


@dataclasses.dataclass(frozen=True)
class Spec:
    """A run's static PEFT settings (`spec_from_config(config.peft)`), read by its method.

    The base's storage (`quantize`, `base_dtype`) applies to every method; the rest are the
    settings of the method that uses them (LoRA: rank..rslora; prefix tuning: prefix_*)."""

    method: str
    rank: int = 0
    alpha: float = 0.0
    targets: tuple[str, ...] = ()  # projection module names, e.g. ("q_proj", "v_proj")
    dropout: float = 0.0
    rslora: bool = False
    quantize: str = "none"  # none | nf4 | int8 (the base kernels; see peft.quant)
    quant_block_size: int = 64
    prefix_length: int = 0  # prefix tuning: virtual tokens per layer (0: none)
    prefix_projection: int = 0  # prefix tuning: hidden size of the reparameterising MLP (0: direct)
    base_dtype: str = ""  # dtype the frozen base is held in ("": the model's param_dtype)

    @property
    def dora(self) -> bool:
        return self.method == "dora"

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


class Method:
    """One PEFT method. Subclass, decorate with `@register("name")` (the `peft.method` value) and
    override `intercept` (and `settings` when the method reads config keys besides `targets`)."""

    name: ClassVar[str] = ""  # set by register()

    def __init__(self, spec: Spec):
        self.spec = spec

    @classmethod
    def settings(cls, peft_cfg, projections: tuple[str, ...] = DECODER_PROJECTIONS) -> dict[str, Any]:
        """The validated Spec fields this method reads from the `peft` config section
        (`projections`: the model's projection names, which `peft.targets` chooses from)."""
        return {"targets": parse_targets(peft_cfg.targets, projections)}

    def intercept(self, next_fun: Callable[..., Any], args: tuple, kwargs: dict, context: nn.module.InterceptorContext) -> Any:
        """A Flax method interceptor: runs for every module method call inside the wrapped model
        (`context.module`, `context.method_name`); `next_fun(*args, **kwargs)` is the original."""
        return next_fun(*args, **kwargs)


_REGISTRY: dict[str, type[Method]] = {}


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: makes a Method subclass the `peft.method=name` method."""

    def decorator(cls: type[Method]) -> type[Method]:
        if name == "none" or name in _REGISTRY:
            owner = _REGISTRY.get(name)
            raise ValueError(f"PEFT method name {name!r} is already taken"
                             + (f" by {owner.__module__}.{owner.__name__}" if owner else ""))
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def _discover() -> None:
    """Imports every module of jaxtune.peft once, so each registers its methods itself."""
    plugins.import_submodules("jaxtune.peft")


def names() -> tuple[str, ...]:
    """The registered method names, sorted."""
    _discover()
    return tuple(sorted(_REGISTRY))


def method_for(spec: Spec) -> Method:
    """The run's method object (its interceptor and settings)."""
    _discover()
    return _REGISTRY[spec.method](spec)


def parse_targets(targets: str, projections: tuple[str, ...] = DECODER_PROJECTIONS) -> tuple[str, ...]:
    """"q,k,v,o" / "q_proj,v_proj" / "all-linear" -> projection module names, in `projections` order.

    `projections` are the model's projection module names (a family's `projection_names(config)`;
    the decoder-only families' by default); each is also named without a "_proj" suffix."""
    aliases = {**{name.removesuffix("_proj"): name for name in projections}, **{name: name for name in projections}}
    if targets.strip() == "all-linear":
        return tuple(projections)
    chosen = set()
    for name in (t.strip() for t in targets.split(",") if t.strip()):
        if name not in aliases:
            short = list(dict.fromkeys(p.removesuffix("_proj") for p in projections))
            suffixed = " (or the *_proj names)" if any(p.endswith("_proj") for p in projections) else ""
            raise UserError(f"config key 'peft.targets': unknown target {name!r}; valid targets: "
                            f"{', '.join([*short, 'all-linear'])}{suffixed}")
        chosen.add(aliases[name])
    if not chosen:
        raise UserError("config key 'peft.targets' is empty; expected e.g. 'q,k,v,o' or 'all-linear'")
    return tuple(t for t in projections if t in chosen)


def spec_from_config(peft_cfg, projections: tuple[str, ...] = DECODER_PROJECTIONS) -> Spec | None:
    """The Spec of a config's `peft` section (None when method is 'none'), validated; `peft.targets`
    choose among `projections` (the model's projection names: `models.Family.projection_names`)."""
    method, quantize = peft_cfg.method, peft_cfg.quantize
    methods = ("none", *names())
    if method not in methods:
        raise UserError(f"config key 'peft.method' is {method!r}; expected one of {', '.join(methods)}")
    if quantize not in ("none", *QUANT_KINDS):
        raise UserError(f"config key 'peft.quantize' is {quantize!r}; expected one of none, {', '.join(QUANT_KINDS)}")
    if method == "none":
        if quantize != "none":
            raise UserError(f"config key 'peft.quantize' needs an adapter method (peft.method={', '.join(names())}): "
                            "a quantised base cannot be fully fine-tuned")
        return None
    if peft_cfg.quant_block_size <= 0 or peft_cfg.quant_block_size % 2:
        raise UserError(f"config key 'peft.quant_block_size' must be a positive even number, got {peft_cfg.quant_block_size}")
    if peft_cfg.base_dtype not in BASE_DTYPES:
        raise UserError(f"config key 'peft.base_dtype' is {peft_cfg.base_dtype!r}; expected one of "
                        f"{', '.join(repr(d) for d in BASE_DTYPES)} ('' keeps model.param_dtype)")
    return Spec(method=method, quantize=quantize, quant_block_size=peft_cfg.quant_block_size,
                base_dtype=peft_cfg.base_dtype, **_REGISTRY[method].settings(peft_cfg, projections))


# ---- helpers for methods -----------------------------------------------------------------------


def has_adapters(module: nn.Module, name: str) -> bool:
    """Whether `module` creates (init) or reads (apply with the collection) its variable `name`;
    False means the model is applied as the base model."""
    return module.is_initializing() or module.has_variable(COLLECTION, name)


def adapter(module: nn.Module, name: str, init: Callable, shape: tuple[int, ...], axes: tuple[str | None, ...]) -> jax.Array:
    """The value of the trainable variable `name` in `module`'s scope (created at init from the
    "params" rng in `module.param_dtype`, boxed with logical `axes` so the trainer shards it)."""
    boxed = nn.with_logical_partitioning(init, axes)
    return module.variable(COLLECTION, name, lambda: boxed(module.make_rng("params"), shape, module.param_dtype)).value
