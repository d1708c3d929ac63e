"""Advantage estimators: what turns a rollout's rewards into the per-token signal the policy gradient follows.

The estimators are pure functions of rewards (no model, no I/O):

* ``gae`` — generalised advantage estimation with a critic (Schulman et al. 2016; PPO, PPO-max);
* ``group_center`` — critic-free baselines from the other replies to the same prompt. The rollout keeps each
  prompt's ``k`` replies together as consecutive rows, so a group is a block of ``k`` rows:

  - GRPO (Shao et al. 2024, DeepSeekMath): ``(r - mean_group) / (std_group + eps)``;
  - Dr.GRPO (Liu et al. 2025, "Understanding R1-Zero-like training"): ``r - mean_group`` (no std, which
    over-weights groups of nearly equal rewards);
  - batch std ("Lite PPO", Liu et al. 2025, "Tricks or traps?"): the group mean, divided by the whole batch's std;
  - RLOO (Ahmadian et al. 2024): ``r - mean of the other k-1 replies = k/(k-1) (r - mean_group)``;
  - REINFORCE++-baseline (Hu 2025): ``r - mean_group``, then the token-level reward-to-go, whitened over the batch;
* ``reward_to_go`` — REINFORCE++ (Hu 2025): discounted sums of per-token rewards (the KL penalty on every token, the
  score on the last), then whitened over the batch;
* ReMax (Li et al. 2023): ``r - r(greedy reply to the same prompt)``.

Sequence advantages ``[B]`` become per-token ones with :func:`per_token`. Everything is in float32 or above.

:func:`assign_advantages` applies the configured estimator to a whole rollout (every process's share of it): the
reward shaping of PPO-max (running normalisation, clipping), the KL penalty when it sits in the reward, the
estimator, whitening, and the step's statistics.
"""

from __future__ import annotations

import torch

from moss_rlhf import distributed
from moss_rlhf.losses import RunningMoments, masked_sum, per_token_rewards
from moss_rlhf.rollout import Experience, cat_field, rollout_stats

Tensor = torch.Tensor
ESTIMATORS = ("gae", "grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "remax")
GROUP_STD_EPS = 1e-4  # as TRL: a group of nearly equal rewards is scaled up, but not without bound


@torch.no_grad()
def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over the counted tokens of each row.

    ``delta_t = r_t + gamma V_{t+1} - V_t``, ``A_t = delta_t + gamma lam A_{t+1}`` where t+1 is the
    next *counted* token (masked positions are skipped, so holes in the mask are bridged) and
    the value after the last counted token is 0 (the episode ends with the response).
    Returns ``(advantages, returns)`` with ``returns = advantages + values``; both are 0 at
    masked-out positions.  Inputs are treated as constants (no gradient).
    """
    m = mask.bool()
    dtype = torch.promote_types(torch.promote_types(rewards.dtype, values.dtype), torch.float32)
    rewards, values = torch.where(m, rewards.to(dtype), 0.0), torch.where(m, values.to(dtype), 0.0)
    next_v = torch.zeros(rewards.shape[0], dtype=dtype, device=rewards.device)
    next_a = torch.zeros_like(next_v)
    adv = torch.zeros_like(rewards)
    for t in reversed(range(rewards.shape[1])):
        a = rewards[:, t] + gamma * next_v - values[:, t] + gamma * lam * next_a
        mt = m[:, t]
        adv[:, t] = torch.where(mt, a, 0.0)
        next_v = torch.where(mt, values[:, t], next_v)
        next_a = torch.where(mt, a, next_a)
    return adv, torch.where(m, adv + values, 0.0)


def group_center(scores: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """``(scores - their group's mean, their group's unbiased std)`` per row, for consecutive groups of
    ``group_size`` rows; a group of one has mean 0 and std 1 (no baseline to take from it)."""
    if scores.shape[0] % group_size:
        raise ValueError(f"{scores.shape[0]} scores do not split into groups of {group_size}")
    groups = scores.double().view(-1, group_size)
    if group_size == 1:
        return scores.double(), torch.ones_like(scores, dtype=torch.float64)
    mean = groups.mean(1, keepdim=True)
    std = groups.std(1, keepdim=True)
    return (groups - mean).view(-1), std.expand_as(groups).reshape(-1)


def rloo(scores: Tensor, group_size: int) -> Tensor:
    """Leave-one-out: each reply's score minus the mean of the other replies to its prompt."""
    if group_size < 2:
        raise ValueError("RLOO needs at least two replies per prompt (--group-size 2 or more)")
    centered, _ = group_center(scores, group_size)
    return centered * group_size / (group_size - 1)


@torch.no_grad()
def reward_to_go(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """``G_t = sum_{t' >= t} gamma^(t'-t) r_t'`` over the counted tokens of each row (0 where masked out)."""
    m = mask.bool()
    running = torch.zeros(rewards.shape[0], dtype=torch.float64, device=rewards.device)
    out = torch.zeros_like(rewards, dtype=torch.float64)
    for t in reversed(range(rewards.shape[1])):
        running = torch.where(m[:, t], rewards[:, t].double() + gamma * running, running)
        out[:, t] = torch.where(m[:, t], running, 0.0)
    return out


def per_token(sequence_advantages: Tensor, mask: Tensor) -> Tensor:
    """A sequence-level advantage ``[B]`` on every counted token of its row ``[B, T]``."""
    return torch.where(mask.bool(), sequence_advantages[:, None].to(torch.float64), 0.0)


@torch.no_grad()
def assign_advantages(chunks: list[Experience], cfg, moments: RunningMoments, kl_coef: float,
                      baseline: Tensor | None = None) -> dict:
    """Advantages (and, with a critic, value targets) for the whole rollout, written into each chunk, with the
    loss mask; returns the step's statistics. ``cfg`` holds the switches: advantage, group_size, std_scaling,
    reward_norm, reward_clip, kl_placement, kl_estimator, kl_clamp, gamma, lam, whiten_advantages, advantage_clip,
    mask_truncated, use_critic. ``baseline``: ReMax's scores of the greedy replies, one per row."""
    raw = cat_field(chunks, "scores")
    if cfg.reward_norm:
        moments.update(raw)  # synced across processes: every rank normalises with the same moments
        scores = moments.normalize(raw, clip=cfg.reward_clip or None)
        baseline = None if baseline is None else moments.normalize(baseline, clip=cfg.reward_clip or None)
    else:
        scores = raw.clamp(-cfg.reward_clip, cfg.reward_clip) if cfg.reward_clip else raw
        baseline = baseline.clamp(-cfg.reward_clip, cfg.reward_clip) if cfg.reward_clip and baseline is not None \
            else baseline
    mask, logprobs = cat_field(chunks, "response_mask"), cat_field(chunks, "old_logprobs")
    k, estimator = cfg.group_size, cfg.advantage
    shaped = group_center(scores, k)[0].float() if estimator == "reinforce_pp_baseline" else scores
    penalty = kl_coef if cfg.kl_placement == "reward" else 0.0  # in the loss: the update adds it
    rewards, kl = per_token_rewards(shaped, logprobs, cat_field(chunks, "ref_logprobs"), mask, penalty,
                                    cfg.kl_estimator, cfg.kl_clamp)
    values, returns = cat_field(chunks, "old_values"), None
    if estimator == "gae":
        advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
    elif estimator in ("reinforce_pp", "reinforce_pp_baseline"):
        advantages = reward_to_go(rewards, mask, cfg.gamma)
    else:
        outcome = rewards.double().sum(1)  # the score minus the summed KL penalty (when it is in the reward)
        if estimator == "grpo":
            centered, group_std = group_center(outcome, k)
            scale = {"group": group_std + GROUP_STD_EPS, "batch": distributed.gather_rows(outcome).std() + 1e-8,
                     "none": torch.ones_like(group_std)}[cfg.std_scaling]
            sequence = centered / scale
        elif estimator == "rloo":
            sequence = rloo(outcome, k)
        elif estimator == "remax":
            sequence = outcome - baseline.double()
        else:
            raise ValueError(f"unknown advantage estimator {estimator!r} ({', '.join(ESTIMATORS)})")
        advantages = per_token(sequence, mask)
    if cfg.whiten_advantages:
        advantages = distributed.global_whiten(advantages, mask)
    if cfg.advantage_clip:
        advantages = torch.where(mask.bool(), advantages.clamp(-cfg.advantage_clip, cfg.advantage_clip), 0.0)
    finished = cat_field(chunks, "finished")
    loss_mask = mask * finished[:, None].to(mask.dtype) if cfg.mask_truncated else mask
    start = 0
    for chunk in chunks:
        rows = slice(start, start + chunk.sequences.shape[0])
        chunk.advantages, chunk.loss_mask = advantages[rows].float(), loss_mask[rows]
        chunk.returns = None if returns is None else returns[rows]
        start = rows.stop

    stats = rollout_stats(chunks, raw, scores, kl, kl_coef)
    stats.update(advantage_stats(advantages, mask, raw, k))
    if cfg.use_critic:
        stats["critic/explained_variance"] = distributed.global_explained_variance(values, returns, mask)
    return stats


def advantage_stats(advantages: Tensor, mask: Tensor, raw: Tensor, group_size: int) -> dict[str, Tensor]:
    """Over every process's rollout: the advantages' mean, std, extremes and share of positive ones (per token);
    the share of groups whose rewards are all equal (no learning signal for a group baseline); and the mean reply
    length of replies scored above and below their group's mean reward (the batch's when groups are of one)."""
    m = mask.bool()
    mean, var, _ = distributed.global_mean_var(advantages, m)
    extremes = distributed.gather_rows(torch.stack([torch.where(m, advantages, torch.inf).amin(1),
                                                    torch.where(m, advantages, -torch.inf).amax(1)], 1).double())
    rows = raw.double()
    groups = rows.view(-1, group_size)
    equal = (groups == groups[:, :1]).all(1).double()
    reference = (groups.mean(1, keepdim=True).expand(-1, group_size).reshape(-1) if group_size > 1
                 else distributed.gather_rows(rows).mean().expand_as(rows))
    above, below = rows > reference, rows < reference
    lengths = mask.sum(1).double()
    sums = distributed.all_reduce_sum(torch.stack([
        masked_sum(advantages.double() > 0, m).double(), m.sum().double(), equal.sum(), torch.tensor(len(equal)),
        (lengths * above).sum(), above.sum(), (lengths * below).sum(), below.sum()]).double())
    stats = {"advantage/mean": mean, "advantage/std": var.sqrt(), "advantage/min": extremes[:, 0].min(),
             "advantage/max": extremes[:, 1].max(), "advantage/positive_share": sums[0] / sums[1].clamp(min=1),
             "response/length_above_mean_reward": sums[4] / sums[5] if sums[5] else torch.tensor(float("nan")),
             "response/length_below_mean_reward": sums[6] / sums[7] if sums[7] else torch.tensor(float("nan"))}
    if group_size > 1:
        stats["groups/equal_reward_share"] = sums[2] / sums[3]
    return stats
