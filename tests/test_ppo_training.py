"""PPO end to end on a tiny model: rollouts scored by verifiers, the value head on the policy's
backbone, TRL's metric names, exact resume (full and LoRA), and config errors."""

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxtune import trainer, validation
from jaxtune.errors import UserError
from jaxtune.metrics import read_metrics
from jaxtune.objectives import ppo_loss


SMALL = {  # a tiny model and run (the SFT stage of configs/grpo.py shares these)
    "model.hidden_size": 32, "model.intermediate_size": 64, "model.num_layers": 2, "model.num_heads": 4,
    "model.num_kv_heads": 2, "data.seq_len": 96, "data.num_train_examples": 64, "data.num_eval_examples": 0,
    "data.packing": False, "train.global_batch_size": 8, "train.steps": 4, "train.eval_every": 0,
    "train.checkpoint_every": 2, "train.log_every": 1, "train.max_seconds": 0.0, "train.progress_bar": False,
    "optim.lr": 1e-2, "optim.warmup_steps": 0, "eval.show_examples": 0,
}
SMALL_PPO = {"objective.ppo.num_prompts": 8, "objective.ppo.max_completion_tokens": 6,
             "objective.ppo.num_ppo_epochs": 2, "objective.ppo.num_mini_batches": 1}


def ppo_config(config_file="configs/ppo.py", **overrides):
    c = validation.load_config(config_file, ())
    c.unlock()
    small = {**SMALL, **(SMALL_PPO if c.objective.type == "ppo" else {})}
    for key, value in {**small, **overrides}.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    c.lock()
    validation.validate(c)
    return c


def _params(workdir, step):
    with ocp.CheckpointManager(workdir / "checkpoints") as m:
        return m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state["params"]


@pytest.mark.slow  # ~1 min each on 2 shared cores: three short runs (compiles dominate)
@pytest.mark.parametrize("overrides", [
    # full fine-tuning from an SFT run (model.init_from: the decoder read, the value head seeded); the
    # reference is a copy of the start weights
    {"model.init_from": "SFT"},
    # LoRA: the base without adapters is the reference; packed rows, k3, one rollout of two mini-batches
    {"peft.method": "lora", "peft.rank": 4, "objective.ppo.kl_estimator": "k3", "data.packing": True,
     "objective.ppo.num_ppo_epochs": 1, "objective.ppo.num_mini_batches": 2},
    # LoRA with the value model on its own backbone (copied from the policy into the frozen base, which
    # a resume re-creates) and the adaptive KL coefficient (saved beside the checkpoint)
    {"peft.method": "lora", "peft.rank": 4, "objective.ppo.value_model": "separate",
     "objective.ppo.kl_controller": "adaptive", "objective.ppo.kl_target": 0.1, "objective.ppo.kl_horizon": 10.0},
], ids=["full-sft-init", "lora-packed-k3", "lora-separate-adaptive"])
def test_ppo_trains_and_resumes_exactly(tmp_path, overrides):
    if overrides.get("model.init_from") == "SFT":
        sft = ppo_config("configs/grpo.py:stage=sft", **{"train.steps": 1, "train.checkpoint_every": 1})
        trainer.train(sft, tmp_path / "sft")
        overrides = {**overrides, "model.init_from": str(tmp_path / "sft")}
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    trainer.train(ppo_config(**overrides), reference)
    trainer.train(ppo_config(**{**overrides, "train.steps": 2}), resumed)  # stops at a checkpoint
    trainer.train(ppo_config(**overrides), resumed)  # the same run, resumed at step 2 (a new rollout)
    rows = [r for r in read_metrics(reference) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in set(ppo_loss.METRIC_NAMES) - {"val/ratio_var"}:
        assert key in rows[0], key
    assert rows[0]["val/ratio"] == pytest.approx(1.0, abs=1e-5)  # the first step is the sampling policy
    assert rows[0]["policy/clipfrac_avg"] == 0.0
    assert rows[1]["val/ratio"] != pytest.approx(1.0, abs=1e-7)  # later mini-batches: the policy moved
    assert all(np.isfinite(r["loss"]) for r in rows)
    again = {r["step"]: r["loss"] for r in read_metrics(resumed) if "loss" in r}
    assert again == {r["step"]: r["loss"] for r in rows}
    params = _params(reference, 4)
    if overrides.get("objective.ppo.value_model") == "separate":
        assert "value_model" in params and "value_head" not in params  # its own adapters (LoRA)
        assert rows[2]["objective/kl_coef"] != rows[0]["objective/kl_coef"]  # the controller moved it
    else:
        assert "value_head" in params  # the value head is trained (LoRA: its delta)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(_params(resumed, 4))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("overrides, message", [
    ({"objective.ppo.kl_estimator": "k2"}, "objective.ppo.kl_estimator' must be one of k1, k3"),
    ({"objective.ppo.lam": 1.5}, r"objective.ppo.lam' must be in \[0, 1\]"),
    ({"objective.ppo.cliprange": 0.0}, r"objective.ppo.cliprange' must be in \(0, 1\)"),
    ({"objective.ppo.num_ppo_epochs": 0}, "objective.ppo.num_ppo_epochs' must be >= 1"),
    ({"objective.ppo.missing_eos_penalty": -1.0}, "missing_eos_penalty' must be >= 0 or None"),
    ({"objective.ppo.reference": "base"}, "'base': that needs peft.method"),
    ({"train.checkpoint_every": 3}, r"must be a multiple of objective.ppo.num_ppo_epochs \* num_mini_batches \(2\)"),
    ({"data.builtin": "quickstart"}, "objective.type' is 'ppo': prompts come from"),
    ({"objective.ppo.rewards": ("math",)}, "1 reward functions but 2 weights"),
    ({"objective.ppo.value_model": "critic"}, "objective.ppo.value_model' must be one of shared, separate"),
    ({"objective.ppo.value_init": "/nonexistent"}, "objective.ppo.value_init' must be 'policy' with value_model"),
    ({"objective.ppo.value_model": "separate", "objective.ppo.value_init": "reward_model:/nonexistent/rm"},
     "objective.ppo.value_init' is 'reward_model:/nonexistent/rm': expected 'policy', a reward run's workdir"),
    ({"objective.ppo.kl_controller": "pid"}, "objective.ppo.kl_controller' must be one of fixed, adaptive"),
    ({"objective.ppo.kl_controller": "adaptive", "objective.ppo.kl_coef": 0.0},
     "objective.ppo.kl_coef' must be > 0 with kl_controller 'adaptive'"),
    ({"objective.ppo.kl_controller": "adaptive", "objective.ppo.kl_target": 0.0}, "kl_target' must be > 0"),
])
def test_config_errors(overrides, message):
    with pytest.raises(UserError, match=message):
        ppo_config(**overrides)


@pytest.mark.slow  # ~15 s each: a setup and two jitted inits
@pytest.mark.parametrize("lora", [False, True])
def test_value_head_is_seeded_beside_a_hugging_face_checkpoints_weights(tmp_path, lora):
    """model.hf_dir has no value head: the decoder is the checkpoint's, the head the seed's (LoRA: in the base)."""
    import flax.linen as nn
    import jax.numpy as jnp

    from jaxtune import loading, models, sharding
    from jaxtune.trainer.setup import build_setup

    causal = models.get_config("llama", "tiny", vocab_size=64, hidden_size=32, intermediate_size=64)
    params = sharding.unbox(models.build(causal).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    hf_dir = models.save_pretrained(causal, params, tmp_path / "lm")
    c = ppo_config(**{"model.hf_dir": str(hf_dir), **({"peft.method": "lora", "peft.rank": 4} if lora else {})})
    setup = build_setup(c, jax.devices())
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rule_table):
        weights = loading.start_weights(c, setup)  # LoRA: the frozen base
        again = loading.start_weights(c, setup)
    assert weights["value_head"]["kernel"].shape == (32, 1)
    np.testing.assert_array_equal(np.asarray(weights["value_head"]["kernel"]), np.asarray(again["value_head"]["kernel"]))
    np.testing.assert_array_equal(np.asarray(weights["embed"]["embedding"]), np.asarray(params["embed"]["embedding"]))
    assert set(weights) == set(params) | {"value_head"}


def test_a_policy_with_a_value_head_exports_as_its_causal_lm(tmp_path):
    """The value head is PPO's own: a Hugging Face export writes the policy (and loads without the head)."""
    import jax.numpy as jnp

    from jaxtune import models, sharding

    config = models.get_config("llama", "tiny", vocab_size=64, hidden_size=32, intermediate_size=64).replace(value_head=True)
    model = models.build(config)
    params = sharding.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    assert params["value_head"]["kernel"].shape == (32, 1)
    values = model.apply({"params": params}, model.apply({"params": params}, jnp.ones((1, 3), jnp.int32),
                                                         method="hidden_states"), method="values_from_hidden")
    assert values.shape == (1, 3) and values.dtype == jnp.float32
    loaded_model, loaded = models.from_pretrained(models.save_pretrained(config, params, tmp_path / "hf"))
    assert not loaded_model.config.value_head and set(loaded) == set(params) - {"value_head"}
    np.testing.assert_array_equal(np.asarray(loaded["lm_head"]["kernel"]), np.asarray(params["lm_head"]["kernel"]))


# ---- the value model on its own backbone (objective.ppo.value_model='separate') -----------------


def _fixed_rollout_batch(rng, b=2, t=7, vocab=64):
    """Rows of fixed rollouts: tokens, a completion mask, old log-probs, advantages, returns, values."""
    inputs = rng.integers(1, vocab, (b, t)).astype(np.int32)
    loss_mask = np.zeros((b, t), np.int32)
    loss_mask[:, 2:5] = 1
    value_mask = np.zeros((b, t), np.float32)
    value_mask[:, 2:6] = 1
    f32 = lambda *shape: rng.normal(size=shape).astype(np.float32)
    batch = {"inputs": inputs, "targets": np.roll(inputs, -1, axis=1), "loss_mask": loss_mask,
             "segment_ids": np.ones((b, t), np.int32), "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
             # old log-probs near a random model's, so some ratios stay unclipped
             "old_logps": 0.05 * f32(b, t) - np.log(vocab), "advantages": f32(b, t), "returns": f32(b, t),
             "old_values": f32(b, t),
             "value_mask": value_mask}
    batch["inv_tokens"] = np.tile(np.array([1 / loss_mask.sum(), 1 / value_mask.sum()], np.float32), (b, 1))
    return batch


def test_separate_value_model_loss_is_the_hand_computation():
    """On fixed rollouts the PPO loss with a separate value model is the clipped policy loss of the
    policy alone plus vf_coef times the clipped value loss of a reward-model-shaped network run on
    params['value_model'], written out here in numpy; and each loss moves only its own model."""
    import jax.numpy as jnp

    from jaxtune import models, objectives, sharding
    from jaxtune.trainer.step import ModelApply

    config = ppo_config(**{"objective.ppo.value_model": "separate", "objective.ppo.temperature": 0.7})
    objective = objectives.build(config)
    causal = models.get_config("llama", "tiny", vocab_size=64, hidden_size=32, intermediate_size=64)
    model_config = objective.adapt_model_config(causal)
    assert model_config.value_head and model_config.value_backbone
    model = models.build(model_config)
    params = jax.jit(lambda rng: sharding.unbox(model.init(rng, jnp.zeros((1, 4), jnp.int32))["params"]))(
        jax.random.key(0))
    assert set(params["value_model"]) == {"embed", "layers", "final_norm", "score"}
    batch = _fixed_rollout_batch(np.random.default_rng(0))
    batch["rollout_stats"] = np.zeros((2, len(objective.stat_names)), np.float32)
    rows = {k: jnp.asarray(v) for k, v in batch.items()}
    nudged = {k: jax.tree.map(lambda x: x * 1.1, v) for k, v in params.items()}

    @jax.jit
    def run(p):  # the loss, its metrics, and the metrics with either model nudged (one compile)
        loss, metrics = objective.loss(ModelApply(model), p, rows)
        value_moved = objective.loss(ModelApply(model), {**p, "value_model": nudged["value_model"]}, rows)[1]
        policy_moved = objective.loss(ModelApply(model), {**nudged, "value_model": p["value_model"]}, rows)[1]
        # for the hand computation: the policy alone, and a reward model's network on params["value_model"]
        logits = models.build(causal).apply({"params": {k: v for k, v in p.items() if k != "value_model"}},
                                            rows["inputs"])
        scores = models.build(causal.replace(num_labels=1)).apply({"params": p["value_model"]}, rows["inputs"])
        return loss, metrics, value_moved, policy_moved, logits, scores

    loss, metrics, value_moved, policy_moved, logits, scores = run(params)

    # by hand: the policy's log-probs at temperature 0.7, the value network's per-token scores
    s = config.objective.ppo
    logits = np.asarray(logits, np.float64) / s.temperature
    logp_all = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    lp = np.take_along_axis(logp_all, batch["targets"][..., None], -1)[..., 0]
    v = np.asarray(scores, np.float64)[..., 0]
    mask, vmask = batch["loss_mask"].astype(np.float64), batch["value_mask"]
    ratio = np.exp((lp - batch["old_logps"]) * mask)
    adv = batch["advantages"]
    pg = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - s.cliprange, 1 + s.cliprange))
    pg_loss = (pg * mask).sum() / mask.sum()
    v = v * vmask
    old_v, ret = batch["old_values"], batch["returns"]
    v_clip = np.clip(v, old_v - s.cliprange_value, old_v + s.cliprange_value)
    vf_loss = 0.5 * (np.maximum((v - ret) ** 2, (v_clip - ret) ** 2) * vmask).sum() / vmask.sum()
    assert float(metrics["loss/policy_avg"]) == pytest.approx(pg_loss, rel=1e-5, abs=1e-6)
    assert float(metrics["loss/value_avg"]) == pytest.approx(vf_loss, rel=1e-5, abs=1e-6)
    assert float(loss) == pytest.approx(pg_loss + s.vf_coef * vf_loss, rel=1e-5, abs=1e-6)

    # each loss depends on its own model only (so each model's gradient comes from its own loss)
    assert value_moved["loss/policy_avg"] == metrics["loss/policy_avg"]
    assert value_moved["loss/value_avg"] != metrics["loss/value_avg"]
    assert policy_moved["loss/value_avg"] == metrics["loss/value_avg"]
    assert policy_moved["loss/policy_avg"] != metrics["loss/policy_avg"]


def test_adaptive_kl_coefficient_follows_trls_controller_and_round_trips():
    """The objective's controller is TRL's AdaptiveKLController (transcribed) step for step, and
    its state is what a checkpoint saves and a resume restores; 'fixed' saves nothing."""
    from jaxtune import objectives

    adaptive = objectives.build(ppo_config(**{"objective.ppo.kl_controller": "adaptive", "objective.ppo.kl_coef": 0.2,
                                              "objective.ppo.kl_target": 6.0, "objective.ppo.kl_horizon": 100.0}))

    class TRLAdaptiveKLController:  # trl (v0.11) trainer/utils.py, transcribed
        def __init__(self, init_kl_coef, target, horizon):
            self.value, self.target, self.horizon = init_kl_coef, target, horizon

        def update(self, current, n_steps):
            proportional_error = np.clip(current / self.target - 1, -0.2, 0.2)
            self.value *= 1 + proportional_error * n_steps / self.horizon

    trl = TRLAdaptiveKLController(0.2, 6.0, 100.0)
    for kl_sums in ([0.0, 0.5, 1.0], [7.0, 6.5], [30.0, 40.0, 50.0, 60.0], [5.9]):
        adaptive._update_kl_coef(np.array(kl_sums))
        trl.update(float(np.mean(kl_sums)), len(kl_sums))
        assert adaptive.kl_coef == pytest.approx(trl.value, rel=1e-12)
    saved = adaptive.checkpoint_state()
    resumed = objectives.build(ppo_config(**{"objective.ppo.kl_controller": "adaptive", "objective.ppo.kl_coef": 0.2}))
    resumed.restore_checkpoint_state(saved)
    assert resumed.kl_coef == adaptive.kl_coef != 0.2
    fixed = objectives.build(ppo_config())
    fixed._update_kl_coef(np.array([100.0]))
    assert fixed.kl_coef == 0.05 and fixed.checkpoint_state() is None


@pytest.mark.slow  # ~20 s each: a setup and jitted inits
@pytest.mark.parametrize("lora", [False, True])
def test_separate_value_model_starts_from_a_reward_model_or_the_policy(tmp_path, lora):
    """value_init=<an exported *ForSequenceClassification>: params['value_model'] are its weights
    (LoRA: in the frozen base, beside the policy's); value_init=policy: a copy of the policy's
    backbone with a seeded head; a reward model of another shape is named in a UserError."""
    import flax.linen as nn
    import jax.numpy as jnp

    from jaxtune import loading, models, sharding
    from jaxtune.trainer.setup import build_setup

    def saved(config, name, seed):
        params = sharding.unbox(models.build(config).init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"])
        return models.save_pretrained(config, params, tmp_path / name), params

    causal = models.get_config("llama", "tiny", vocab_size=64, hidden_size=32, intermediate_size=64)
    policy_dir, policy = saved(causal, "policy", 0)
    reward_dir, reward = saved(causal.replace(num_labels=1, pad_token_id=0), "rm", 1)
    small_dir, _ = saved(causal.replace(num_labels=1, pad_token_id=0, num_layers=1), "small_rm", 2)
    peft = {"peft.method": "lora", "peft.rank": 4} if lora else {}

    def start(value_init):
        c = ppo_config(**{"model.hf_dir": str(policy_dir), "objective.ppo.value_model": "separate",
                          "objective.ppo.value_init": value_init, **peft})
        setup = build_setup(c, jax.devices())
        with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rule_table):
            return loading.start_weights(c, setup)  # LoRA: the frozen base

    weights = start(f"reward_model:{reward_dir}")
    for a, b in zip(jax.tree.leaves(weights["value_model"]), jax.tree.leaves(reward)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves({k: weights[k] for k in policy}), jax.tree.leaves(policy)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    copied = start("policy")
    for key in ("embed", "layers", "final_norm"):
        for a, b in zip(jax.tree.leaves(copied["value_model"][key]), jax.tree.leaves(policy[key])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert copied["value_model"]["score"]["kernel"].shape == (32, 1)
    with pytest.raises(UserError, match=r"objective.ppo.value_init' .*the reward model's .* the value model needs"):
        start(str(small_dir))
    with pytest.raises(UserError, match="is not a reward model"):
        start(str(policy_dir))
