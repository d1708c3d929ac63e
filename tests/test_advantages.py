"""The advantage estimators against plain-Python references written here: GAE; the group baselines of GRPO,
Dr.GRPO and RLOO with unequal rewards, a group of identical rewards and groups of one; REINFORCE++'s reward-to-go
with masks and length-1 replies; the per-token broadcast."""

from __future__ import annotations

import math
import random
import statistics

import pytest
import torch

from moss_rlhf import advantages as A


def _padded_mask(lengths: list[int], T: int, offsets: list[int] | None = None) -> torch.Tensor:
    """Right-padded mask; with offsets the counted region starts later (prompt left of it)."""
    offsets = offsets or [0] * len(lengths)
    return torch.tensor([[1.0 if o <= t < o + n else 0.0 for t in range(T)] for n, o in zip(lengths, offsets)])


# ----------------------------------------------------------------------------- GAE


def _gae_ref(rewards, values, mask, gamma, lam):
    advs, rets = [], []
    for r_row, v_row, m_row in zip(rewards, values, mask):
        idx = [t for t, m in enumerate(m_row) if m]
        adv = [0.0] * len(r_row)
        last, next_v = 0.0, 0.0
        for t in reversed(idx):
            delta = r_row[t] + gamma * next_v - v_row[t]
            last = delta + gamma * lam * last
            adv[t] = last
            next_v = v_row[t]
        advs.append(adv)
        rets.append([a + v if m else 0.0 for a, v, m in zip(adv, v_row, m_row)])
    return advs, rets


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (1.0, 0.95), (0.99, 0.95), (0.9, 0.0), (0.5, 0.5)])
def test_gae_matches_reference(gamma, lam):
    rng = random.Random(int(gamma * 100 + lam * 10))
    B, T = 5, 9
    lengths, offsets = [9, 1, 4, 0, 6], [0, 3, 5, 0, 2]
    mask = _padded_mask(lengths, T, offsets)
    rewards = torch.tensor([[rng.gauss(0, 1) for _ in range(T)] for _ in range(B)], dtype=torch.float64)
    values = torch.tensor([[rng.gauss(0, 1) for _ in range(T)] for _ in range(B)], dtype=torch.float64)
    adv, ret = A.gae(rewards, values, mask, gamma, lam)
    adv_ref, ret_ref = _gae_ref(rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam)
    for b in range(B):
        assert adv[b].tolist() == pytest.approx(adv_ref[b])
        assert ret[b].tolist() == pytest.approx(ret_ref[b])
    # padding content is irrelevant
    noisy = torch.where(mask.bool(), rewards, torch.tensor(float("nan"), dtype=torch.float64))
    adv2, _ = A.gae(noisy, values.masked_fill(~mask.bool(), 1e9), mask, gamma, lam)
    torch.testing.assert_close(adv2, adv)


def test_gae_closed_form_and_holes():
    # gamma = lam = 1, V = 0: advantage is the reward-to-go
    r = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    adv, ret = A.gae(r, torch.zeros(1, 4), torch.tensor([[1.0, 1.0, 1.0, 0.0]]), 1.0, 1.0)
    assert adv.tolist() == [[6.0, 5.0, 3.0, 0.0]] and ret.tolist() == adv.tolist()
    # lam = 0: one-step TD error, value after the last token is 0
    v = torch.tensor([[0.5, 1.0, 2.0, 7.0]])
    adv, ret = A.gae(r, v, torch.tensor([[1.0, 1.0, 1.0, 0.0]]), 0.9, 0.0)
    assert adv[0].tolist() == pytest.approx([1 + 0.9 * 1.0 - 0.5, 2 + 0.9 * 2.0 - 1.0, 3 - 2.0, 0.0])
    # a hole in the mask is bridged (the counted tokens form one sequence)
    holed = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    adv_h, _ = A.gae(torch.tensor([[1.0, 99.0, 2.0, 3.0]]), torch.zeros(1, 4), holed, 1.0, 1.0)
    assert adv_h.tolist() == [[6.0, 0.0, 5.0, 3.0]]


# ----------------------------------------------------------------------------- group baselines

SCORES = [3.0, 1.0, 2.0, 0.0,  # unequal rewards
          5.0, 5.0, 5.0, 5.0,  # a group of identical rewards: no signal
          -1.0, 4.0, 0.5, 0.5]


def _groups(values, k):
    return [values[i:i + k] for i in range(0, len(values), k)]


def test_group_center_and_grpo_match_the_definition():
    centered, std = A.group_center(torch.tensor(SCORES), 4)
    for g, group in enumerate(_groups(SCORES, 4)):
        mean, sd = statistics.mean(group), statistics.stdev(group)
        for j, r in enumerate(group):
            assert centered[4 * g + j].item() == pytest.approx(r - mean)
            assert std[4 * g + j].item() == pytest.approx(sd)
    grpo = centered / (std + 1e-6)
    assert grpo[4:8].tolist() == [0.0] * 4  # identical rewards: zero advantage, not NaN
    assert grpo[0].item() == pytest.approx((3.0 - 1.5) / (statistics.stdev([3.0, 1.0, 2.0, 0.0]) + 1e-6))
    solo, solo_std = A.group_center(torch.tensor([2.0, -1.0]), 1)
    assert solo.tolist() == [2.0, -1.0] and solo_std.tolist() == [1.0, 1.0]  # a group of one: no baseline
    with pytest.raises(ValueError, match="groups of 4"):
        A.group_center(torch.tensor(SCORES[:6]), 4)


def test_rloo_is_the_leave_one_out_baseline():
    got = A.rloo(torch.tensor(SCORES), 4)
    for g, group in enumerate(_groups(SCORES, 4)):
        for j, r in enumerate(group):
            others = group[:j] + group[j + 1:]
            assert got[4 * g + j].item() == pytest.approx(r - sum(others) / len(others))
    with pytest.raises(ValueError, match="at least two replies"):
        A.rloo(torch.tensor([1.0, 2.0]), 1)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reward_to_go_with_masks_and_length_one_replies(gamma):
    rng = random.Random(3)
    lengths, offsets = [5, 1, 3, 0], [0, 2, 1, 0]
    mask = _padded_mask(lengths, 6, offsets)
    rewards = torch.tensor([[rng.gauss(0, 1) for _ in range(6)] for _ in range(4)])
    got = A.reward_to_go(rewards, mask, gamma)
    for b, (n, o) in enumerate(zip(lengths, offsets)):
        row = [float(rewards[b, t]) for t in range(o, o + n)]
        expected = [sum(gamma ** (j - i) * row[j] for j in range(i, n)) for i in range(n)]
        assert got[b, o:o + n].tolist() == pytest.approx(expected, rel=1e-6)
        assert got[b, :o].abs().sum() == 0 and got[b, o + n:].abs().sum() == 0
    assert got[1, 2].item() == pytest.approx(float(rewards[1, 2]))  # length 1: its own reward


def test_per_token_broadcast():
    mask = _padded_mask([3, 1], 4)
    assert A.per_token(torch.tensor([2.0, -1.0]), mask).tolist() == [[2, 2, 2, 0], [-1, 0, 0, 0]]
    assert not math.isnan(A.per_token(torch.tensor([float("nan")]), torch.zeros(1, 2)).sum())


# ----------------------------------------------------------------------------- the estimators on a rollout


class Switches:
    """The switches assign_advantages reads, at their critic-free defaults (tests change what they need)."""

    advantage, group_size, std_scaling = "grpo", 3, "group"
    reward_norm, reward_clip, kl_placement, kl_estimator, kl_clamp = False, 0.0, "loss", "k1", 0.0
    gamma, lam, whiten_advantages, advantage_clip, mask_truncated, use_critic = 1.0, 0.95, False, 0.0, False, False

    def __init__(self, **changes):
        self.__dict__.update(changes)


def _chunks(scores, lengths, finished=None, width=4, log_ratio=0.0):
    """One-token-per-step experience for the estimators: rows of ``lengths`` counted tokens, the policy's
    log-probs ``log_ratio`` above the reference's on every token, split into micro-batches of two rows."""
    from moss_rlhf.rollout import Experience

    n = len(scores)
    mask = _padded_mask(lengths, width)
    finished = torch.tensor(finished if finished is not None else [True] * n)
    old = torch.where(mask.bool(), -1.0 + log_ratio, 0.0)
    ref = torch.where(mask.bool(), torch.tensor(-1.0), 0.0)
    rows = []
    for start in range(0, n, 2):
        s = slice(start, start + 2)
        rows.append(Experience(torch.zeros(len(scores[s]), width, dtype=torch.long), mask[s].long(), None, mask[s],
                               old[s], old[s], ref[s], torch.zeros_like(mask[s]), torch.tensor(scores[s]),
                               finished[s]))
    return rows


def _assigned(chunks, cfg, kl_coef=0.0, baseline=None):
    from moss_rlhf.losses import RunningMoments
    from moss_rlhf.rollout import cat_field

    stats = A.assign_advantages(chunks, cfg, RunningMoments(), kl_coef, baseline)
    return cat_field(chunks, "advantages"), cat_field(chunks, "loss_mask"), stats


ROLLOUT_SCORES = [1.0, 2.0, 6.0, 3.0, 3.0, 3.0, 0.5, -1.0, 4.0]  # three groups of three; the middle one all equal
ROLLOUT_LENGTHS = [4, 2, 1, 3, 4, 1, 2, 4, 3]


def _group_ref(values, k, scale):
    """Plain-Python group baselines: each value minus its group's mean, over ``scale(group, deviations)``."""
    out = []
    for g in range(0, len(values), k):
        group = values[g:g + k]
        mean = sum(group) / k
        out += [(v - mean) / scale(group) for v in group]
    return out


@pytest.mark.parametrize("std_scaling", ["group", "batch", "none"])
def test_grpo_on_a_rollout_matches_the_reference(std_scaling):
    """GRPO's sequence advantage on every counted token: group std (+1e-4), the whole batch's std, or none; a group
    of equal rewards gets exactly 0."""
    advantages, mask, stats = _assigned(_chunks(ROLLOUT_SCORES, ROLLOUT_LENGTHS), Switches(std_scaling=std_scaling))
    scale = {"group": lambda g: statistics.stdev(g) + 1e-4, "batch": lambda g: statistics.stdev(ROLLOUT_SCORES) + 1e-8,
             "none": lambda g: 1.0}[std_scaling]
    expected = _group_ref(ROLLOUT_SCORES, 3, scale)
    for row, (value, n) in enumerate(zip(expected, ROLLOUT_LENGTHS)):
        assert advantages[row, :n].tolist() == pytest.approx([value] * n, rel=1e-5, abs=1e-6)
        assert (advantages[row, n:] == 0).all()
    assert (advantages[3:6] == 0).all()  # the group of equal rewards
    assert float(stats["groups/equal_reward_share"]) == pytest.approx(1 / 3)
    assert torch.equal(mask, _padded_mask(ROLLOUT_LENGTHS, 4))


def test_rloo_and_remax_on_a_rollout_with_the_kl_in_the_reward():
    """With the KL in the reward each reply's outcome is its score minus β × its summed KL (k1 = log-ratio 0.5 per
    token here); RLOO subtracts the mean of the other replies' outcomes, ReMax the greedy reply's score."""
    beta, log_ratio = 0.2, 0.5
    outcome = [s - beta * log_ratio * n for s, n in zip(ROLLOUT_SCORES, ROLLOUT_LENGTHS)]
    advantages, _, _ = _assigned(_chunks(ROLLOUT_SCORES, ROLLOUT_LENGTHS, log_ratio=log_ratio),
                                 Switches(advantage="rloo", kl_placement="reward"), kl_coef=beta)
    expected = []
    for g in range(0, 9, 3):
        group = outcome[g:g + 3]
        expected += [v - (sum(group) - v) / 2 for v in group]
    assert advantages[:, 0].tolist() == pytest.approx(expected, rel=1e-5)
    greedy = torch.tensor([2.0] * 3 + [1.0] * 3 + [0.0] * 3)
    advantages, _, _ = _assigned(_chunks(ROLLOUT_SCORES, ROLLOUT_LENGTHS, log_ratio=log_ratio),
                                 Switches(advantage="remax", group_size=1, kl_placement="reward"), kl_coef=beta,
                                 baseline=greedy)
    assert advantages[:, 0].tolist() == pytest.approx([o - b for o, b in zip(outcome, greedy.tolist())], rel=1e-5)
    # the KL in the loss instead: the outcome is the score alone
    advantages, _, _ = _assigned(_chunks(ROLLOUT_SCORES, ROLLOUT_LENGTHS, log_ratio=log_ratio),
                                 Switches(advantage="remax", group_size=1, kl_placement="loss"), kl_coef=beta,
                                 baseline=greedy)
    assert advantages[:, 0].tolist() == pytest.approx([s - b for s, b in zip(ROLLOUT_SCORES, greedy.tolist())], rel=1e-5)


@pytest.mark.parametrize("baseline", [False, True])
def test_reinforce_pp_is_the_whitened_reward_to_go(baseline):
    """REINFORCE++: −β·KL on every token and the score (minus its group's mean, for the baseline variant) on the
    last, summed to go, then whitened over every counted token of the batch."""
    beta, log_ratio = 0.1, 0.3
    advantages, _, _ = _assigned(_chunks(ROLLOUT_SCORES, ROLLOUT_LENGTHS, log_ratio=log_ratio),
                                 Switches(advantage="reinforce_pp_baseline" if baseline else "reinforce_pp",
                                          group_size=3 if baseline else 1, kl_placement="reward",
                                          whiten_advantages=True), kl_coef=beta)
    shaped = _group_ref(ROLLOUT_SCORES, 3, lambda g: 1.0) if baseline else ROLLOUT_SCORES
    to_go = [[shaped[b] - beta * log_ratio * (n - t) for t in range(n)] for b, n in enumerate(ROLLOUT_LENGTHS)]
    flat = [v for row in to_go for v in row]
    mean, std = statistics.fmean(flat), statistics.stdev(flat)
    for b, row in enumerate(to_go):
        assert advantages[b, :len(row)].tolist() == pytest.approx([(v - mean) / std for v in row], rel=1e-4, abs=1e-5)


def test_truncated_replies_can_be_left_out_of_the_loss():
    finished = [True, False, True, True, True, False, True, True, True]
    _, mask, _ = _assigned(_chunks(ROLLOUT_SCORES, ROLLOUT_LENGTHS, finished=finished), Switches(mask_truncated=True))
    assert mask.sum(1).tolist() == [n if f else 0 for n, f in zip(ROLLOUT_LENGTHS, finished)]
    _, mask, _ = _assigned(_chunks(ROLLOUT_SCORES, ROLLOUT_LENGTHS, finished=finished), Switches())
    assert mask.sum(1).tolist() == [float(n) for n in ROLLOUT_LENGTHS]


def test_advantage_statistics_match_their_definitions():
    advantages, _, stats = _assigned(_chunks(ROLLOUT_SCORES, ROLLOUT_LENGTHS), Switches(std_scaling="none"))
    counted = advantages[_padded_mask(ROLLOUT_LENGTHS, 4).bool()].double()
    assert float(stats["advantage/mean"]) == pytest.approx(float(counted.mean()))
    assert float(stats["advantage/std"]) == pytest.approx(float(counted.std(unbiased=False)))
    assert (float(stats["advantage/min"]), float(stats["advantage/max"])) == \
        pytest.approx((float(counted.min()), float(counted.max())))
    assert float(stats["advantage/positive_share"]) == pytest.approx(float((counted > 0).double().mean()))
    above = [n for g in range(0, 9, 3) for s, n in zip(ROLLOUT_SCORES[g:g + 3], ROLLOUT_LENGTHS[g:g + 3])
             if s > sum(ROLLOUT_SCORES[g:g + 3]) / 3]
    below = [n for g in range(0, 9, 3) for s, n in zip(ROLLOUT_SCORES[g:g + 3], ROLLOUT_LENGTHS[g:g + 3])
             if s < sum(ROLLOUT_SCORES[g:g + 3]) / 3]
    assert float(stats["response/length_above_mean_reward"]) == pytest.approx(statistics.fmean(above))
    assert float(stats["response/length_below_mean_reward"]) == pytest.approx(statistics.fmean(below))
