"""`jaxtune plan` for encoder-decoders: T5's FLOPs count (both streams, cross-attention) against
XLA's own count and a hand count of Flan-T5-XXL's weights, a tiny T5 planned on a TPU topology
with its weights sharded over fsdp and tensor, and the Flan-T5-XXL LoRA config fitting a v5e-8
slice (slow)."""

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from jaxtune import cli, models, sharding

REPO = Path(__file__).resolve().parents[1]
QUICKSTART_T5 = str(REPO / "configs" / "quickstart.py") + ":model=t5"


def _plan_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("variant", [pytest.param("tiny", marks=pytest.mark.slow), "tiny-v1.1"])  # ReLU + tied head; gated-GELU + untied
def test_t5_train_flops_equal_xla_count(variant):
    """One layer per stack, so XLA's cost analysis (which counts a scanned layer once) sees every
    layer; its count also has the softmax, norms and activations, hence the 3% tolerance."""
    cfg = models.get_config("t5", variant, vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=1,
                            num_heads=4, head_dim=32)
    model = models.build(cfg)
    batch, enc_len, dec_len = 2, 32, 16
    enc, dec = jnp.ones((batch, enc_len), jnp.int32), jnp.ones((batch, dec_len), jnp.int32)
    params = sharding.unbox(model.init(jax.random.key(0), enc, decoder_inputs=dec))["params"]

    def loss(p):
        return -jnp.mean(jax.nn.log_softmax(model.apply({"params": p}, enc, decoder_inputs=dec))[..., 0])

    cost = jax.jit(jax.grad(loss)).lower(params).compile().cost_analysis()
    xla = (cost[0] if isinstance(cost, list) else cost)["flops"]
    ours = cfg.train_flops(batch * enc_len, batch * dec_len, enc_len, dec_len)
    assert ours == pytest.approx(xla, rel=0.03)


def test_flan_t5_xxl_weight_flops_are_6n_of_its_matmul_weights():
    """Hand count: with one decoder token per encoder token and no attention scores, the FLOPs are
    6 x every weight a token pair multiplies, i.e. all 11.1B parameters but the embedding lookup,
    the norms' scales and the relative-bias tables."""
    cfg = models.get_config("t5", "flan-t5-xxl")
    shapes = jax.eval_shape(lambda: models.build(cfg).init(jax.random.key(0), jnp.ones((1, 4), jnp.int32)))
    sizes = {jax.tree_util.keystr(path): math.prod(leaf.shape)
             for path, leaf in jax.tree_util.tree_leaves_with_path(sharding.unbox(shapes)["params"])}
    total = sum(sizes.values())
    assert total == 11_135_332_352  # google/flan-t5-xxl
    not_multiplied = sum(n for name, n in sizes.items() if "embed" in name or "norm" in name or "rel_bias" in name)
    assert cfg.train_flops(1, 1, 0, 0) == 6 * (total - not_multiplied)
    # the scores: (encoder row + decoder row + cross) x 12 x width (4096) x layers (24) per token pair
    assert cfg.train_flops(1, 1, 512, 128) - cfg.train_flops(1, 1, 0, 0) == 12 * 4096 * 24 * (512 + 128 + 512)


@pytest.mark.slow
def test_plan_t5_on_a_tpu_topology_shards_fsdp_and_tensor(capsys):
    assert cli.main(["plan", "--config", QUICKSTART_T5, "--topology", "v5e:2x2", "--config.mesh.rules=fsdp_tp",
                     "--config.mesh.data=1", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
                     "--config.train.global_batch_size=4"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["fits"] and summary["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
    assert "'fsdp'" in out and "'tensor'" in out  # T5's weights split over both axes
    cfg = models.get_config("t5", "tiny-v1.1", vocab_size=summary["vocab_size"], hidden_size=128, intermediate_size=256,
                            num_layers=3, num_heads=4, head_dim=32)  # the quickstart's T5
    seq = 128
    assert summary["flops_per_step"] == pytest.approx(cfg.train_flops(4 * seq, 4 * seq, seq, seq))


@pytest.mark.slow
def test_flan_t5_xxl_lora_plans_as_fitting_a_v5e_8(capsys):
    assert cli.main(["plan", "--config", str(REPO / "configs" / "sft_lora.py") + ":family=t5,variant=flan-t5-xxl",
                     "--topology", "v5e-8"]) == 0
    summary = _plan_json(capsys)
    assert summary["fits"] and summary["devices"] == 8 and summary["device_kind"] == "TPU v5 lite"
    assert summary["memory_per_device"]["total"] <= 0.9 * summary["hbm_per_device"]
