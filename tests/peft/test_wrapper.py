"""PEFT wraps models from outside: model code never mentions it, and the wrapped model keeps the
model's interface (init/apply with any method, config) with adapters in their own collection."""

import ast
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxtune.models
from jaxtune import models, sharding
from jaxtune.peft import base, wrapper

MODELS_DIR = Path(jaxtune.models.__file__).parent


@pytest.mark.parametrize("path", sorted(MODELS_DIR.glob("*.py")), ids=lambda p: p.name)
def test_model_code_never_mentions_peft(path):
    text = path.read_text()
    assert "peft" not in text.lower()
    imported = {a.name for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(ast.parse(text)) if isinstance(n, ast.ImportFrom)}
    assert not {m for m in imported if m.startswith("jaxtune.peft")}


def test_wrapped_model_keeps_the_model_interface():
    plain = models.build(models.get_config("llama", "tiny", num_layers=1))
    spec = base.Spec("lora", rank=2, alpha=4.0, targets=("q_proj", "down_proj"))
    assert wrapper.wrap(plain, None) is plain and wrapper.spec_of(plain) is None
    model = wrapper.wrap(plain, spec)
    assert wrapper.unwrap(model) is plain and wrapper.spec_of(model) is spec and model.config is plain.config
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 200, (2, 6)), jnp.int32)
    variables = sharding.unbox(model.init(jax.random.key(0), tokens))
    assert set(variables) == {"params", base.COLLECTION}
    assert set(variables[base.COLLECTION]["layers"]["attn"]) == {"q_proj"}  # only the targets are adapted
    adapters = jax.tree.map(lambda x: x + 0.1, variables[base.COLLECTION])
    adapted = {"params": variables["params"], base.COLLECTION: adapters}
    hidden = model.apply(adapted, tokens, method="hidden_states")  # any method, by name or attribute
    np.testing.assert_array_equal(model.apply(adapted, hidden, method=model.logits_from_hidden),
                                  model.apply(adapted, tokens))
    base_hidden = plain.apply({"params": variables["params"]}, tokens, method="hidden_states")
    np.testing.assert_array_equal(model.apply({"params": variables["params"]}, tokens, method="hidden_states"),
                                  base_hidden)  # without the collection: the base model
    assert float(jnp.abs(hidden - base_hidden).max()) > 1e-3
