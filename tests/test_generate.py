"""KV-cache sampler: greedy parity with transformers' generate for every family (left-padded
batch of prompts of different lengths, fp32), sampling options, stop tokens and strings."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxtune import models
from jaxtune.errors import UserError
from jaxtune.generate import bucket, generate, left_pad, sample_tokens, truncate_at_stop_strings
from jaxtune.models import hf_mapping
from tests.models import test_families
from tests.models.hf_reference import random_hf_model, state_dict

torch = pytest.importorskip("torch")

LENGTHS = (3, 7, 11)
NEW_TOKENS = 8
PAD = 0
CASES = {
    "llama": (dict(test_families._COMMON, rope_theta=5000.0, rms_norm_eps=1e-5), False),
    **test_families.CASES,
}
HF_TYPE = {"llama": "llama", **test_families.HF_TYPE}


def _converted(family):
    kw, tie = CASES[family]
    hf = random_hf_model(HF_TYPE[family], tie=tie, unit_offset=family.startswith("gemma"), **kw)
    fam = models.FAMILIES[family]
    config = fam.config_from_hf(hf.config.to_dict())
    params = hf_mapping.params_from_state_dict(fam.hf_param_maps(config), state_dict(hf, config))
    return hf, config, params


def _hf_greedy(hf, prompts, eos):
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW_TOKENS,
                          min_new_tokens=NEW_TOKENS, pad_token_id=PAD, eos_token_id=eos)
    return out[:, width:].tolist()


@pytest.mark.parametrize("family", list(CASES))
def test_greedy_matches_transformers_generate(family):
    hf, config, params = _converted(family)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(1, config.vocab_size, n).tolist() for n in LENGTHS]
    eos = config.vocab_size - 1  # min_new_tokens keeps HF from ever sampling it: neither side stops
    ours = generate(models.build(config), params, prompts, max_new_tokens=NEW_TOKENS, pad_id=PAD)
    assert ours == _hf_greedy(hf, prompts, eos)
    assert all(len(o) == NEW_TOKENS for o in ours)


@pytest.fixture(scope="module")
def tiny():
    model = models.build(models.get_config("mistral", "tiny", sliding_window=4))
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    prompts = [[5, 9, 13], [7] * 10, [2, 3]]
    return model, params, prompts


def test_kv_cache_equals_full_forward_recompute(tiny):
    model, params, prompts = tiny
    out = generate(model, params, prompts, max_new_tokens=6)
    apply = jax.jit(lambda x: model.apply({"params": params}, x))  # right padding: causal, so harmless
    for prompt, new in zip(prompts, out):
        seq = list(prompt)
        for _ in range(6):
            logits = apply(jnp.asarray([seq + [0] * (16 - len(seq))]))
            seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
        assert new == seq[len(prompt):]


def test_sampling_seeded_and_top_k_one_is_greedy(tiny):
    model, params, prompts = tiny
    kw = dict(max_new_tokens=6, temperature=1.0)
    a = generate(model, params, prompts, seed=3, **kw)
    assert a == generate(model, params, prompts, seed=3, **kw)
    assert a != generate(model, params, prompts, seed=4, **kw)
    greedy = generate(model, params, prompts, max_new_tokens=6)
    assert generate(model, params, prompts, seed=5, top_k=1, **kw) == greedy
    assert generate(model, params, prompts, seed=5, top_p=1e-6, **kw) == greedy  # nucleus keeps the top token


def test_stop_tokens_end_rows_independently(tiny):
    model, params, prompts = tiny
    full = generate(model, params, prompts, max_new_tokens=6)
    stop = full[0][2]
    out = generate(model, params, prompts, max_new_tokens=6, stop_tokens=(stop,))
    for row, ref in zip(out, full):
        cut = ref.index(stop) if stop in ref else len(ref)
        assert row == ref[:cut]  # stop token excluded, nothing after it


def test_sample_tokens_top_k_and_top_p_support():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
    keys = jax.random.split(jax.random.key(0), 1)[0]
    draws = np.asarray(sample_tokens(logits, keys, top_k=2))
    assert set(draws) == {0, 1}
    assert abs((draws == 0).mean() - 0.5 / 0.8) < 0.05
    draws = np.asarray(sample_tokens(logits, keys, top_p=0.8))  # 0.5 + 0.3 reach 0.8: two tokens
    assert set(draws) == {0, 1}
    draws = np.asarray(sample_tokens(logits, keys, top_p=0.81))  # needs the third
    assert set(draws) == {0, 1, 2}
    draws = np.asarray(sample_tokens(logits, keys, temperature=1e-4))
    assert set(draws) == {0}


def test_buckets_and_left_padding():
    assert [bucket(n, 8) for n in (1, 8, 9, 17)] == [8, 8, 16, 32]
    b = left_pad([[4, 5], [6]], rows=4, length=4, pad_id=0)
    assert b["tokens"].tolist() == [[0, 0, 4, 5], [0, 0, 0, 6], [0, 0, 4, 5], [0, 0, 4, 5]]
    assert b["segment_ids"][1].tolist() == [0, 0, 0, 1] and b["positions"][0].tolist() == [0, 0, 0, 1]


def test_stop_strings_trim_decoded_text():
    assert truncate_at_stop_strings("a cat\nsat. End", ["\n", "."]) == "a cat"
    assert truncate_at_stop_strings("no stop", ["###"]) == "no stop"


@pytest.mark.parametrize("kwargs, needle", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=2, temperature=-1.0), "temperature"),
    (dict(max_new_tokens=2, top_k=0), "top_k"),
    (dict(max_new_tokens=2, top_p=1.5), "top_p"),
    (dict(max_new_tokens=10**6), "max_position_embeddings"),
])
def test_bad_arguments(tiny, kwargs, needle):
    model, params, _ = tiny
    with pytest.raises(UserError, match=needle):
        generate(model, params, [[1, 2]], **kwargs)
    with pytest.raises(UserError, match="empty"):
        generate(model, params, [[1], []], max_new_tokens=2)


def test_lora_adapters_generate_like_merged_weights():
    from jaxtune.peft import base as peft_base
    from jaxtune.peft import lora, wrapper

    spec = peft_base.Spec("lora", rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))
    config = models.get_config("llama", "tiny")
    model = wrapper.wrap(models.build(config), spec)
    variables = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    leaves, tree = jax.tree.flatten(variables[peft_base.COLLECTION])  # B starts at zero: make the adapters matter
    keys = jax.random.split(jax.random.key(1), len(leaves))
    adapters = jax.tree.unflatten(tree, [x + 0.5 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    prompts = [[5, 9, 13], [7] * 9]
    adapted = generate(model, {"params": variables["params"], peft_base.COLLECTION: adapters}, prompts,
                       max_new_tokens=6)
    merged_params = lora.merge(variables["params"], adapters, spec)
    merged = generate(models.build(config), merged_params, prompts, max_new_tokens=6)
    assert adapted == merged
    q = ("layers", "attn", "q_proj", "kernel")
    get = lambda tree: functools.reduce(lambda t, k: t[k], q, tree)
    assert not np.allclose(get(merged_params), get(variables["params"]))  # the adapters change the weights
