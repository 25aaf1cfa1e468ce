"""Hugging Face checkpoint interop: safetensors <-> sharded params, tokenizer.json, convert CLI.

Random tiny models built from transformers config objects; nothing is downloaded.
"""

from __future__ import annotations

import json
import pickle

import jax
import numpy as np
import pytest
import torch
import transformers

from jaxtune import cli, models, sharding
from jaxtune.data import tokenizers as tokenizers_lib
from jaxtune.errors import UserError
from jaxtune.models import hf
from tests import helpers

TOKENS = np.random.default_rng(0).integers(0, 203, size=(2, 11)).astype(np.int32)


def _hf_llama(dtype=torch.float32, tie=False, vocab_size=203):
    """Odd sizes, GQA (6 heads, 2 kv heads), non-trivial norm weights."""
    cfg = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=48, intermediate_size=100, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie, rope_theta=10000.0,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    return model.to(dtype)


def _hf_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def _jax_logits(model, params, tokens) -> np.ndarray:
    return np.asarray(model.apply({"params": params}, tokens), dtype=np.float32)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A multi-shard fp32 HF Llama checkpoint."""
    d = tmp_path_factory.mktemp("hf_llama")
    model = _hf_llama()
    model.save_pretrained(d, max_shard_size="100KB")
    return d, model


def test_from_pretrained_sharded_checkpoint_matches_hf_and_is_sharded(hf_dir):
    d, hf_model = hf_dir
    assert (d / hf.INDEX_FILE).exists() and len(list(d.glob("*.safetensors"))) > 2
    mesh = sharding.build_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    model, params = models.from_pretrained(d, mesh=mesh, rules="fsdp")
    assert model.config.param_dtype == "float32" and model.config.num_kv_heads == 2
    diff = np.abs(_jax_logits(model, params, TOKENS) - _hf_logits(hf_model, TOKENS)).max()
    assert diff <= 1e-4, diff

    expected = sharding.logical_shardings(hf._abstract_boxed_params(model), mesh, sharding.rules("fsdp"))
    sharded = 0
    for (path, x), want in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(expected)):
        assert x.sharding.is_equivalent_to(want, x.ndim), (path, x.sharding, want)
        assert len(x.sharding.device_set) == 8
        if x.addressable_shards[0].data.shape != x.shape:
            sharded += 1
    assert sharded >= 8  # every kernel with an embed (48 = 8 x 6) dimension is split


def test_bf16_checkpoint_loads_in_bf16(tmp_path):
    model = _hf_llama(dtype=torch.bfloat16, tie=True)
    model.save_pretrained(tmp_path)
    jmodel, params = models.from_pretrained(tmp_path)
    assert jmodel.config.param_dtype == "bfloat16" and jmodel.config.tie_word_embeddings
    emb = params["embed"]["embedding"]
    assert emb.dtype == jax.numpy.bfloat16
    np.testing.assert_array_equal(
        np.asarray(emb, np.float32), model.model.embed_tokens.weight.detach().float().numpy()
    )
    # Also loads into float32 on request.
    jmodel32, params32 = models.from_pretrained(tmp_path, dtype="float32")
    diff = np.abs(_jax_logits(jmodel32, params32, TOKENS) - _hf_logits(model.float(), TOKENS)).max()
    assert diff <= 1e-4, diff


def _roundtrip_families():
    out = []
    for name, fam in sorted(models.FAMILIES.items()):
        if "tiny" not in fam.variants or fam.is_encoder_decoder:  # T5: tests/models/test_t5.py
            continue
        arch = fam.config_to_hf(fam.variants["tiny"]).get("architectures", [None])[0]
        if arch and hasattr(transformers, arch):
            out.append(name)
    return out


@pytest.mark.parametrize("family", _roundtrip_families())
def test_save_pretrained_loads_in_transformers(tmp_path, family):
    config = models.get_config(family, "tiny")
    model = models.build(config)
    params = model.init(jax.random.key(1), TOKENS[:, :4])["params"]
    params = sharding.unbox(params)
    # Perturb norm scales (initialised to ones) so a swapped norm would show.
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.1 * jax.random.normal(jax.random.key(len(p)), x.shape, x.dtype)
        if "scale" in jax.tree_util.keystr(p) else x, params,
    )
    tokens = TOKENS % config.vocab_size
    out = hf.save_pretrained(config, params, tmp_path / "out", max_shard_size="50KB")
    assert (out / hf.INDEX_FILE).exists()
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    diff = np.abs(_hf_logits(hf_model, tokens) - _jax_logits(model, params, tokens)).max()
    assert diff <= 1e-4, diff
    # ... and back.
    model2, params2 = models.from_pretrained(out)
    fam = models.FAMILIES[family]
    assert fam.config_to_hf(model2.config) == fam.config_to_hf(config)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_wrong_shape_tensor_is_an_error_naming_it(hf_dir, tmp_path):
    d, _ = hf_dir
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in d.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight.*\[100, 48\].*expected \[96, 48\]"):
        models.from_pretrained(bad)


def test_unsupported_model_type_is_an_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(UserError, match="model_type 'bert' is not supported; supported: .*llama"):
        models.from_pretrained(tmp_path)


# ------------------------------------------------------------------ tokenizer


def _write_hf_tokenizer(directory, vocab_size=120):
    from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers, trainers

    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    texts = [" ".join(helpers.WORDS[(i * 7 + j) % len(helpers.WORDS)] for j in range(5)) + " = reverse:" for i in range(200)]
    tok.train_from_iterator(texts, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(directory)
    return fast


def test_hf_tokenizer_from_dir(tmp_path):
    fast = _write_hf_tokenizer(tmp_path)
    tok = tokenizers_lib.load_tokenizer(tmp_path)
    assert isinstance(tok, tokenizers_lib.HFTokenizer)
    assert isinstance(tok, tokenizers_lib.Tokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size == len(fast)
    text = "reverse: red cat = tac der!"
    ids = tok.encode(text)
    assert ids == fast.encode(text, add_special_tokens=False)
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id, tok.pad_id]) == text
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(text) == ids and clone.eos_id == tok.eos_id
    assert tokenizers_lib.load_tokenizer(tmp_path / "tokenizer.json").encode(text) == ids


# ------------------------------------------------------------------ trainer + CLI


def test_train_from_hf_dir_then_convert_back(tmp_path, capsys):
    d = tmp_path / "hf"
    _write_hf_tokenizer(d)  # byte-level BPE: 256 bytes + specials + merges
    hf_model = _hf_llama(vocab_size=300)
    hf_model.save_pretrained(d, max_shard_size="100KB")
    config = helpers.tiny_config(
        tmp_path, **{"model.hf_dir": str(d), "train.steps": 3, "train.checkpoint_every": 3, "mesh.rules": "fsdp",
                     "mesh.fsdp": 8, "train.async_checkpoints": False, "optim.lr": 1e-3, "optim.warmup_steps": 0}
    )
    from jaxtune import trainer

    assert trainer.model_config_from(config).hidden_size == 48
    summary = trainer.train(config, tmp_path / "run")
    assert summary.steps == 3 and np.isfinite(summary.metrics["loss"])
    # A pretrained model's first loss is not ln(vocab) of a random init: check it's the HF model's.
    # (Weights changed by 3 steps at lr 1e-3 still keep logits close to the original model's.)
    out = tmp_path / "exported"
    assert cli.main(["convert", "--workdir", str(tmp_path / "run"), "--hf_out", str(out)]) == 0
    assert (out / "tokenizer.json").exists()
    exported = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    a, b = _hf_logits(exported, TOKENS), _hf_logits(hf_model, TOKENS)
    assert 0 < np.abs(a - b).max() < 0.5  # trained, but started from the checkpoint


def test_convert_hf_to_orbax_and_back(hf_dir, tmp_path, capsys):
    d, hf_model = hf_dir
    w = tmp_path / "w"
    assert cli.main(["convert", "--hf_dir", str(d), "--out", str(w)]) == 0
    assert (w / "checkpoints" / "0").is_dir()
    out = tmp_path / "back"
    assert cli.main(["convert", "--workdir", str(w), "--hf_out", str(out), "--max_shard_size", "1GB"]) == 0
    assert (out / hf.SINGLE_FILE).exists()
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    np.testing.assert_array_equal(_hf_logits(back, TOKENS), _hf_logits(hf_model, TOKENS))

    capsys.readouterr()
    assert cli.main(["convert", "--hf_dir", str(tmp_path / "missing"), "--out", str(w)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxtune: error:") and "config.json" in err
