"""Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3: parity with transformers (PyTorch CPU,
random weights), packing with segment ids, left padding, HF config round trip, param counts
and logical axes. One jit compile per family: unpacked, packed and left-padded rows share a
batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxtune import models
from jaxtune.models import hf_mapping
from tests.models.hf_reference import hf_config as _hf_config, random_hf_model, state_dict as _state_dict

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
T = 37  # every row of the test batch
WINDOW = 5  # sliding window, far shorter than the sequences so it matters

_COMMON = dict(
    vocab_size=101,
    hidden_size=48,
    intermediate_size=88,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=2,  # GQA ratio 3
    max_position_embeddings=128,
)
_GEMMA = dict(_COMMON, head_dim=16)  # head_dim != hidden / heads
_LOCAL_GLOBAL = ["sliding_attention", "full_attention", "sliding_attention"]

# family -> (HF config kwargs, tied embeddings). Soft caps are small so tanh is far from linear.
CASES = {
    "mistral": (dict(_COMMON, rope_theta=5000.0, sliding_window=WINDOW, rms_norm_eps=1e-5), False),
    "qwen2": (dict(_COMMON, rope_theta=20000.0, rms_norm_eps=1e-6), True),
    "qwen3": (dict(_COMMON, head_dim=16, rope_theta=20000.0, rms_norm_eps=1e-6, attention_bias=False), False),
    "gemma": (dict(_GEMMA, rope_theta=5000.0, hidden_act="gelu_pytorch_tanh"), True),
    "gemma2": (
        dict(_GEMMA, rope_theta=5000.0, sliding_window=WINDOW, layer_types=_LOCAL_GLOBAL,
             query_pre_attn_scalar=24, attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
        False,
    ),
    "gemma3": (
        dict(_GEMMA, sliding_window=WINDOW, layer_types=_LOCAL_GLOBAL, query_pre_attn_scalar=24,
             final_logit_softcapping=3.0,
             rope_parameters={
                 "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 50000.0},
                 "sliding_attention": {"rope_type": "default", "rope_theta": 700.0},
             }),
        True,
    ),
}
HF_TYPE = {"mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma",
           "gemma2": "gemma2", "gemma3": "gemma3_text"}


def _hf_model(family: str):
    kw, tie = CASES[family]
    return random_hf_model(HF_TYPE[family], tie=tie, unit_offset=family.startswith("gemma"), **kw)


def _hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids)[None], dtype=torch.long)).logits[0].numpy()


@pytest.fixture(scope="module", params=list(CASES))
def converted(request):
    family = request.param
    model = _hf_model(family)
    fam = models.FAMILIES[family]
    assert HF_TYPE[family] in fam.hf_model_types
    config = fam.config_from_hf(model.config.to_dict())
    params = hf_mapping.params_from_state_dict(fam.hf_param_maps(config), _state_dict(model, config))
    return family, model, config, params


def test_config_from_hf(converted):
    family, model, config, params = converted
    assert type(config) is models.FAMILIES[family].config_cls
    assert config.num_layers == 3 and config.num_kv_heads == 2
    assert config.tie_word_embeddings == CASES[family][1]
    assert ("lm_head" in params) == (not config.tie_word_embeddings)
    if family in ("mistral", "gemma2", "gemma3"):
        assert config.sliding_window == WINDOW
    if family in ("gemma2", "gemma3"):
        assert config.sliding_layers() == (True, False, True)
    if family == "gemma3":
        assert config.rope_theta == 50000.0 and config.rope_local_base_freq == 700.0
        assert config.rope_scaling == {"rope_type": "linear", "factor": 4.0}


def test_logits_match_hf_unpacked_packed_left_padded(converted):
    family, model, config, params = converted
    rng = np.random.default_rng(0)
    v = config.vocab_size
    full = rng.integers(1, v, size=(2, T))
    a, b = rng.integers(1, v, 17), rng.integers(1, v, 13)  # packed: a, b, 7 pad
    x = rng.integers(1, v, 33)  # left padded by 4
    pad_p, pad_l = T - len(a) - len(b), T - len(x)
    ids = np.stack([*full, np.concatenate([a, b, np.zeros(pad_p, int)]),
                    np.concatenate([np.zeros(pad_l, int), x])])
    seg = np.stack([np.ones(T, int)] * 2 + [
        np.array([1] * len(a) + [2] * len(b) + [0] * pad_p),
        np.array([0] * pad_l + [1] * len(x)),
    ])
    pos = np.stack([np.arange(T)] * 2 + [
        np.concatenate([np.arange(len(a)), np.arange(len(b)), np.arange(pad_p)]),
        np.concatenate([np.zeros(pad_l, int), np.arange(len(x))]),
    ])
    apply = jax.jit(models.build(config).apply)
    out = np.asarray(apply({"params": params}, jnp.asarray(ids), positions=jnp.asarray(pos),
                           segment_ids=jnp.asarray(seg)))
    assert np.isfinite(out).all()

    ref = np.stack([_hf_logits(model, row) for row in full])
    assert np.abs(ref).max() > 1.0  # the comparison is not trivially small numbers
    unpacked = float(np.abs(out[:2] - ref).max())
    packed = max(
        float(np.abs(out[2, : len(a)] - _hf_logits(model, a)).max()),
        float(np.abs(out[2, len(a) : len(a) + len(b)] - _hf_logits(model, b)).max()),
    )
    padded = float(np.abs(out[3, pad_l:] - _hf_logits(model, x)).max())
    print(f"{family}: max |logits - hf| unpacked {unpacked:.1e} packed {packed:.1e} left-pad {padded:.1e}")
    assert unpacked <= TOL and packed <= TOL and padded <= TOL


def test_config_to_hf_round_trip(converted):
    """config_to_hf gives transformers everything it needs: same weights -> same logits."""
    family, model, config, params = converted
    fam = models.FAMILIES[family]
    d = fam.config_to_hf(config)
    assert d["model_type"] == HF_TYPE[family]
    explicit = lambda c: c.replace(head_dim=c.resolved_head_dim)  # HF may omit head_dim
    assert explicit(fam.config_from_hf(d)) == explicit(config)
    kw = {k: v for k, v in d.items() if k not in ("model_type", "architectures", "torch_dtype")}
    rebuilt = transformers.AutoModelForCausalLM.from_config(
        _hf_config(d["model_type"], **kw), torch_dtype=torch.float32).eval()
    sd = hf_mapping.state_dict_from_params(fam.hf_param_maps(config), params)
    missing, unexpected = rebuilt.load_state_dict({k: torch.tensor(w) for k, w in sd.items()}, strict=False)
    assert not unexpected and all(k == "lm_head.weight" or "inv_freq" in k for k in missing), missing
    if config.tie_word_embeddings:
        rebuilt.tie_weights()
    ids = np.random.default_rng(3).integers(1, config.vocab_size, 23)
    np.testing.assert_allclose(_hf_logits(rebuilt, ids), _hf_logits(model, ids), atol=1e-5)


# Real variants: counts equal transformers' model built from config_to_hf on the meta device
# (published sizes are noted next to each variant).
REAL_VARIANTS = [
    ("mistral", "mistral-7b", 7_241_732_096),
    ("qwen2", "qwen2.5-0.5b", 494_032_768),
    ("qwen2", "qwen2.5-7b", 7_615_616_512),
    ("qwen3", "qwen3-0.6b", 596_049_920),
    ("qwen3", "qwen3-8b", 8_190_735_360),
    ("gemma", "gemma-2b", 2_506_172_416),
    ("gemma2", "gemma2-2b", 2_614_341_888),
    ("gemma2", "gemma2-9b", 9_241_705_984),
    ("gemma3", "gemma3-1b", 999_885_952),
    ("gemma3", "gemma3-4b", 3_880_263_168),
]


@pytest.mark.parametrize("family, variant, expected", REAL_VARIANTS, ids=[v for _, v, _ in REAL_VARIANTS])
def test_param_counts_match_transformers(family, variant, expected):
    config = models.get_config(family, variant)
    d = models.FAMILIES[family].config_to_hf(config)
    kw = {k: v for k, v in d.items() if k not in ("model_type", "architectures", "torch_dtype")}
    with torch.device("meta"):
        ref = transformers.AutoModelForCausalLM.from_config(_hf_config(d["model_type"], **kw))
    hf_count = sum(p.numel() for p in ref.parameters())
    ours = models.count_params(config)
    assert ours == hf_count, (ours, hf_count)
    assert ours == expected


@pytest.mark.parametrize("family", list(CASES))
def test_every_param_has_logical_axes(family):
    config = models.get_config(family, "tiny", tie_word_embeddings=False)
    boxed = jax.eval_shape(models.build(config).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
    allowed = {"vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "layers"}
    leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=is_box)
    maps = models.FAMILIES[family].hf_param_maps(config)
    assert {m.path for m in maps} == {tuple(k.key for k in path) for path, _ in leaves}
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path)
        assert is_box(leaf), name
        assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= allowed, (name, leaf.names)
        assert (leaf.names[0] == "layers") == name.startswith("['layers']"), (name, leaf.names)
