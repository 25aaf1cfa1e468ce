"""`jaxtune plan`: the train step compiled for TPU topologies without TPUs (libtpu, the `tpu`
extra), multi-slice meshes, the out-of-memory exit, the MFU lookup by real device kinds, and
the LoRA frozen base's dtype."""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune import cli, metrics, objectives, plan, sharding, trainer, validation
from jaxtune import config as config_lib
from jaxtune.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SFT_TINY = str(REPO / "configs" / "sft_llama.py") + ":tiny"


def _plan_json(capsys) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


def _error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("jaxtune:")]
    assert len(err) == 1, err
    assert err[0].startswith("jaxtune: error: ")
    return err[0]


@pytest.mark.parametrize("kind, tflops", [
    ("TPU v5", 459.0), ("TPU v5 lite", 197.0), ("TPU v6 lite", 918.0), ("TPU v4", 275.0),
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA B200", 2250.0), ("cpu", None), ("TPU v7x", None),
])
def test_peak_flops_by_exact_device_kind(kind, tflops):
    assert metrics.peak_tflops_for(kind) == tflops
    expected = None if tflops is None else tflops * 1e12
    assert metrics.peak_flops_per_device(device_kind=kind) == expected


@pytest.mark.parametrize("name, topology", [
    ("v5p-8", "v5p:2x2x1"), ("v5p-16", "v5p:2x2x2"), ("v5p-64", "v5p:2x4x4"), ("v5litepod-8", "v5e:2x4"),
    ("v5e-8", "v5e:2x4"), ("v5e-16", "v5e:4x4"), ("v6e-8", "v6e:2x4"), ("v4-8", "v4:2x2x1"), ("v5p:4x4x2", "v5p:4x4x2"),
])
def test_cloud_names_translate_to_topologies(name, topology):
    assert plan.topology_name(name) == topology


@pytest.mark.parametrize("name", ["v5p-6", "tpu-8", "v5p"])
def test_bad_topology_names(name):
    with pytest.raises(UserError, match="--topology"):
        plan.topology_name(name)


def test_plan_sft_for_a_tpu_topology(capsys):
    assert cli.main(["plan", "--config", SFT_TINY, "--topology", "v5p-8", "--config.mesh.rules=fsdp",
                     "--config.mesh.fsdp=-1", "--config.mesh.data=1"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["topology"] == "v5p:2x2x1" and summary["device_kind"] == "TPU v5" and summary["devices"] == 4
    assert summary["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    memory = summary["memory_per_device"]
    assert memory["total"] == (memory["arguments"] + memory["outputs"] - memory["aliased"] + memory["temporaries"]
                               + memory["code"])
    assert summary["fits"] and 0 < memory["total"] < summary["hbm_per_device"]
    assert summary["largest_temporaries"] and summary["largest_temporaries"][0]["bytes"] > 0
    assert summary["peak_flops_per_device"] == 459e12 and summary["step_time_lower_bound_s"] > 0
    assert "P(None, 'fsdp')" in out or "P('fsdp'" in out  # weights are shown sharded over fsdp


def test_multi_slice_plan_puts_data_parallelism_across_slices(capsys):
    assert cli.main(["plan", "--config", SFT_TINY, "--topology", "v5e:4x4", "--num_slices", "2",
                     "--config.train.global_batch_size=32"]) == 0
    summary = _plan_json(capsys)
    assert summary["devices"] == 32 and summary["device_kind"] == "TPU v5 lite"
    assert summary["mesh"] == {"data": 32, "fsdp": 1, "tensor": 1}
    assert summary["dcn_mesh"] == {"data": 2, "fsdp": 1, "tensor": 1}


def test_hybrid_mesh_keeps_each_slice_together():
    devices = plan.tpu_devices("v5e:2x2", num_slices=2)
    c = config_lib.base_config()
    c.mesh.fsdp = -1
    c.mesh.data = 1
    ici, dcn = sharding.resolve_hybrid_mesh_shape(c.mesh, len(devices), sharding.slice_count(devices))
    assert (ici, dcn) == ({"data": 1, "fsdp": 4, "tensor": 1}, {"data": 2, "fsdp": 1, "tensor": 1})
    mesh = sharding.build_mesh(ici, devices, dcn_shape=dcn)
    slices = np.vectorize(lambda d: d.slice_index)(mesh.devices)
    assert (slices[0] == slices[0].flat[0]).all() and (slices[1] == slices[1].flat[0]).all()
    assert slices[0].flat[0] != slices[1].flat[0]


def test_plan_out_of_memory_exits_3(capsys):
    # 16M-token vocabulary: the embedding alone is 4 GiB, with Adam and gradients far over a v5e chip.
    code = cli.main(["plan", "--config", SFT_TINY, "--topology", "v5e:2x2", "--config.model.vocab_size=16777216",
                     "--config.train.global_batch_size=4"])
    assert code == 3
    line = _error_line(capsys)
    assert "does not fit" in line and "v5e:2x2" in line and "try" in line


def test_plan_without_libtpu_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "libtpu", None)  # as if jax[tpu] were not installed
    monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
    assert cli.main(["plan", "--config", SFT_TINY, "--topology", "v5p-8"]) == 2
    assert '.[tpu]' in _error_line(capsys)


def _largest_temporary(seq_len: int, batch: int, attention: str = "auto") -> int:
    c = validation.load_config(SFT_TINY, [f"data.seq_len={seq_len}", f"train.global_batch_size={batch}",
                                          "model.max_position_embeddings=8192", "model.dtype=bfloat16",
                                          f"model.attention={attention}"], needs_data=False)
    return plan.plan(c, topology="v5e:2x2").largest_temporaries[0][0]


def test_temporaries_grow_linearly_with_sequence_length():
    # The largest buffer, not the total: with a tiny model XLA's TPU scheduler keeps more buffers
    # live when HBM is plentiful, so the total is no clean measure (the 1B model's is, RESULTS.md).
    # Attention scores [B, heads, T, T] would make it grow 4x.
    short, long = _largest_temporary(512, 8), _largest_temporary(1024, 8)  # reference attention: 4.0x
    assert long <= 2.3 * short, (short, long)


def _lora_config(**overrides):
    c = validation.load_config(str(REPO / "configs" / "sft_lora.py"), [f"{k}={v}" for k, v in overrides.items()],
                               needs_data=False)
    return c


def test_lora_frozen_base_dtype_is_honoured():
    c = _lora_config(**{"peft.base_dtype": "bfloat16", "peft.targets": "q", "peft.rank": 2,
                        "train.global_batch_size": 2, "data.seq_len": 16})
    setup = trainer.build_setup(c, jax.devices()[:1])
    bf16, f32 = {jnp.dtype(jnp.bfloat16)}, {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(setup.abstract_state.frozen)} == bf16
    assert {x.dtype for x in jax.tree.leaves(setup.abstract_state.params)} == f32  # adapters keep param_dtype
    with jax.set_mesh(setup.mesh):
        state = setup.init_state(jax.random.key(0))
        stepped, _ = setup.train_step.lower(*setup.abstract_args()).out_info  # the step passes the base through
    assert {x.dtype for x in jax.tree.leaves(state.frozen)} == bf16
    assert {x.dtype for x in jax.tree.leaves(stepped.frozen)} == bf16
    default = trainer.build_setup(_lora_config(**{"train.global_batch_size": 2, "data.seq_len": 16}),
                                  jax.devices()[:1])
    assert {x.dtype for x in jax.tree.leaves(default.abstract_state.frozen)} == f32


def test_bad_base_dtype_is_a_user_error():
    with pytest.raises(UserError, match="peft.base_dtype"):
        _lora_config(**{"peft.base_dtype": "int8"})


@pytest.mark.slow
@pytest.mark.parametrize("spec, overrides", [
    ("sft_lora.py", ["--config.peft.base_dtype=bfloat16"]),
    ("sft_lora.py:quantize=nf4", []),
    ("dpo.py", ["--config.train.global_batch_size=8"]),
    ("dpo.py:loss=kto", ["--config.train.global_batch_size=8"]),
])
def test_plan_peft_and_preference_objectives(spec, overrides, capsys):
    assert cli.main(["plan", "--config", str(REPO / "configs" / spec), "--topology", "v5p-8", *overrides]) == 0
    summary = _plan_json(capsys)
    assert summary["fits"] and summary["memory_per_device"]["total"] > 0


def test_dpo_config_lora_method():
    c = validation.load_config(str(REPO / "configs" / "dpo.py") + ":variant=llama3.1-8b,method=lora", needs_data=False)
    assert c.peft.method == "lora" and c.peft.base_dtype == "bfloat16" and c.data.seq_len == 2048
    assert objectives.build(c).reference_kind() == "base"  # the base without adapters: no extra weights
    assert (c.mesh.data, c.mesh.fsdp) == (1, -1)


def test_ppo_plan_memory_counts_the_reference_copy_and_the_rollout_kv_cache():
    """PPO holds, outside the step, a copy of the start policy (full fine-tuning with a KL; the
    separate value model is not in it) and, while sampling, the KV cache of its rollout rows."""
    c = validation.load_config(str(REPO / "configs" / "ppo.py") + ":value_model=separate", needs_data=False)
    setup = trainer.build_setup(c, jax.devices()[:4])
    held = setup.objective.plan_memory(setup, num_processes=2)
    cfg, s = setup.model_config, c.objective.ppo
    policy = {k: v for k, v in setup.abstract_state.params.items() if k != "value_model"}
    assert "value_model" in setup.abstract_state.params
    assert held["reference copy"] == (sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(policy)), "always")  # dp: whole
    rows = s.num_prompts * 2 // 4  # both processes' prompts, split over the 4 data-parallel devices
    head_dim = cfg.hidden_size // cfg.num_heads
    per_token = cfg.num_layers * (2 * cfg.num_kv_heads * head_dim * 4 + 4)  # fp32 k and v, int32 segment ids
    assert held["rollout KV cache"] == (rows * c.data.seq_len * per_token, "sampling")
    lora = validation.load_config(str(REPO / "configs" / "ppo.py") + ":lora=4", needs_data=False)
    lora_setup = trainer.build_setup(lora, jax.devices()[:4])
    assert "reference copy" not in lora_setup.objective.plan_memory(lora_setup, num_processes=1)  # the base is it


@pytest.mark.slow
def test_plan_ppo_with_a_separate_value_model(capsys):
    """The PPO step (policy + value model) compiled for v5p-8, with the reference copy and the
    rollout KV cache added: the total is the larger of the training and sampling phases."""
    assert cli.main(["plan", "--config", str(REPO / "configs" / "ppo.py") + ":value_model=separate",
                     "--topology", "v5p-8"]) == 0
    summary = _plan_json(capsys)
    m = summary["memory_per_device"]
    assert m["objective:reference copy"] > 0 and m["objective:rollout KV cache"] > 0
    step = m["arguments"] + m["outputs"] - m["aliased"] + m["temporaries"] + m["code"]
    assert m["step_total"] == step + m["objective:reference copy"]
    assert m["sampling_total"] == m["arguments"] + m["objective:reference copy"] + m["objective:rollout KV cache"]
    assert m["total"] == max(m["step_total"], m["sampling_total"]) and summary["fits"]
