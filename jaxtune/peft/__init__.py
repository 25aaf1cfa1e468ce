"""Parameter-efficient fine-tuning, applied to a model from outside it.

No model family or attention kernel knows about PEFT (`jaxtune/models` never imports this package).
`wrapper.wrap(model, spec)` returns the model applied under Flax method interception
(`nn.intercept_methods`): every module method called inside the model passes through the run's
method (`base.Method.intercept`), which recognises the calls it adapts by module class, method name
and module name, creates its trainable variables in that module's own scope in the "lora"
collection (beside the frozen "params"), and changes the call's result. Without that collection
the wrapped model is exactly the base model (the free DPO reference).

- base.py     the `Method` interface, its registry (`peft.method`), `Spec` (the validated `peft` config)
- wrapper.py  `wrap` / `unwrap`: the model under its method's interceptors (plus quant/heads below)
- lora.py     LoRA, rsLoRA, DoRA (`Projection.contract`); merge and DoRA's magnitude init
- prefix.py   prefix tuning (`Attention.prefix_slots`) and its MLP reparameterisation
- quant.py    QLoRA's NF4/int8 base, dequantised per call (`Projection.get_kernel`)
- heads.py    a reward model's score head trained in full (`ScoreHead.get_kernel`)
- export.py   PEFT-format and merged Hugging Face export (LoRA, DoRA, prefix)

The model's hook points, stable and PEFT-agnostic (jaxtune/models/layers.py):
`Projection.__call__(x)`, `Projection.get_kernel(shape)` (the float kernel), `Projection.contract(x,
kernel)` (x . kernel before the bias), `ScoreHead.get_kernel(shape)` and
`Attention.prefix_slots(kv_shape)` (key/value slots in front of the keys, None by default). A
projection's `name` (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj; T5's q, k, v, o,
wi or wi_0/wi_1, wo: the Hugging Face module names, a family's `projection_names(config)`, which
`peft.targets` lists) and `axes`/`features` say what it projects.

How to add a PEFT method
------------------------

One module in `jaxtune/peft/` with a `Method` subclass registered under the name `peft.method`
selects (found on its own: the registry imports every module of this package), and its tests.
The trainer then trains the method's variables and nothing else, checkpoints them, builds the
frozen base (quantised with `peft.quantize`), and uses the base as a DPO/GRPO reference; nothing
outside the new module changes. The example below is (IA)^3-style scaling: a learned scale per
output feature of the `peft.targets` projections, initialised to ones so training starts from the
base model. tests/peft/test_method_example.py runs exactly this code.

```python
from flax import linen as nn

from jaxtune.models import layers
from jaxtune.peft import base


@base.register("ia3")
class IA3(base.Method):
    # y = projection(x) * s on the target projections, s [features] initialised to ones.

    def intercept(self, next_fun, args, kwargs, context):
        module, y = context.module, next_fun(*args, **kwargs)
        if not (context.method_name == "__call__" and isinstance(module, layers.Projection)
                and module.name in self.spec.targets and base.has_adapters(module, "ia3_scale")):
            return y  # another call, or the model applied without adapters (the base model)
        out_axes = module.axes[len(module.axes) - len(module.features):]
        scale = base.adapter(module, "ia3_scale", nn.initializers.ones_init(), module.features, out_axes)
        return y * scale.astype(y.dtype)
```

With it, `--config.peft.method=ia3 --config.peft.targets=k,v,down` trains the scales. A method that
reads config keys other than `peft.targets` overrides `Method.settings(peft_cfg, projections)`
(see `lora.Lora`; `projections` are the run's model's, for `base.parse_targets`); one
that needs its own keys adds them to the `peft` config section. `jaxtune export` writes LoRA, DoRA
and prefix adapters only; for any other method it says so (`export.check_exportable`).
"""
