"""PEFT interop: adapters exported by jaxtune load in `peft` with equal logits (LoRA, rsLoRA,
DoRA; Llama and Qwen2 with q/k/v biases), and the merged export loads in `transformers` with
the logits of jaxtune's adapter forward."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxtune import models
from jaxtune.models import hf_mapping
from jaxtune.peft import base as peft_base
from jaxtune.peft import export, lora, wrapper

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TOL = 1e-4
TOKENS = np.random.default_rng(1).integers(1, 97, size=(2, 13))

HF_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, tie_word_embeddings=False),
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, tie_word_embeddings=True, rms_norm_eps=1e-6),
}


def _hf_model(family):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[family](), attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.5)
            elif p.ndim == 2:
                p.normal_(0.0, 1.0 / np.sqrt(p.shape[1]))
    return model


@pytest.fixture(scope="module")
def hf_bases(tmp_path_factory):
    """family -> (HF dir, jaxtune config, base params), built once per module."""
    cache = {}

    def get(family):
        if family not in cache:
            model = _hf_model(family)
            d = tmp_path_factory.mktemp(f"hf_{family}")
            model.save_pretrained(d)
            config = models.config_from_pretrained(d, param_dtype="float32")
            sd = {k: v.numpy() for k, v in model.state_dict().items()}
            if config.tie_word_embeddings:
                sd.pop("lm_head.weight", None)
            base = hf_mapping.params_from_state_dict(models.family_of(config).hf_param_maps(config), sd)
            cache[family] = (d, config, jax.tree.map(jnp.asarray, base))
        return cache[family]

    return get


def trained_like_adapters(config, base, spec, seed=0):
    """Adapters as after training: A from init, B and (DoRA) magnitude perturbed away from init."""
    model = wrapper.wrap(models.build(config), spec)
    init = jax.jit(lambda rng: nn.meta.unbox(model.init(rng, jnp.zeros((1, 4), jnp.int32))[peft_base.COLLECTION]))
    adapters = jax.jit(lambda b, a: lora.init_magnitudes(b, a, spec))(base, init(jax.random.key(seed)))
    rng = np.random.default_rng(seed)

    def perturb(path, x):
        name = path[-1].key
        if name == "lora_b":
            return jnp.asarray(rng.normal(0, 0.3, x.shape), x.dtype)
        if name == "magnitude":
            return x * jnp.asarray(1 + 0.2 * rng.standard_normal(x.shape), x.dtype)
        return x

    return jax.tree_util.tree_map_with_path(perturb, adapters)


def _logits(model, variables):
    return np.asarray(jax.jit(model.apply)(variables, jnp.asarray(TOKENS)))


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


SPECS = {
    "lora": dict(targets=("q_proj", "v_proj", "o_proj", "down_proj")),
    "rslora": dict(targets=tuple(peft_base.TARGETS.values()), rslora=True),
    "dora": dict(targets=("q_proj", "k_proj", "o_proj", "gate_proj", "up_proj"), method="dora"),
}


# Llama: every method; Qwen2 (q/k/v biases, tied embeddings): DoRA by default, the rest slow.
PARITY_CASES = [("llama", k) for k in SPECS] + [
    pytest.param("qwen2", k, marks=() if k == "dora" else pytest.mark.slow) for k in SPECS
]


@pytest.mark.parametrize("family, kind", PARITY_CASES)
def test_peft_loads_exported_adapters_with_equal_logits(hf_bases, family, kind, tmp_path):
    d, config, base = hf_bases(family)
    spec = peft_base.Spec(**{"method": "lora", "rank": 4, "alpha": 12.0, **SPECS[kind]})
    adapters = trained_like_adapters(config, base, spec)
    model = wrapper.wrap(models.build(config), spec)
    ours = _logits(model, {"params": base, "lora": adapters})
    base_logits = _logits(model, {"params": base})

    out = export.export_peft(config, spec, adapters, tmp_path / "adapter", base_model_name_or_path=str(d))
    written = json.loads((out / export.CONFIG_FILE).read_text())
    assert written["r"] == 4 and written["use_dora"] == spec.dora and written["use_rslora"] == spec.rslora
    peft_model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(d), str(out)).eval()
    theirs = _hf_logits(peft_model, TOKENS)
    with peft_model.disable_adapter():  # PEFT's base is jaxtune's base
        np.testing.assert_allclose(_hf_logits(peft_model, TOKENS), base_logits, atol=TOL)
    assert np.abs(ours - base_logits).max() > 0.1  # the adapters change the model
    diff = float(np.abs(ours - theirs).max())
    print(f"{family}/{kind}: max |jaxtune - peft| = {diff:.1e}")
    assert diff <= TOL


@pytest.mark.parametrize("family", ["llama", pytest.param("qwen2", marks=pytest.mark.slow)])
def test_merged_export_loads_in_transformers(hf_bases, family, tmp_path):
    d, config, base = hf_bases(family)
    spec = peft_base.Spec("dora", rank=4, alpha=8.0, targets=tuple(peft_base.TARGETS.values()))
    adapters = trained_like_adapters(config, base, spec, seed=3)
    ours = _logits(wrapper.wrap(models.build(config), spec), {"params": base, "lora": adapters})
    out = export.export_merged(config, spec, base, adapters, tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    diff = float(np.abs(_hf_logits(merged, TOKENS) - ours).max())
    print(f"{family}/merged dora: max |transformers(merged) - jaxtune adapters| = {diff:.1e}")
    assert diff <= TOL


def test_base_apply_is_the_model_without_adapters(hf_bases):
    _, config, base = hf_bases("qwen2")
    spec = peft_base.Spec("lora", rank=2, alpha=4.0, targets=("q_proj",))
    plain = _logits(models.build(config), {"params": base})
    ref = jax.jit(lambda b, t: lora.base_apply(wrapper.wrap(models.build(config), spec), b, t))(base, jnp.asarray(TOKENS))
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(ref))
