"""Online DPO: parity of the ranking, loss, gradient and metrics with a torch transcription of TRL
1.16's OnlineDPOTrainer.training_step (after generation), judge and config errors, and (slow) end to
end runs from configs/online_dpo.py with an exact resume, full fine-tune and LoRA."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune import trainer, validation
from jaxtune.errors import UserError
from jaxtune.metrics import read_metrics
from jaxtune.objectives import online_dpo

torch = pytest.importorskip("torch")
F = torch.nn.functional


def trl_training_step(logprobs, ref_logprobs, completion_mask, rewards, contain_eos, *, beta, loss_type,
                      missing_eos_penalty):
    """TRL 1.16 `OnlineDPOTrainer.training_step` from the log-probs on: rows are [first half = each
    prompt's first completion, second half = its second], as TRL lays them out."""
    batch_size = logprobs.shape[0] // 2
    rewards = rewards.clone()
    if missing_eos_penalty is not None:
        rewards[~contain_eos] -= missing_eos_penalty
    first_half, second_half = rewards.split(batch_size)
    mask = first_half >= second_half
    batch_range = torch.arange(batch_size)
    chosen_indices = batch_range + (~mask * batch_size)
    rejected_indices = batch_range + (mask * batch_size)
    cr_indices = torch.cat((chosen_indices, rejected_indices), dim=0)
    cr_padding_mask = (~completion_mask.bool())[cr_indices]
    cr_logprobs_sum = (logprobs[cr_indices] * ~cr_padding_mask).sum(1)
    cr_ref_logprobs_sum = (ref_logprobs[cr_indices] * ~cr_padding_mask).sum(1)
    chosen_sum, rejected_sum = torch.split(cr_logprobs_sum, batch_size)
    chosen_ref_sum, rejected_ref_sum = torch.split(cr_ref_logprobs_sum, batch_size)
    logits = (chosen_sum - rejected_sum) - (chosen_ref_sum - rejected_ref_sum)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits)
    else:
        losses = (logits - 1 / (2 * beta)) ** 2
    loss = losses.mean()
    kl = (logprobs - ref_logprobs).detach()
    chosen_rewards = beta * (chosen_sum - chosen_ref_sum).detach()
    rejected_rewards = beta * (rejected_sum - rejected_ref_sum).detach()
    non_score_reward = (-beta * kl).sum(1).mean()
    stats = {
        "objective/scores_margin": (rewards[chosen_indices] - rewards[rejected_indices]).mean(),
        "objective/scores": rewards.mean(), "val/contain_eos_token": contain_eos.float().mean(),
        "logps/chosen": chosen_sum.detach().mean(), "logps/rejected": rejected_sum.detach().mean(),
        "objective/kl": kl.sum(1).mean(), "objective/non_score_reward": non_score_reward,
        "objective/rlhf_reward": (rewards + (-beta * kl).sum(1)).mean(),
        "objective/entropy": -logprobs.detach().sum(1).mean(), "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(), "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
    }
    return loss, {k: float(v) for k, v in stats.items()}


def jaxtune_step(logprobs, ref_logprobs, completion_mask, rewards, contain_eos, *, beta, loss_type,
                 missing_eos_penalty):
    """The same step as jaxtune runs it: rank on the host, (chosen, rejected) rows, the objective's loss."""
    b = logprobs.shape[0] // 2
    pair = lambda x: np.stack([x[:b], x[b:]], axis=1)  # [B, 2]: (first, second) completion of each prompt
    first, scores = online_dpo.rank_pairs(pair(rewards), pair(contain_eos), missing_eos_penalty)
    order = np.where(first[:, None], [0, 1], [1, 0])
    pick = lambda x: jnp.asarray(np.take_along_axis(pair(x), order.reshape(b, 2, *([1] * (x.ndim - 1))), axis=1))
    mask = pick(completion_mask).astype(jnp.float32)

    def mean_loss(tokens):
        logps = jnp.sum(pick_tokens(tokens) * mask, axis=-1)
        losses, metrics = online_dpo.online_dpo_loss(loss_type, logps, ref, beta=beta)
        return jnp.mean(losses), metrics

    def pick_tokens(tokens):  # differentiable gather of [2B, T] rows into [B, 2, T]
        index = np.where(order == 0, np.arange(b)[:, None], np.arange(b)[:, None] + b)
        return tokens[index]

    ref = jnp.sum(pick_tokens(jnp.asarray(ref_logprobs)) * mask, axis=-1)
    (loss, metrics), grad = jax.value_and_grad(mean_loss, has_aux=True)(jnp.asarray(logprobs))
    pair_values = {"scores": jnp.asarray(np.take_along_axis(scores, order, axis=1)),
                   "contain_eos": pick(contain_eos.astype(np.float32)), "correct": jnp.zeros((b, 2)),
                   "completion_len": jnp.sum(mask, axis=-1)}
    metrics.update(online_dpo.score_metrics(pair_values, metrics["objective/non_score_reward"]))
    return loss, grad, {k: float(v) for k, v in metrics.items()}


@pytest.mark.parametrize("loss_type, missing_eos_penalty", [("sigmoid", None), ("sigmoid", 1.5), ("ipo", 0.5)])
def test_loss_gradient_and_metrics_match_trl(loss_type, missing_eos_penalty):
    rng = np.random.default_rng(0)
    b, t, beta = 6, 7, 0.1
    lengths = rng.integers(1, t + 1, size=2 * b)
    completion_mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int64)
    # Padding positions carry 0 log-probs in both models: TRL sums its KL and entropy over them too.
    logprobs = (-rng.uniform(0.05, 3.0, size=(2 * b, t)) * completion_mask).astype(np.float32)
    ref_logprobs = (logprobs + rng.normal(0, 0.3, size=(2 * b, t)) * completion_mask).astype(np.float32)
    rewards = rng.normal(size=2 * b).astype(np.float32)
    rewards[b + 1] = rewards[1]  # a tie: the first completion is chosen
    contain_eos = rng.random(2 * b) < 0.6
    kw = dict(beta=beta, loss_type=loss_type, missing_eos_penalty=missing_eos_penalty)

    lp = torch.tensor(logprobs, requires_grad=True)
    trl_loss, trl_stats = trl_training_step(lp, torch.tensor(ref_logprobs), torch.tensor(completion_mask),
                                            torch.tensor(rewards), torch.tensor(contain_eos), **kw)
    trl_loss.backward()
    loss, grad, stats = jaxtune_step(logprobs, ref_logprobs, completion_mask, rewards, contain_eos, **kw)

    np.testing.assert_allclose(float(loss), float(trl_loss.detach()), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), lp.grad.numpy(), rtol=1e-5, atol=1e-5)
    assert np.abs(lp.grad.numpy()).sum() > 0
    for key, value in trl_stats.items():
        np.testing.assert_allclose(stats[key], value, rtol=1e-5, atol=1e-5, err_msg=key)


def test_hinge_is_the_dpo_objectives_slic_loss():
    logps, ref = jnp.array([[-3.0, -5.0], [-4.0, -2.0]]), jnp.array([[-3.5, -4.0], [-4.0, -4.0]])
    losses, _ = online_dpo.online_dpo_loss("hinge", logps, ref, beta=0.5)
    logits = np.array([(-3 + 5) - (-3.5 + 4), (-4 + 2) - (-4 + 4)])
    np.testing.assert_allclose(np.asarray(losses), np.maximum(0.0, 1.0 - 0.5 * logits), rtol=1e-6)


def test_ranking_ties_and_missing_eos_penalty():
    first, scores = online_dpo.rank_pairs(np.array([[1.0, 1.0], [0.0, 0.5], [2.0, 1.5]]),
                                          np.array([[True, True], [True, True], [False, True]]), 1.0)
    assert first.tolist() == [True, False, False]  # tie -> first; the EOS-less 2.0 becomes 1.0 < 1.5
    assert scores[2].tolist() == [1.0, 1.5]


def pick_second(prompts, pairs):
    return [1 for _ in pairs]


class LengthJudge:
    """A TRL-style pairwise judge: prefers the shorter completion."""

    def judge(self, prompts, completions):
        return [0 if len(a) <= len(b) else 1 for a, b in completions]


length_judge = LengthJudge()


def test_judges_rank_pairs_and_bad_answers_fail_clearly():
    pairs = [["a", "bbb"], ["cccc", "d"]]
    assert online_dpo.judge_pairs(online_dpo.load_judge(f"{__name__}:length_judge"), ["p", "q"], pairs).tolist() == [True, False]
    assert online_dpo.judge_pairs(online_dpo.load_judge(f"{__name__}:pick_second"), ["p", "q"], pairs).tolist() == [False, False]
    with pytest.raises(UserError, match="expected one of 0, 1"):
        online_dpo.judge_pairs(lambda p, c: [2, 0], ["p", "q"], pairs)
    with pytest.raises(UserError, match="judge': cannot load 'no_such_module_q:f'"):
        online_dpo.load_judge("no_such_module_q:f")


def online_dpo_config(**overrides):
    c = validation.load_config("configs/online_dpo.py", ())
    c.unlock()
    small = {
        "model.hidden_size": 32, "model.intermediate_size": 64, "model.num_layers": 2, "model.num_heads": 4,
        "model.num_kv_heads": 2, "data.seq_len": 96, "data.num_train_examples": 64, "data.num_eval_examples": 4,
        "objective.online_dpo.max_completion_tokens": 6, "objective.online_dpo.sample_every": 2,
        "train.global_batch_size": 8, "train.steps": 2, "train.eval_every": 0, "train.checkpoint_every": 2,
        "train.log_every": 1, "train.max_seconds": 0.0, "train.progress_bar": False, "optim.lr": 1e-2,
        "optim.warmup_steps": 0, "optim.schedule": "constant", "eval.show_examples": 0,
    }
    for key, value in {**small, **overrides}.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    c.lock()
    validation.validate(c)
    return c


@pytest.mark.parametrize("overrides, message", [
    ({"objective.online_dpo.loss_type": "simpo"}, "loss_type' must be one of sigmoid, ipo, hinge"),
    ({"objective.online_dpo.beta": 0.0}, "beta' must be > 0"),
    ({"objective.online_dpo.reference": "base"}, "reference' must be auto or copy without PEFT"),
    ({"objective.online_dpo.reference": "copy", "peft.method": "lora"}, "reference' must be auto or base with PEFT"),
    ({"objective.online_dpo.missing_eos_penalty": -1.0}, "missing_eos_penalty' must be >= 0"),
    ({"objective.online_dpo.judge": "no_such_module_q:judge"}, "cannot load 'no_such_module_q:judge'"),
    ({"objective.online_dpo.rewards": ("math",)}, "1 reward functions but 2 weights"),
    ({"data.packing": True}, "data.packing' must be False"),
    ({"data.builtin": ""}, "config key 'data.train_path' is empty"),
    ({"data.builtin": "quickstart"}, "prompts come from data.builtin='verifiable'"),
])
def test_config_errors(overrides, message):
    with pytest.raises(UserError, match=message):
        online_dpo_config(**overrides)


def _params(workdir, step):
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(workdir / "checkpoints") as m:
        return m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state["params"]


@pytest.mark.slow  # sampler + step compiles, three runs (~2 min on 2 cores); LoRA: test_multihost.py
def test_trains_from_config_and_resumes_exactly(tmp_path):
    """Full fine-tune (a frozen copy is the reference), pairs ranked by a judge."""
    overrides = {"train.steps": 4, "data.num_eval_examples": 0, "objective.online_dpo.judge": f"{__name__}:length_judge"}
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    trainer.train(online_dpo_config(**overrides), reference)
    rows = [r for r in read_metrics(reference) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
                "objective/scores", "objective/scores_margin", "rewards/chosen", "rewards/rejected",
                "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "val/contain_eos_token",
                "beta", "rollout/accuracy", "rollout/completion_len"):
        assert key in rows[0], key
    assert rows[0]["beta"] == pytest.approx(0.1) and 0 <= rows[0]["val/contain_eos_token"] <= 1
    assert abs(rows[0]["objective/kl"]) < 1e-4  # step 1: the policy is the reference
    assert rows[0]["rollout/completion_len"] <= 6
    samples = [json.loads(line) for line in (reference / "samples" / "step_0.jsonl").read_text().splitlines()]
    assert len(samples) == 16 and samples[0]["prompt"] == samples[1]["prompt"] != samples[2]["prompt"]
    trainer.train(online_dpo_config(**{**overrides, "train.steps": 2}), resumed)  # stops at a checkpoint
    trainer.train(online_dpo_config(**overrides), resumed)  # resumed at step 2
    again = {r["step"]: (r["loss"], r["objective/scores"]) for r in read_metrics(resumed) if "loss" in r}
    assert again == {r["step"]: (r["loss"], r["objective/scores"]) for r in rows}
    for a, b in zip(jax.tree.leaves(_params(reference, 4)), jax.tree.leaves(_params(resumed, 4))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
