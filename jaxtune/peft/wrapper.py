"""`wrap(model, spec)`: a model applied under its PEFT method's interceptors, from outside.

The wrapped model has the model's interface (`init`, `apply` with any `method=`, `config` and
every other attribute) and the same variables layout: its trainable variables sit in the
"lora" collection, each in the scope of the module it adapts, beside the frozen "params". Inside
`init`/`apply` three Flax method interceptors are active (`nn.intercept_methods`), outermost first:

- `quant.dequantizing` when the base is quantised (QLoRA): `Projection.get_kernel` reads codes;
- `heads.train_heads`: a sequence-classification head is trained in full (`ScoreHead.get_kernel`);
- the run's `Method.intercept` (peft/base.py's registry: lora, dora, prefix, ...).

Applied without the "lora" collection the wrapped model is the base model.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

from flax import linen as nn

from jaxtune import models
from jaxtune.errors import UserError
from jaxtune.peft import base, heads, quant


@dataclasses.dataclass(frozen=True)
class Adapted:
    """The model `model` adapted by the PEFT method of `spec` (see the module docstring)."""

    model: nn.Module
    spec: base.Spec

    @contextlib.contextmanager
    def intercepting(self):
        interceptors = [heads.train_heads, base.method_for(self.spec).intercept]
        if self.spec.quantize != "none":
            interceptors.insert(0, quant.dequantizing)
        with contextlib.ExitStack() as stack:
            for interceptor in interceptors:
                stack.enter_context(nn.intercept_methods(interceptor))
            yield

    def init(self, *args, **kwargs) -> Any:
        with self.intercepting():
            return self.model.init(*args, **kwargs)

    def apply(self, *args, **kwargs) -> Any:
        with self.intercepting():
            return self.model.apply(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("model", "spec"):  # copy/pickle protocols, half-built instances
            raise AttributeError(name)
        return getattr(self.model, name)  # config, method names for apply(method=...), ...


def wrap(model: nn.Module, spec: base.Spec | None) -> nn.Module | Adapted:
    """The model with the PEFT method of `spec` applied (None: the model itself); a method or target
    the model cannot take is a UserError (`check_model_kind`, `check_targets`)."""
    if spec is not None:
        check_model_kind(spec, getattr(model, "is_encoder_decoder", False), type(model).__name__)
        check_targets(model, spec)
    return model if spec is None else Adapted(model, spec)


def check_model_kind(spec: base.Spec, encoder_decoder: bool, model_name: str) -> None:
    """Prefix tuning needs `Attention.prefix_slots`, which T5's attention (relative position bias,
    encoder, decoder and cross-attention) lacks: an error rather than a silently unadapted model."""
    if spec.prefix_length > 0 and encoder_decoder:
        raise UserError(f"peft.method={spec.method!r}: prefix tuning is not supported for encoder-decoder models "
                        f"({model_name}); use lora, dora or lora with peft.quantize (QLoRA)")


def check_targets(model: nn.Module, spec: base.Spec) -> None:
    """Every target names a projection the model has (an adapter on no module would train nothing):
    e.g. T5's are q, k, v, o, wi / wi_0, wi_1, wo, and a decoder-only model's q_proj..down_proj."""
    try:
        projections = models.family_of(model.config).projection_names(model.config)
    except (AttributeError, TypeError):  # not a registered family's model: nothing to check against
        return
    missing = [t for t in spec.targets if t not in projections]
    if missing:
        raise UserError(f"peft targets {', '.join(missing)} name no projection of this {type(model).__name__} model; "
                        f"its projections: {', '.join(projections)} (or 'all-linear')")


def spec_of(model: nn.Module | Adapted) -> base.Spec | None:
    """The PEFT settings a model is wrapped with (None: a plain model)."""
    return model.spec if isinstance(model, Adapted) else None


def unwrap(model: nn.Module | Adapted) -> nn.Module:
    """The base model (no interceptors): what a PEFT run's frozen base params belong to."""
    return model.model if isinstance(model, Adapted) else model
