"""Advantage estimators of the GRPO family, as pure numpy functions of rewards (host side, float64).

Notation as in grpo_loss.py: completion ``i`` of a group of ``G`` completions of one prompt, total
reward ``r_i``, per completion token ``t`` the KL estimate ``kl_t = lp_old_t - lp_ref_t`` (k1 of
the policy that sampled it, a constant), ``b`` = beta.

================  ======================================================================
estimator         advantage
================  ======================================================================
``grpo``          ``A_i = (r_i - mean_G(r)) / (std_G(r) + 1e-4)`` (see `group_advantages`);
                  the KL is a loss term (grpo_loss.py)
``rloo``          RLOO (Ahmadian et al. 2024; TRL's RLOOTrainer, trl 1.10): the KL is folded into
                  the sequence reward, ``r'_i = r_i - b sum_t kl_t``; leave-one-out baseline
                  ``A_i = r'_i - (sum_{j in group} r'_j - r'_i) / (G - 1)``; with
                  ``normalize_advantages``, ``A <- (A - mean(A)) / (std(A) + 1e-4)`` over the whole
                  rollout batch of every process (sample std, ddof=1, as TRL's nanstd)
``reinforce_pp``  REINFORCE++ (Hu 2025; OpenRLHF's ``reinforce``): token-level reward
                  ``r_t = -b kl_t + [t = last] r_i``, return ``G_t = sum_{s >= t} gamma^(s-t) r_s``,
                  whitened over every completion token of the rollout batch of every process:
                  ``A_t = (G_t - mean(G)) / sqrt(max(var(G), 1e-8))`` (population variance)
================  ======================================================================

`gather` arguments take the process-local moments to the global batch's (multi-host: the
rollout batch is the union of every process's groups); the default is one process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

ESTIMATORS = ("grpo", "rloo", "reinforce_pp")
STD_EPS = 1e-4  # GRPO's and TRL's epsilon added to the std
VAR_FLOOR = 1e-8  # REINFORCE++ (OpenRLHF): variance clamped before the reciprocal square root

# (count, sum) or (count, sum of squared deviations) of this process -> the same summed over processes
Gather = Callable[[tuple[float, float]], tuple[float, float]]


def _local(moments: tuple[float, float]) -> tuple[float, float]:
    return moments


def group_advantages(rewards, group_size: int, *, scale_rewards: bool = True,
                     negative_scale: float = 1.0) -> tuple[np.ndarray, int]:
    """GRPO: (advantage per completion [N], number of zero-spread groups) for rewards [N] in groups
    of G; negative advantages are multiplied by `negative_scale` (grpo_loss.py's table)."""
    r = np.asarray(rewards, np.float64)
    if group_size < 1 or r.size % group_size:
        raise ValueError(f"{r.size} rewards do not split into groups of {group_size}")
    groups = r.reshape(-1, group_size)
    centred = groups - groups.mean(axis=1, keepdims=True)
    spread = groups.std(axis=1, ddof=1, keepdims=True) if group_size > 1 else np.zeros_like(groups[:, :1])
    zero = np.all(groups == groups[:, :1], axis=1)
    adv = centred / (spread + STD_EPS) if scale_rewards else centred
    adv[zero] = 0.0
    adv = np.where(adv < 0, adv * negative_scale, adv)
    return adv.reshape(-1).astype(np.float32), int(zero.sum())


def _batch_mean_std(values: np.ndarray, *, ddof: int, gather: Gather) -> tuple[float, float]:
    """Mean and std of `values` over the global batch (two small reductions across processes)."""
    count, total = gather((float(values.size), float(values.sum())))
    mean = total / max(count, 1.0)
    _, squares = gather((float(values.size), float(np.sum((values - mean) ** 2))))
    return mean, float(np.sqrt(squares / max(count - ddof, 1.0)))


def rloo_advantages(rewards, kl_sums, group_size: int, *, beta: float, normalize: bool = False,
                    gather: Gather = _local) -> np.ndarray:
    """RLOO: advantage per completion [N] from rewards [N] and each completion's summed k1 KL [N]."""
    r = np.asarray(rewards, np.float64) - beta * np.asarray(kl_sums, np.float64)
    if group_size < 2 or r.size % group_size:
        raise ValueError(f"{r.size} rewards do not split into groups of {group_size} >= 2")
    groups = r.reshape(-1, group_size)
    baseline = (groups.sum(axis=1, keepdims=True) - groups) / (group_size - 1)
    adv = (groups - baseline).reshape(-1)
    if normalize:
        mean, std = _batch_mean_std(adv, ddof=1, gather=gather)
        adv = (adv - mean) / (std + STD_EPS)
    return adv.astype(np.float32)


def token_returns(rewards, kl_tokens: Sequence[np.ndarray], *, beta: float, gamma: float = 1.0) -> list[np.ndarray]:
    """REINFORCE++'s per-token returns of each completion (its KL tokens in order; the reward on the last)."""
    out = []
    for reward, kl in zip(np.asarray(rewards, np.float64), kl_tokens):
        step_rewards = -beta * np.asarray(kl, np.float64)
        if step_rewards.size:
            step_rewards[-1] += reward
        returns = np.zeros_like(step_rewards)
        running = 0.0
        for t in range(step_rewards.size - 1, -1, -1):
            running = step_rewards[t] + gamma * running
            returns[t] = running
        out.append(returns)
    return out


def reinforce_pp_advantages(rewards, kl_tokens: Sequence[np.ndarray], *, beta: float, gamma: float = 1.0,
                            gather: Gather = _local) -> list[np.ndarray]:
    """REINFORCE++: per-token advantages of each completion, returns whitened over the global batch."""
    returns = token_returns(rewards, kl_tokens, beta=beta, gamma=gamma)
    flat = np.concatenate(returns) if returns else np.zeros(0)
    mean, std = _batch_mean_std(flat, ddof=0, gather=gather)
    scale = 1.0 / np.sqrt(max(std * std, VAR_FLOOR))
    return [((g - mean) * scale).astype(np.float32) for g in returns]
