"""PEFT on T5 (an encoder-decoder): LoRA / rsLoRA / DoRA adapters on T5 v1.1's projections
(HF names q, v, wo...; self- and cross-attention alike, as PEFT's target_modules match them)
export in PEFT's format and load in `peft` (PeftModelForSeq2SeqLM) with equal logits; KV-cache
generation runs through the wrapper; `peft.targets` in a run config name T5's projections, and a
`jaxtune train` run (LoRA, rsLoRA, DoRA, QLoRA) exports adapters `peft` loads with equal logits;
prefix tuning and targets a model lacks are refused with a clear error."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune import cli, inference, loading, models, trainer, validation
from jaxtune.errors import UserError
from jaxtune.generate import generate
from jaxtune.peft import base as peft_base
from jaxtune.peft import export, wrapper
from tests.models.t5_reference import converted, hf_logits
from tests.models.test_t5 import _batch
from tests import helpers
from tests.peft.test_export import trained_like_adapters

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

TOL = 1e-5  # fp32; measured 2.4e-6 (LoRA), 6.1e-6 (rsLoRA), 2.7e-6 (DoRA)
SPECS = {
    "lora": dict(targets=("q", "v", "wo")),
    "rslora": dict(targets=("q", "k", "v", "o", "wi_0", "wi_1", "wo"), rslora=True),
    "dora": dict(targets=("q", "o", "wi_1"), method="dora"),
}


def _logits(model, variables, batch):
    enc, enc_mask, dec, dec_mask = (jnp.asarray(x) for x in batch)
    return np.asarray(jax.jit(lambda v: model.apply(v, enc, segment_ids=enc_mask, decoder_inputs=dec,
                                                    decoder_segment_ids=dec_mask))(variables))


def _adapted(kind: str, tmp_path):
    """(PEFT model on the HF base, jaxtune config, base params, spec, adapters, wrapped model)."""
    hf, config, base = converted("t5-v1.1", seed=6)
    base = jax.tree.map(jnp.asarray, base)
    spec = peft_base.Spec(**{"method": "lora", "rank": 4, "alpha": 12.0, **SPECS[kind]})
    # test_export's trained-like adapters, B scaled down: T5's unscaled attention turns large query
    # perturbations into near one-hot softmaxes where fp32 round-off (PEFT's own vs fp64) passes 1e-4.
    adapters = jax.tree_util.tree_map_with_path(
        lambda path, x: x * 0.3 if path[-1].key == "lora_b" else x, trained_like_adapters(config, base, spec))
    out = export.export_peft(config, spec, adapters, tmp_path / "adapter")
    peft_model = peft.PeftModel.from_pretrained(hf, str(out)).eval()
    return peft_model, config, base, spec, adapters, wrapper.wrap(models.build(config), spec)


@pytest.mark.parametrize("kind", ["lora", pytest.param("rslora", marks=pytest.mark.slow),
                                  pytest.param("dora", marks=pytest.mark.slow)])
def test_peft_loads_exported_t5_adapters_with_equal_logits(kind, tmp_path):
    peft_model, config, base, spec, adapters, model = _adapted(kind, tmp_path)
    batch = _batch(config.vocab_size, config.decoder_start_token_id)
    valid = batch[3].astype(bool)
    ours = _logits(model, {"params": base, "lora": adapters}, batch)[valid]
    base_logits = _logits(model, {"params": base}, batch)[valid]

    written = json.loads((tmp_path / "adapter" / export.CONFIG_FILE).read_text())
    assert written["task_type"] == "SEQ_2_SEQ_LM" and written["target_modules"] == sorted(spec.targets)
    assert type(peft_model).__name__ == "PeftModelForSeq2SeqLM"
    theirs = hf_logits(peft_model, *batch)[valid]
    with peft_model.disable_adapter():  # PEFT's base is jaxtune's base
        np.testing.assert_allclose(hf_logits(peft_model, *batch)[valid], base_logits, atol=TOL, rtol=0)
    assert np.abs(ours - base_logits).max() > 0.1  # the adapters change the model
    diff = float(np.abs(ours - theirs).max())
    print(f"t5-v1.1/{kind}: max |jaxtune - peft| = {diff:.1e}")
    assert diff <= TOL


@pytest.mark.slow
def test_adapted_t5_generates_as_peft(tmp_path):
    peft_model, config, base, spec, adapters, model = _adapted("rslora", tmp_path)
    # The wrapped model decodes with its KV cache (adapters in encoder, decoder and cross-attention);
    # both sides stop at eos (the last vocabulary id), so an eos-suppressing min length plays no part.
    prompts, eos = [[5, 9, 13, 1], [7, 1]], config.vocab_size - 1
    with torch.no_grad():
        ids = torch.tensor([[5, 9, 13, 1], [0, 0, 7, 1]])
        hf_out = peft_model.generate(input_ids=ids, attention_mask=(ids != 0).long(), do_sample=False,
                                     max_new_tokens=6, eos_token_id=eos, pad_token_id=0, decoder_start_token_id=0)
    expected = [row[1:row.index(eos)] if eos in row else row[1:] for row in hf_out.tolist()]
    ours = generate(model, {"params": base, "lora": adapters}, prompts, max_new_tokens=6, stop_tokens=(eos,))
    assert ours == expected


def test_prefix_tuning_on_t5_is_a_clear_error():
    spec = peft_base.Spec(method="prefix", prefix_length=4)
    with pytest.raises(UserError, match="prefix tuning is not supported for encoder-decoder"):
        wrapper.wrap(models.build(models.get_config("t5", "tiny")), spec)


# ---- peft.* in a run config ------------------------------------------------------------------


def _t5_config(tmp_path, variant="tiny-v1.1", **overrides):
    c = helpers.tiny_base_config(helpers.write_sft_jsonl(tmp_path / "train.jsonl"))
    c.model.family, c.model.variant = "t5", variant
    c.model.num_kv_heads = None
    c.lock()
    validation.apply_overrides(c, [f"{k}={v}" for k, v in overrides.items()])
    return c


@pytest.mark.parametrize("variant, targets, expected", [
    ("tiny-v1.1", "q,v,wi_0,wo", ("q", "v", "wi_0", "wo")),
    ("tiny-v1.1", "all-linear", ("q", "k", "v", "o", "wi_0", "wi_1", "wo")),
    ("tiny", "all-linear", ("q", "k", "v", "o", "wi", "wo")),  # T5 v1.0: one (ReLU) wi
    ("tiny", "o,wi", ("o", "wi")),
])
def test_config_targets_name_t5_projections(tmp_path, variant, targets, expected):
    c = _t5_config(tmp_path, variant, **{"peft.method": "lora", "peft.targets": targets})
    validation.validate(c)
    assert loading.peft_spec(c).targets == expected


@pytest.mark.parametrize("variant, overrides, message", [
    ("tiny-v1.1", {"peft.targets": "q,wi"}, "unknown target 'wi'; valid targets: q, k, v, o, wi_0, wi_1, wo, all-linear$"),
    ("tiny", {"peft.targets": "wi_1"}, "unknown target 'wi_1'; valid targets: q, k, v, o, wi, wo, all-linear$"),
    ("tiny-v1.1", {"peft.targets": "q_proj,v"}, "unknown target 'q_proj'"),
    ("tiny-v1.1", {"peft.targets": "gate"}, "unknown target 'gate'"),
    ("tiny-v1.1", {"peft.method": "prefix"}, "prefix tuning is not supported for encoder-decoder"),
])
def test_bad_t5_peft_config_is_a_clear_error(tmp_path, variant, overrides, message):
    c = _t5_config(tmp_path, variant, **{"peft.method": "lora", **overrides})
    with pytest.raises(UserError, match=message):
        validation.validate(c)
        loading.build_model(c, loading.model_config_from(c))


def test_sft_lora_config_trains_a_t5_with_its_target_names(tmp_path):
    train = helpers.write_sft_jsonl(tmp_path / "train.jsonl")
    c = validation.load_config("configs/sft_lora.py:family=t5,variant=tiny-v1.1,method=dora,quantize=nf4,targets=q+wi_0",
                               [f"data.train_path={train}"])
    spec = loading.peft_spec(c)
    assert spec.targets == ("q", "wi_0") and spec.dora and spec.quantize == "nf4"
    assert loading.peft_spec(validation.load_config("configs/sft_lora.py:family=t5,variant=tiny",  # all-linear
                                                    [f"data.train_path={train}"])).targets == ("q", "k", "v", "o", "wi", "wo")


def test_decoder_only_targets_stay_decoder_names(tmp_path):
    c = helpers.tiny_config(tmp_path, **{"peft.method": "lora", "peft.targets": "q,down"})
    assert loading.peft_spec(c).targets == ("q_proj", "down_proj")
    with pytest.raises(UserError, match="unknown target 'wi_0'; valid targets: q, k, v, o, gate, up, down, all-linear"):
        helpers.tiny_config(tmp_path, **{"peft.method": "lora", "peft.targets": "wi_0"})


def test_targets_a_model_lacks_are_an_error_from_python():
    t5_model = models.build(models.get_config("t5", "tiny-v1.1"))
    with pytest.raises(UserError, match=r"targets q_proj, wi name no projection of this T5 model; its projections: "
                                        r"q, k, v, o, wi_0, wi_1, wo"):
        wrapper.wrap(t5_model, peft_base.Spec(method="lora", rank=2, alpha=4.0, targets=("q_proj", "wi", "v")))
    with pytest.raises(UserError, match="targets wo name no projection of this Llama model"):
        wrapper.wrap(models.build(models.get_config("llama", "tiny")),
                     peft_base.Spec(method="lora", rank=2, alpha=4.0, targets=("q_proj", "wo")))


# ---- a jaxtune train run -> jaxtune export --peft -> peft ------------------------------------

RUNS = {  # kind -> peft.* overrides of the run
    "lora": {"peft.method": "lora", "peft.targets": "q,v,wi_0,wo"},
    "rslora": {"peft.method": "lora", "peft.rslora": True, "peft.targets": "all-linear"},
    "dora": {"peft.method": "dora", "peft.targets": "k,o,wi_1"},
    "qlora": {"peft.method": "lora", "peft.quantize": "nf4", "peft.targets": "q,k,v,o,wo"},
}


def _hf_t5_dir(d):
    """A tiny random T5 v1.1 (gated-GELU, untied head) with an HF tokenizer, saved as a model dir."""
    import transformers

    from tests.models.test_hf_io import _write_hf_tokenizer

    tok = _write_hf_tokenizer(d, vocab_size=160)
    torch.manual_seed(0)
    hf_config = transformers.T5Config(
        vocab_size=len(tok), d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, dropout_rate=0.0, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id, initializer_factor=0.2)  # O(1) logits, loss near ln(vocab)
    transformers.T5ForConditionalGeneration(hf_config).save_pretrained(d)
    return d


def _dequantized_hf_dir(run, out):
    """The QLoRA run's base as it trained (NF4 kernels dequantised to fp32), saved as an HF model dir."""
    from jaxtune.peft import quant

    float_base = loading.base_params(run.config, run.model_config, as_held=False)
    base = quant.dequantize_params(loading.base_params(run.config, run.model_config), float_base)
    assert float(max(jax.tree.leaves(jax.tree.map(lambda a, b: jnp.abs(a - b).max(), base, float_base)))) > 0
    return models.save_pretrained(run.model_config, base, out)


@pytest.mark.slow  # a jaxtune train run per method; the default suite keeps the Python-API parity above
@pytest.mark.parametrize("kind", list(RUNS))
def test_t5_peft_run_exports_adapters_peft_loads_with_equal_logits(kind, tmp_path):
    import transformers

    d = _hf_t5_dir(tmp_path / "hf")
    c = helpers.tiny_base_config(helpers.write_sft_jsonl(tmp_path / "train.jsonl"))
    c.lock()
    validation.apply_overrides(c, [f"{k}={v}" for k, v in {
        "model.hf_dir": str(d), "train.steps": 3, "train.checkpoint_every": 3, "optim.lr": 3e-2,
        "optim.warmup_steps": 0, **RUNS[kind]}.items()])
    validation.validate(c)
    trainer.train(c, tmp_path / "run")
    assert cli.main(["export", "--workdir", str(tmp_path / "run"), "--peft", str(tmp_path / "adapter"),
                     "--merged", str(tmp_path / "merged")]) == 0

    loaded = inference.from_workdir(str(tmp_path / "run"))
    batch = _batch(loaded.model.config.vocab_size, loaded.model.config.decoder_start_token_id)
    valid = batch[3].astype(bool)
    ours = _logits(loaded.model, loaded.params, batch)[valid]
    base_dir = d
    if kind == "qlora":  # peft's base: the NF4 base jaxtune trained against, dequantised (see the guide)
        base_dir = _dequantized_hf_dir(inference.restore_run(str(tmp_path / "run"), "--workdir"), tmp_path / "nf4")
    hf = transformers.T5ForConditionalGeneration.from_pretrained(base_dir, attn_implementation="eager").eval()
    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    theirs = hf_logits(peft_model, *batch)[valid]
    with peft_model.disable_adapter():
        base_logits = hf_logits(peft_model, *batch)[valid]
    assert np.abs(theirs - base_logits).max() > 1e-3  # the trained adapters change the model
    merged = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "merged", attn_implementation="eager")
    merged_logits = hf_logits(merged.eval(), *batch)[valid]  # adapters folded in (QLoRA: into the dequantised base)
    diff, merged_diff = float(np.abs(ours - theirs).max()), float(np.abs(merged_logits - theirs).max())
    print(f"jaxtune train t5/{kind}: max |jaxtune - peft| = {diff:.1e}, |merged - peft| = {merged_diff:.1e} "
          f"(logits up to {np.abs(theirs).max():.1f})")
    assert diff <= 1e-5 and merged_diff <= 1e-5
