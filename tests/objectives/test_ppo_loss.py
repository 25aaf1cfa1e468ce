"""PPO's rewards, GAE, whitening and clipped losses on fixed rollouts, against TRL's PPOTrainer
(trl/experimental/ppo/ppo_trainer.py at commit f2cd577, read side by side again at huggingface/trl
commit 0062ee1, unchanged there: `masked_mean`/`masked_var`/`masked_whiten`,
the rollout block "compute rewards ... compute advantages and returns" and the PPO mini-batch loss,
transcribed below in torch op for op on TRL's own layout: responses padded after the stop token,
log-probs filled with INVALID_LOGPROB there) within 1e-5 in fp32, and against closed forms."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.objectives import ppo_loss

torch = pytest.importorskip("torch")

L = 6
LENGTHS = np.array([3, 6, 1, 5, 2, 4])  # tokens per completion, stop token included; one fills all L
B = len(LENGTHS)
RNG = np.random.default_rng(0)
LP = (RNG.normal(size=(B, L)) - 1.0).astype(np.float32)  # sampling policy's log-probs
LP_REF = (LP + RNG.normal(scale=0.3, size=(B, L))).astype(np.float32)
VALUES = RNG.normal(size=(B, L)).astype(np.float32)
SCORES = RNG.normal(size=B).astype(np.float32)
LP_NEW = (LP + RNG.normal(scale=0.3, size=(B, L))).astype(np.float32)  # after some updates: ratios clip
VPRED = (VALUES + RNG.normal(scale=0.5, size=(B, L))).astype(np.float32)
INVALID_LOGPROB = 1.0


# ---- TRL, transcribed ------------------------------------------------------------------------

def trl_masked_mean(values, mask):
    return (values * mask).sum() / mask.sum()


def trl_masked_var(values, mask):
    mean = trl_masked_mean(values, mask)
    variance = trl_masked_mean((values - mean) ** 2, mask)
    mask_sum = mask.sum()
    return variance * (mask_sum / (mask_sum - 1))


def trl_masked_whiten(values, mask, shift_mean=True):
    mean, var = trl_masked_mean(values, mask), trl_masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


def trl_rollout(kl_coef, kl_estimator, gamma, lam, whiten_rewards):
    sequence_lengths = torch.tensor(LENGTHS - 1)  # TRL: first pad index - 1 (the stop token's index)
    response_idxs = torch.arange(L).repeat(B, 1)
    padding_mask = response_idxs > sequence_lengths.unsqueeze(1)
    logprobs = torch.masked_fill(torch.tensor(LP), padding_mask, INVALID_LOGPROB)
    ref_logprobs = torch.masked_fill(torch.tensor(LP_REF), padding_mask, INVALID_LOGPROB)
    sequence_lengths_p1 = sequence_lengths + 1
    padding_mask_p1 = response_idxs > (sequence_lengths_p1.unsqueeze(1))
    values = torch.masked_fill(torch.tensor(VALUES), padding_mask_p1, 0)
    scores = torch.tensor(SCORES)
    logr = ref_logprobs - logprobs
    kl = -logr if kl_estimator == "k1" else (logr.exp() - 1) - logr
    non_score_reward = -kl_coef * kl
    rewards = non_score_reward.clone()
    actual_start = torch.arange(rewards.size(0))
    actual_end = torch.where(sequence_lengths_p1 < rewards.size(1), sequence_lengths_p1, sequence_lengths)
    rewards[actual_start, actual_end] += scores
    if whiten_rewards:
        rewards = trl_masked_whiten(rewards, mask=~padding_mask_p1, shift_mean=False)
        rewards = torch.masked_fill(rewards, padding_mask_p1, 0)
    lastgaelam = 0
    advantages_reversed = []
    for t in reversed(range(L)):
        nextvalues = values[:, t + 1] if t < L - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    returns = advantages + values
    advantages = trl_masked_whiten(advantages, ~padding_mask)
    advantages = torch.masked_fill(advantages, padding_mask, 0)
    return dict(advantages=advantages, returns=returns, values=values, rewards=rewards, kl=kl, logprobs=logprobs,
                padding_mask=padding_mask, padding_mask_p1=padding_mask_p1, non_score_reward=non_score_reward)


def trl_losses(r, cliprange, cliprange_value, vf_coef):
    padding_mask, padding_mask_p1 = r["padding_mask"], r["padding_mask_p1"]
    new_logprobs = torch.masked_fill(torch.tensor(LP_NEW), padding_mask, INVALID_LOGPROB)
    vpred = torch.masked_fill(torch.tensor(VPRED), padding_mask_p1, 0)
    mb_values, mb_return, mb_advantage = r["values"], r["returns"], r["advantages"]
    vpredclipped = torch.clamp(vpred, mb_values - cliprange_value, mb_values + cliprange_value)
    vf_losses1 = torch.square(vpred - mb_return)
    vf_losses2 = torch.square(vpredclipped - mb_return)
    vf_loss_max = torch.max(vf_losses1, vf_losses2)
    vf_loss = 0.5 * trl_masked_mean(vf_loss_max, ~padding_mask_p1)
    vf_clipfrac = trl_masked_mean((vf_losses2 > vf_losses1).float(), ~padding_mask_p1)
    logprobs_diff = new_logprobs - r["logprobs"]
    ratio = torch.exp(logprobs_diff)
    pg_losses = -mb_advantage * ratio
    pg_losses2 = -mb_advantage * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss_max = torch.max(pg_losses, pg_losses2)
    pg_loss = trl_masked_mean(pg_loss_max, ~padding_mask)
    loss = pg_loss + vf_coef * vf_loss
    pg_clipfrac = trl_masked_mean((pg_losses2 > pg_losses).float(), ~padding_mask)
    approxkl = 0.5 * (logprobs_diff**2).mean()  # over every position: padding adds zeros
    return dict(loss=loss, pg_loss=pg_loss, vf_loss=vf_loss, vf_clipfrac=vf_clipfrac, pg_clipfrac=pg_clipfrac,
                approxkl=approxkl, ratio=ratio.mean())


# ---- parity -----------------------------------------------------------------------------------

def _ours(kl_coef, kl_estimator, gamma, lam, whiten_rewards):
    return ppo_loss.rollout_targets(jnp.asarray(SCORES), jnp.asarray(LP), jnp.asarray(LP_REF), jnp.asarray(VALUES),
                                    jnp.asarray(LENGTHS), kl_coef=kl_coef, kl_estimator=kl_estimator, gamma=gamma,
                                    lam=lam, whiten_rewards=whiten_rewards)


@pytest.mark.parametrize("kl_estimator", ["k1", "k3"])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)])
@pytest.mark.parametrize("whiten_rewards", [False, True])
def test_rollout_targets_match_trl(kl_estimator, gamma, lam, whiten_rewards):
    ours = _ours(0.05, kl_estimator, gamma, lam, whiten_rewards)
    trl = trl_rollout(0.05, kl_estimator, gamma, lam, whiten_rewards)
    for key in ("advantages", "returns", "values", "rewards", "kl"):
        np.testing.assert_allclose(np.asarray(ours[key]), trl[key].numpy(), atol=1e-5, rtol=1e-5, err_msg=key)
    np.testing.assert_array_equal(np.asarray(ours["mask"]) > 0, ~trl["padding_mask"].numpy())
    np.testing.assert_array_equal(np.asarray(ours["value_mask"]) > 0, ~trl["padding_mask_p1"].numpy())


@pytest.mark.parametrize("cliprange,cliprange_value,vf_coef", [(0.2, 0.2, 0.1), (0.05, 0.1, 0.5)])
def test_losses_match_trl(cliprange, cliprange_value, vf_coef):
    targets = _ours(0.05, "k3", 1.0, 0.95, False)
    trl = trl_losses(trl_rollout(0.05, "k3", 1.0, 0.95, False), cliprange, cliprange_value, vf_coef)
    batch = dict(targets, old_logps=jnp.asarray(LP))
    loss, m = ppo_loss.ppo_losses(jnp.asarray(LP_NEW), jnp.asarray(VPRED), batch, cliprange=cliprange,
                                  cliprange_value=cliprange_value, vf_coef=vf_coef)
    assert 0 < float(trl["pg_clipfrac"]) < 1 and 0 < float(trl["vf_clipfrac"]) < 1  # both clips are exercised
    close = dict(atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(float(loss), float(trl["loss"]), **close)
    np.testing.assert_allclose(float(m["loss/policy_avg"]), float(trl["pg_loss"]), **close)
    np.testing.assert_allclose(float(m["loss/value_avg"]), float(trl["vf_loss"]), **close)
    np.testing.assert_allclose(float(m["policy/clipfrac_avg"]), float(trl["pg_clipfrac"]), **close)
    np.testing.assert_allclose(float(m["val/clipfrac_avg"]), float(trl["vf_clipfrac"]), **close)
    # TRL averages approxkl and the ratio over padded positions too (log-ratio 0, ratio 1 there);
    # ours are over completion tokens: the same sums.
    tokens, positions = LENGTHS.sum(), B * L
    np.testing.assert_allclose(float(m["policy/approxkl_avg"]) * tokens / positions, float(trl["approxkl"]), **close)
    np.testing.assert_allclose((float(m["val/ratio"]) * tokens + positions - tokens) / positions,
                               float(trl["ratio"]), **close)


def test_losses_split_into_micro_batches_add_up():
    """With the global batch's token weights, micro-batch losses and metrics sum to the whole batch's."""
    batch = dict(_ours(0.05, "k1", 1.0, 0.95, False), old_logps=jnp.asarray(LP))
    whole, m_whole = ppo_loss.ppo_losses(jnp.asarray(LP_NEW), jnp.asarray(VPRED), batch)
    w, wv = 1.0 / jnp.sum(batch["mask"]), 1.0 / jnp.sum(batch["value_mask"])
    total, sums = 0.0, {}
    for rows in (slice(0, 2), slice(2, 6)):
        part = {k: v[rows] for k, v in batch.items()}
        loss, m = ppo_loss.ppo_losses(jnp.asarray(LP_NEW[rows]), jnp.asarray(VPRED[rows]), part, token_weight=w,
                                      value_weight=wv)
        total += float(loss)
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    np.testing.assert_allclose(total, float(whole), rtol=1e-6)
    for k, v in m_whole.items():
        np.testing.assert_allclose(sums[k], float(v), rtol=1e-6, atol=1e-7, err_msg=k)


# ---- closed forms -----------------------------------------------------------------------------

def test_gae_with_lambda_one_is_the_discounted_return_minus_the_value():
    rewards = jnp.asarray(RNG.normal(size=(2, 5)), jnp.float32)
    values = jnp.asarray(RNG.normal(size=(2, 5)), jnp.float32)
    gamma = 0.9
    advantages, returns = ppo_loss.gae(rewards, values, gamma=gamma, lam=1.0)
    r = np.asarray(rewards, np.float64)
    expected = np.stack([[sum(gamma ** (s - t) * r[i, s] for s in range(t, 5)) for t in range(5)] for i in range(2)])
    np.testing.assert_allclose(np.asarray(returns), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(advantages), expected - np.asarray(values), rtol=1e-5, atol=1e-6)


def test_gae_with_lambda_zero_is_the_one_step_td_error():
    rewards = jnp.asarray([[1.0, 2.0, 3.0]])
    values = jnp.asarray([[0.5, -1.0, 2.0]])
    advantages, _ = ppo_loss.gae(rewards, values, gamma=0.5, lam=0.0)
    np.testing.assert_allclose(np.asarray(advantages), [[1.0 + 0.5 * -1.0 - 0.5, 2.0 + 0.5 * 2.0 + 1.0, 3.0 - 2.0]])


def test_score_lands_after_the_last_token_and_kl_only_on_tokens():
    rewards, kl = ppo_loss.token_rewards(jnp.asarray([2.0, 3.0]), jnp.asarray(LP[:2]), jnp.asarray(LP_REF[:2]),
                                         jnp.asarray([3, L]), kl_coef=0.0, kl_estimator="k3")
    expected = np.zeros((2, L))
    expected[0, 3] = 2.0  # one past the 3 tokens
    expected[1, L - 1] = 3.0  # fills every position: on its last token
    np.testing.assert_allclose(np.asarray(rewards), expected)
    assert np.all(np.asarray(kl)[0, 3:] == 0) and np.all(np.asarray(kl)[0, :3] >= 0)  # k3 >= 0, none past the end


def test_whitened_advantages_have_zero_mean_and_unit_sample_variance():
    out = _ours(0.05, "k1", 1.0, 0.95, False)
    adv, mask = np.asarray(out["advantages"], np.float64), np.asarray(out["mask"]) > 0
    assert abs(adv[mask].mean()) < 1e-6
    np.testing.assert_allclose(adv[mask].var(ddof=1), 1.0, rtol=1e-4)
    assert np.all(adv[~mask] == 0)


def test_missing_eos_penalty_only_hits_completions_without_a_stop_token():
    scores = jnp.asarray([1.0, 1.0, -0.5])
    out = ppo_loss.penalise_missing_eos(scores, jnp.asarray([True, False, False]), 1.0)
    np.testing.assert_allclose(np.asarray(out), [1.0, 0.0, -1.5])
    assert ppo_loss.penalise_missing_eos(scores, jnp.asarray([False] * 3), None) is scores


def test_rollout_metrics_follow_trl_names_and_sums():
    out = _ours(0.1, "k1", 1.0, 0.95, False)
    m = ppo_loss.rollout_metrics(jnp.asarray(SCORES), jnp.asarray(LP), out["kl"], out["mask"], kl_coef=0.1,
                                 num_eos_tokens=4)
    mask = np.asarray(out["mask"])
    kl = ((LP - LP_REF) * mask).sum(1).mean()
    np.testing.assert_allclose(float(m["objective/kl"]), kl, rtol=1e-5)
    np.testing.assert_allclose(float(m["objective/rlhf_reward"]), -0.1 * kl + SCORES.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(m["objective/entropy"]), (-LP * mask).sum(1).mean(), rtol=1e-5)
    assert set(m) <= set(ppo_loss.METRIC_NAMES)


def test_adaptive_kl_controller_moves_towards_the_target_at_most_20_percent():
    assert ppo_loss.adaptive_kl_coef(0.1, 12.0, target=6.0, horizon=100, num_samples=100) == pytest.approx(0.12)
    assert ppo_loss.adaptive_kl_coef(0.1, 5.4, target=6.0, horizon=100, num_samples=50) == pytest.approx(0.1 * 0.95)
    assert ppo_loss.adaptive_kl_coef(0.1, 6.0, target=6.0, horizon=100, num_samples=8) == pytest.approx(0.1)


def test_unknown_kl_estimator_is_named():
    with pytest.raises(ValueError, match=r"k2.*k1, k3"):
        ppo_loss.kl_per_token(jnp.zeros(2), jnp.zeros(2), "k2")


def test_whitening_a_single_token_gives_zero_not_nan():
    """A rollout batch with one completion token (TRL: inf variance / NaN) whitens to 0."""
    out = ppo_loss.rollout_targets(jnp.asarray([1.0]), jnp.asarray([[-1.0, 0.0]]), jnp.asarray([[-1.2, 0.0]]),
                                   jnp.asarray([[0.3, 0.1]]), jnp.asarray([1]), kl_coef=0.05)
    assert np.all(np.isfinite(np.asarray(out["advantages"]))) and float(out["advantages"][0, 0]) == 0.0
    np.testing.assert_allclose(np.asarray(out["returns"])[0, 1], 1.0, rtol=1e-6)  # the score, one past the token
