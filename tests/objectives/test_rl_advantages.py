"""RLOO and REINFORCE++ advantages and RLOO's sequence-level loss on fixed rollouts, against the
papers' formulas and TRL's definitions (trl 1.10.0.dev0, commit f2cd577: RLOOTrainer's
`_generate_and_score_completions` and `_compute_loss`, transcribed below in torch op for op) and
OpenRLHF's REINFORCE++ (`get_cumulative_returns`, batch-wide masked whitening): within 1e-5 in fp32."""

import concurrent.futures
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.objectives.advantages import group_advantages, reinforce_pp_advantages, rloo_advantages, token_returns
from jaxtune.objectives.grpo_loss import policy_loss

torch = pytest.importorskip("torch")

G = 4
REWARDS = np.array([1.0, 0.0, 0.5, 0.0, 2.0, 1.0, 1.0, 0.0])  # two groups of 4
LENGTHS = [3, 2, 4, 1, 2, 3, 2, 4]
RNG = np.random.default_rng(0)
LP_OLD = [RNG.normal(size=n) - 1.0 for n in LENGTHS]  # the sampling policy's per-token log-probs
LP_REF = [x + RNG.normal(scale=0.2, size=x.shape) for x in LP_OLD]
BETA = 0.05


def _padded(seqs, fill=0.0):
    out = np.full((len(seqs), max(LENGTHS)), fill)
    for i, x in enumerate(seqs):
        out[i, : len(x)] = x
    return torch.tensor(out, dtype=torch.float32)


MASK = _padded([np.ones(n) for n in LENGTHS])


def _trl_nanstd(t):
    mean = torch.nanmean(t)
    variance = torch.nanmean((t - mean) ** 2)
    count = torch.sum(~torch.isnan(t))
    return torch.sqrt(variance * count / (count - 1))


def _trl_rloo_advantages(normalize):
    """TRL RLOOTrainer: KL (k1 of the old policy) summed per sequence into the reward, leave-one-out baseline."""
    rewards = torch.tensor(REWARDS, dtype=torch.float32)
    per_token_kl = _padded(LP_OLD) - _padded(LP_REF)
    kl = (per_token_kl * MASK).sum(-1)
    rewards = rewards - BETA * kl
    grouped_rewards = rewards.view(-1, G)
    scorable_counts = (~torch.isnan(grouped_rewards)).sum(dim=1, keepdim=True)
    grouped_sum = torch.nansum(grouped_rewards, dim=1, keepdim=True)
    baselines = ((grouped_sum - grouped_rewards) / (scorable_counts - 1)).view(-1)
    advantages = rewards - baselines
    if normalize:
        advantages = (advantages - torch.nanmean(advantages)) / (_trl_nanstd(advantages) + 1e-4)
    return advantages.numpy()


def _kl_sums():
    return [float(np.sum(o - r)) for o, r in zip(LP_OLD, LP_REF)]


@pytest.mark.parametrize("normalize", [False, True])
def test_rloo_advantages_equal_trl(normalize):
    ours = rloo_advantages(REWARDS, _kl_sums(), G, beta=BETA, normalize=normalize)
    np.testing.assert_allclose(ours, _trl_rloo_advantages(normalize), atol=1e-5)


def test_rloo_advantage_is_the_papers_leave_one_out_formula():
    # Ahmadian et al. 2024, eq. 6: A_i = r_i - 1/(k-1) sum_{j != i} r_j (no KL here)
    ours = rloo_advantages(REWARDS, np.zeros(8), G, beta=0.0)
    groups = REWARDS.reshape(-1, G)
    expected = [[g[i] - (g.sum() - g[i]) / (G - 1) for i in range(G)] for g in groups]
    np.testing.assert_allclose(ours, np.ravel(expected), atol=1e-6)
    assert ours[0] == pytest.approx(1.0 - 0.5 / 3)  # by hand: 1 - (0 + 0.5 + 0) / 3
    # RLOO's advantage is GRPO's centred one scaled by G / (G - 1)
    centred, _ = group_advantages(REWARDS, G, scale_rewards=False)
    np.testing.assert_allclose(ours, centred * G / (G - 1), atol=1e-6)


def _openrlhf_reinforce_pp(gamma):
    """OpenRLHF: reward = -kl_coef * kl (k1) + r at the last action; cumulative returns; masked whitening."""
    kl = _padded(LP_OLD) - _padded(LP_REF)
    reward = -BETA * kl
    last = torch.tensor([n - 1 for n in LENGTHS])
    reward[torch.arange(len(LENGTHS)), last] += torch.tensor(REWARDS, dtype=torch.float32)
    reward = reward * MASK
    returns = torch.zeros_like(reward)
    cumulative = torch.zeros(reward.size(0))
    for t in reversed(range(reward.size(1))):
        cumulative = reward[:, t] + gamma * cumulative
        returns[:, t] = cumulative
    num = MASK.sum()
    mean = (returns * MASK).sum() / num
    var = ((returns - mean).pow(2) * MASK).sum() / num
    return ((returns - mean) * var.clamp(min=1e-8).rsqrt()).numpy()


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_advantages_equal_openrlhf(gamma):
    ours = reinforce_pp_advantages(REWARDS, [o - r for o, r in zip(LP_OLD, LP_REF)], beta=BETA, gamma=gamma)
    expected = _openrlhf_reinforce_pp(gamma)
    for i, n in enumerate(LENGTHS):
        np.testing.assert_allclose(ours[i], expected[i, :n], atol=1e-5)
    flat = np.concatenate(ours)
    assert abs(flat.mean()) < 1e-6 and flat.std() == pytest.approx(1.0, abs=1e-5)  # whitened over all tokens


def test_reinforce_pp_returns_by_hand():
    # kl (0.1, 0.2, 0.3), beta 1, reward 1: token rewards (-0.1, -0.2, 0.7); returns (0.4, 0.5, 0.7)
    (returns,) = token_returns([1.0], [np.array([0.1, 0.2, 0.3])], beta=1.0)
    np.testing.assert_allclose(returns, [0.4, 0.5, 0.7], atol=1e-12)
    (returns,) = token_returns([1.0], [np.zeros(3)], beta=1.0, gamma=0.5)
    np.testing.assert_allclose(returns, [0.25, 0.5, 1.0])


@pytest.mark.parametrize("estimator", ["rloo", "reinforce_pp"])
def test_batch_normalisation_across_processes_equals_one_process(estimator):
    """Two processes (threads), one group each, whiten with the moments summed over both (the objective's
    gather through the coordination service): the advantages of one process holding both groups."""
    kl = [o - r for o, r in zip(LP_OLD, LP_REF)]

    def advantages(h, gather=None):
        kw = {} if gather is None else {"gather": gather}
        if estimator == "rloo":
            return rloo_advantages(REWARDS[h], np.array(_kl_sums())[h], G, beta=BETA, normalize=True, **kw)
        return np.concatenate(reinforce_pp_advantages(REWARDS[h], kl[h], beta=BETA, **kw))

    barrier, parts = threading.Barrier(2), {}

    def gather(part):
        parts[threading.get_ident()] = part
        barrier.wait()
        total = tuple(float(sum(p[k] for p in parts.values())) for k in range(2))
        barrier.wait()
        return total

    halves = [slice(0, 4), slice(4, 8)]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        split = list(pool.map(lambda h: advantages(h, gather), halves))
    np.testing.assert_allclose(np.concatenate(split), advantages(slice(0, 8)), atol=1e-6)


def _trl_rloo_loss(lp, lp_old, advantages, eps_low, eps_high):
    """TRL RLOOTrainer._compute_loss: sequence log-ratio (sums), clipped, mean over completions."""
    logps = (lp * MASK).sum(1)
    old_logps = (lp_old * MASK).sum(1)
    coef_1 = torch.exp(logps - old_logps)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_sequence_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    return per_sequence_loss.mean()


def _rows(seqs, packed):
    """[B, T] arrays: padded one completion per row, or all packed into one row (segments 1..N)."""
    t = sum(LENGTHS) if packed else max(LENGTHS)
    n_rows = 1 if packed else len(seqs[0])
    out = {k: np.zeros((n_rows, t), np.float32) for k in ("mask", "seg", *range(len(seqs)))}
    pos = 0
    for i, n in enumerate(LENGTHS):
        row, start = (0, pos) if packed else (i, 0)
        sl = slice(start, start + n)
        out["mask"][row, sl], out["seg"][row, sl] = 1, (i + 1 if packed else 1)
        for k, values in enumerate(seqs):
            out[k][row, sl] = values[i]
        pos += n
    return out


@pytest.mark.parametrize("packed", [False, True])
def test_rloo_sequence_loss_and_gradient_equal_trl(packed):
    lp = [o + np.random.default_rng(1).normal(scale=0.15, size=o.shape) for o in LP_OLD]  # a later pass
    adv = rloo_advantages(REWARDS, _kl_sums(), G, beta=BETA)
    lp_t = _padded(lp).requires_grad_(True)
    trl = _trl_rloo_loss(lp_t, _padded(LP_OLD), torch.tensor(adv), 0.2, 0.2)
    trl.backward()
    rows = _rows([lp, LP_OLD, [np.full(n, a) for n, a in zip(LENGTHS, adv)]], packed)
    seg = jnp.asarray(rows["seg"], jnp.int32)

    def loss(lp_rows):
        s, w, _ = policy_loss(lp_rows, jnp.asarray(rows[2]), jnp.asarray(rows["mask"]), seg,
                              lp_old=jnp.asarray(rows[1]), importance="sequence_sum", aggregation="sequence_mean")
        return s / w

    value, grad = jax.jit(jax.value_and_grad(loss))(jnp.asarray(rows[0]))
    assert float(value) == pytest.approx(trl.item(), abs=1e-5)
    ratios = np.exp([np.sum(a - b) for a, b in zip(lp, LP_OLD)])
    assert np.any((ratios > 1.2) | (ratios < 0.8)) and np.any(np.abs(ratios - 1) < 0.2)  # clipped and not
    trl_grad = lp_t.grad.numpy()
    grad = np.asarray(grad)
    pos = 0
    for i, n in enumerate(LENGTHS):
        ours = grad[0, pos : pos + n] if packed else grad[i, :n]
        np.testing.assert_allclose(ours, trl_grad[i, :n], atol=1e-5)
        pos += n


def test_rloo_single_pass_gradient_is_minus_the_advantage_per_token():
    """Without old log-probs the ratio is 1: d loss / d lp_t = -A_i / N for every token of completion i."""
    seg, mask = jnp.array([[1, 1, 2, 0]]), jnp.array([[1, 1, 1, 0]])
    adv = jnp.array([[0.5, 0.5, -1.0, 0.0]])
    lp = jnp.array([[-1.0, -2.0, -0.5, -3.0]])
    grad = jax.jit(jax.grad(lambda x: policy_loss(x, adv, mask, seg, importance="sequence_sum")[0] / 2))(lp)
    np.testing.assert_allclose(grad, [[-0.25, -0.25, 0.5, 0.0]], rtol=1e-6)
    s, w, _ = jax.jit(lambda x: policy_loss(x, adv, mask, seg, importance="sequence_sum"))(lp)
    assert float(s) == pytest.approx(-0.5 + 1.0) and float(w) == 2.0
