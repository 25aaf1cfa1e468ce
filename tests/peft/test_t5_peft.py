"""PEFT on T5 (an encoder-decoder): LoRA / rsLoRA / DoRA adapters on T5 v1.1's projections
(HF names q, v, wo...; self- and cross-attention alike, as PEFT's target_modules match them)
export in PEFT's format and load in `peft` (PeftModelForSeq2SeqLM) with equal logits; KV-cache
generation runs through the wrapper; prefix tuning is refused with a clear error."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune import models
from jaxtune.errors import UserError
from jaxtune.generate import generate
from jaxtune.peft import base as peft_base
from jaxtune.peft import export, wrapper
from tests.models.t5_reference import converted, hf_logits
from tests.models.test_t5 import _batch
from tests.peft.test_export import trained_like_adapters

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

TOL = 1e-4  # as tests/peft/test_export.py: adapters on unscaled T5 attention make fp32 round-off grow
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
