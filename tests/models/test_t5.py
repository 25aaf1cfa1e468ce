"""T5 / T5 v1.1 / mT5: logits parity with transformers (fp32, random weights, padded encoder inputs
and padded decoder targets), T5X-style packing equal to unpacked rows, relative position buckets,
config round trips, parameter counts of the published checkpoints and logical axes."""

import json

import jax
import jax.numpy as jnp

import numpy as np
import pytest
from flax import linen as nn

from jaxtune import models
from jaxtune.errors import UserError
from jaxtune.models import t5
from tests.models.t5_reference import VARIANTS, converted, hf_logits

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-5
ENC_LENGTHS = (20, 13, 6)  # row 0 full, row 1 right-padded, row 2 left-padded
DEC_LENGTHS = (9, 4, 5)
# Row 3 packs the examples of rows 1 and 2 (segments 1 and 2, positions restarting) in each stream.
PACKED = (1, 2)


def _batch(vocab: int, start: int):
    rng = np.random.default_rng(3)
    s, t = max(ENC_LENGTHS), max(DEC_LENGTHS)
    enc = np.zeros((3, s), np.int64)
    enc_mask = np.zeros((3, s), np.int64)
    for row, n in enumerate(ENC_LENGTHS):
        cols = slice(s - n, s) if row == 2 else slice(0, n)
        enc[row, cols] = rng.integers(2, vocab, n)
        enc_mask[row, cols] = 1
    targets = np.zeros((3, t), np.int64)
    dec_mask = np.zeros((3, t), np.int64)
    for row, n in enumerate(DEC_LENGTHS):
        targets[row, :n] = rng.integers(2, vocab, n)
        dec_mask[row, :n] = 1
    return enc, enc_mask, t5.shift_right(targets, start), dec_mask


def _packed_row(tokens, mask, lengths):
    """Row PACKED[0]'s example then row PACKED[1]'s, left-aligned: (tokens, segment ids, positions)."""
    out = [np.zeros(tokens.shape[1], np.int64) for _ in range(3)]
    at = 0
    for seg, row in enumerate(PACKED, start=1):
        n = lengths[row]
        out[0][at:at + n] = tokens[row][mask[row].astype(bool)]
        out[1][at:at + n] = seg
        out[2][at:at + n] = np.arange(n)
        at += n
    return out


def _ours(config, params, enc, enc_mask, dec, dec_mask):
    """Logits of the 3 padded rows plus the packed row, one call (one compile)."""
    pe, pd = _packed_row(enc, enc_mask, ENC_LENGTHS), _packed_row(dec, dec_mask, DEC_LENGTHS)
    arange = lambda x: np.broadcast_to(np.arange(x.shape[1]), x.shape)
    stack = lambda rows, extra: jnp.asarray(np.concatenate([rows, extra[None]]))
    model = models.build(config)
    return np.asarray(model.apply(
        {"params": params}, stack(enc, pe[0]), segment_ids=stack(enc_mask, pe[1]), positions=stack(arange(enc), pe[2]),
        decoder_inputs=stack(dec, pd[0]), decoder_segment_ids=stack(dec_mask, pd[1]),
        decoder_positions=stack(arange(dec), pd[2])))


@pytest.fixture(scope="module", params=list(VARIANTS))
def case(request):
    return request.param, *converted(request.param)


def test_config_from_hf(case):
    variant, hf, config, _ = case
    assert config.model_type == ("mt5" if variant == "mt5" else "t5")
    assert config.mlp_activation() == ((False, "relu") if variant == "t5" else (True, "gelu_new"))
    assert config.scale_decoder_outputs == (variant == "t5") == getattr(hf.config, "scale_decoder_outputs", False)
    assert (config.num_layers, config.resolved_decoder_layers) == (3, 2)


def test_logits_match_transformers_padded_and_packed(case):
    """Padded rows equal transformers (attention masks on both streams); a packed row (T5X-style:
    segments in both streams, positions restarting) gives each example its unpacked logits."""
    variant, hf, config, params = case
    batch = _batch(config.vocab_size, config.decoder_start_token_id)
    ours = _ours(config, params, *batch)
    theirs = hf_logits(hf, *batch)
    valid = batch[3].astype(bool)
    diff = np.abs(ours[:3] - theirs)[valid].max()
    print(f"{variant}: max |jaxtune - transformers| logit difference {diff:.2e}")
    assert diff <= TOL, diff
    assert np.ptp(theirs[valid]) > 0.5  # logits O(1): the test can see a wrong layer
    n = DEC_LENGTHS[PACKED[0]]
    np.testing.assert_allclose(ours[3, :n], ours[PACKED[0], :n], atol=TOL, rtol=0)
    np.testing.assert_allclose(ours[3, n:n + DEC_LENGTHS[PACKED[1]]], ours[PACKED[1], :DEC_LENGTHS[PACKED[1]]],
                               atol=TOL, rtol=0)


def test_relative_position_buckets_match_transformers():
    relative = np.arange(-300, 300)[None]
    ref = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (8, 12)):
            theirs = ref(torch.tensor(relative), bidirectional=bidirectional, num_buckets=buckets,
                         max_distance=distance).numpy()
            ours = t5.relative_position_bucket(jnp.asarray(relative), bidirectional=bidirectional,
                                               num_buckets=buckets, max_distance=distance)
            np.testing.assert_array_equal(np.asarray(ours), theirs)


def test_config_to_hf_round_trip(case):
    _, _, config, _ = case
    fam = models.FAMILIES["t5"]
    hf_dict = fam.config_to_hf(config)
    assert fam.config_from_hf(hf_dict) == config
    cls = transformers.MT5Config if config.model_type == "mt5" else transformers.T5Config
    ref = cls(**{k: v for k, v in hf_dict.items() if k not in ("architectures", "model_type", "torch_dtype")})
    assert ref.scale_decoder_outputs == config.scale_decoder_outputs or config.model_type == "mt5"


def test_decoder_inputs_are_shifted_targets():
    targets = np.array([[5, 6, 7, 1], [8, 1, 0, 0]])
    np.testing.assert_array_equal(t5.shift_right(targets, 0), [[0, 5, 6, 7], [0, 8, 1, 0]])
    np.testing.assert_array_equal(np.asarray(t5.shift_right(jnp.asarray(targets), 3))[:, 0], [3, 3])


def test_bad_feed_forward_proj_is_a_user_error():
    with pytest.raises(UserError, match="feed_forward_proj='gated-gelu-x'"):
        models.get_config("t5", "tiny", feed_forward_proj="gated-gelu-x")
    with pytest.raises(UserError, match="activation 'swish2'"):
        models.get_config("t5", "tiny", feed_forward_proj="gated-swish2")


@pytest.mark.parametrize("variant", ["tiny", "tiny-v1.1", "tiny-mt5"])
def test_every_param_has_logical_axes_and_an_hf_name(variant):
    config = models.get_config("t5", variant)
    boxed = jax.eval_shape(models.build(config).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
    allowed = {"vocab", "embed", "mlp", "heads", "head_dim", "layers", None}
    leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=is_box)
    maps = models.FAMILIES["t5"].hf_param_maps(config)
    assert {m.path for m in maps} == {tuple(k.key for k in path) for path, _ in leaves}
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path)
        assert is_box(leaf), name
        assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= allowed, (name, leaf.names)
        assert (leaf.names[0] == "layers") == ("['layers']" in name), (name, leaf.names)


REAL_VARIANTS = [
    ("t5-small", 60_506_624), ("flan-t5-small", 76_961_152), ("flan-t5-base", 247_577_856),
    ("flan-t5-xxl", 11_135_332_352), ("mt5-small", 300_176_768),
]


@pytest.mark.slow
@pytest.mark.parametrize("variant, expected", REAL_VARIANTS, ids=[v for v, _ in REAL_VARIANTS])
def test_param_counts_match_transformers(variant, expected):
    config = models.get_config("t5", variant)
    d = models.FAMILIES["t5"].config_to_hf(config)
    cls = transformers.MT5Config if config.model_type == "mt5" else transformers.T5Config
    arch = getattr(transformers, d["architectures"][0])
    with torch.device("meta"):
        ref = arch(cls(**{k: v for k, v in d.items() if k not in ("architectures", "model_type", "torch_dtype")}))
    hf_count = sum(p.numel() for p in ref.parameters())  # transformers ties the head of a from-config model
    if not config.tie_word_embeddings:
        hf_count += config.vocab_size * config.hidden_size  # ... which the published v1.1/mT5 files do not
    ours = models.count_params(config)
    assert ours == hf_count == expected, (ours, hf_count)


def _logits_from(config, params, batch):
    return _ours(config, params, *batch)[:3]


@pytest.mark.parametrize("variant", ["t5-v1.1", "mt5", "t5"])
def test_a_transformers_5_checkpoint_with_its_own_head_loads_untied(tmp_path, variant):
    """transformers >= 5 writes "tie_word_embeddings": true into every T5/mT5 config.json; a Flan-T5
    or mT5 it saved still carries its distinct lm_head.weight, which must be read (untied), and a
    tied model's file (no lm_head tensor) stays tied."""
    hf, config, params = converted(variant, seed=3)
    hf.save_pretrained(tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is True
    model, loaded = models.from_pretrained(tmp_path / "hf", dtype="float32")
    assert model.config.tie_word_embeddings == config.tie_word_embeddings
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("variant", ["t5-v1.1", pytest.param("t5", marks=pytest.mark.slow),
                                     pytest.param("mt5", marks=pytest.mark.slow)])
def test_export_loads_in_transformers_and_back(tmp_path, variant):
    """save_pretrained (sharded safetensors) -> transformers' T5/MT5ForConditionalGeneration gives our
    logits; from_pretrained reads it back to the same config and params."""
    _, config, params = converted(variant, seed=1)
    batch = _batch(config.vocab_size, config.decoder_start_token_id)
    out = models.save_pretrained(config, params, tmp_path / "hf", max_shard_size="20KB")
    hf = getattr(transformers, models.FAMILIES["t5"].config_to_hf(config)["architectures"][0]).from_pretrained(out)
    valid = batch[3].astype(bool)
    ours = _logits_from(config, params, batch)
    np.testing.assert_allclose(hf_logits(hf.eval(), *batch)[valid], ours[valid], atol=TOL, rtol=0)
    model2, params2 = models.from_pretrained(out, dtype="float32")
    assert model2.config == config
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_loads_a_transformers_checkpoint_with_embedding_copies(tmp_path):
    """A checkpoint written by transformers loads; the stacks' copies of the shared embedding
    (older T5 files hold them) are skipped, any other unused tensor is still an error."""
    hf, config, params = converted("t5", seed=2)
    hf.save_pretrained(tmp_path / "hf")
    from safetensors.numpy import load_file, save_file

    file = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(file)
    tensors["encoder.embed_tokens.weight"] = tensors["shared.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    model, loaded = models.from_pretrained(tmp_path / "hf", dtype="float32")
    assert model.config == config
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    tensors["encoder.block.0.layer.0.SelfAttention.extra.weight"] = tensors["shared.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"tensors the model does not use.*extra"):
        models.from_pretrained(tmp_path / "hf", dtype="float32")


@pytest.mark.parametrize("variant", ["t5-v1.1", pytest.param("t5", marks=pytest.mark.slow),
                                     pytest.param("mt5", marks=pytest.mark.slow)])
def test_greedy_generation_matches_transformers_generate(variant):
    """KV-cache decoding (encoder output once, decoder self-attention cache, cross-attention keys
    and values from the first step) gives transformers.generate's greedy tokens, padded prompts."""
    from jaxtune.generate import generate

    hf, config, params = converted(variant, seed=4)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(2, config.vocab_size, n).tolist() for n in (3, 11, 7)]
    new_tokens, eos = 10, config.vocab_size - 1  # min_new_tokens keeps HF from stopping: neither side stops
    ours = generate(models.build(config), params, prompts, max_new_tokens=new_tokens, pad_id=config.pad_token_id)
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        theirs = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=0, decoder_start_token_id=0)
    assert theirs[:, 0].tolist() == [config.decoder_start_token_id] * 3
    assert ours == theirs[:, 1:].tolist()
    assert len({tuple(o) for o in ours}) == 3  # the prompts lead to different outputs


@pytest.mark.slow
def test_guide_examples_run(tmp_path, monkeypatch):
    """The Python blocks of docs/guides/t5.md, run in order as one script."""
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "docs" / "guides" / "t5.md").read_text()
    code = "\n".join(re.findall(r"```python\n(.*?)```", page, re.S))
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "docs/guides/t5.md", "exec"), scope)  # the repository's own docs
    assert scope["logits"].shape == (1, 3, scope["config"].vocab_size)
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
