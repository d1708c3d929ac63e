"""The update phase of online RL: ``ppo_epochs`` passes over a step's experience in mini-batches, a policy step and
(with a critic) a critic step on each — one loop for PPO-max and every critic-free estimator.

The policy loss per token is the clipped surrogate (Schulman et al. 2017) with DAPO's asymmetric clip ε_low/ε_high
(Yu et al. 2025) — weighted, when another engine sampled the rollout, by truncated importance sampling min(π_old/μ,
C) (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training") — plus, when the KL
sits in the loss (GRPO, Shao et al. 2024), ``β · KL_t(π ‖ π_ref)`` by the k1, k2 or k3 estimator, minus an entropy
bonus. Its aggregation over the mini-batch is a switch (``losses.aggregate``):
DAPO's token mean, the original GRPO's per-sequence token mean, Dr.GRPO's constant normaliser. Numerators are
summed over micro-batches and divided by the whole mini-batch's denominator (all processes), so gradient
accumulation and more processes equal one big batch. Every forward is padding-free on the micro-batch's packed
rows (``moss_rlhf.packing``), the very rows its experience was scored on.

With a critic, in one process on a CPU, the critic's step of a mini-batch runs on a second thread beside the
policy's (``--overlap-critic``): the two read the same experience and change disjoint weights, so only the time
changes — the way OpenRLHF and veRL train actor and critic on workers of their own. At a small model's sizes each
step is mostly per-operator overhead and matrix products too small to use two cores: with two threads the update
phase of ``benchmarks/ppo_throughput.py --epochs 4 --mini-batch 4`` took 0.55 s side by side, 0.74 s in turn.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from moss_rlhf import distributed
from moss_rlhf.losses import (aggregate, aggregation_denominator, clipped_policy_loss, clipped_value_loss,
                              kl_penalty, masked_mean)
from moss_rlhf.packing import packed_logprobs, packed_values
from moss_rlhf.rollout import BatchPlan, Experience
from moss_rlhf.training import Trainee, lm_backward, plain_output_head

# statistics each process holds its share of (the global value is their sum over processes)
SHARED_STATS = {"policy/loss", "policy/clipfrac", "policy/approx_kl", "policy/ratio_mean", "policy/entropy",
                "policy/kl_loss", "policy/first_ratio_mean", "critic/value_loss", "critic/vf_clipfrac",
                "update/forward_tokens", "update/head_tokens", "rollout/is_weight_mean", "rollout/is_capped_share"}


def epoch_order(n_chunks: int, group_span: int, seed: int, step: int, epoch: int) -> list[int]:
    """The micro-batches' order in an epoch: as made in epoch 0 (the first update's ratio is exactly 1), shuffled
    later in blocks of ``group_span`` micro-batches, so that a group spread over several micro-batches stays
    together in one mini-batch."""
    if epoch == 0:
        return list(range(n_chunks))
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 101 + epoch)
    blocks = torch.randperm(n_chunks // group_span, generator=g).tolist()
    return [b * group_span + i for b in blocks for i in range(group_span)]


def rl_update(cfg, plan: BatchPlan, chunks: list[Experience], policy: Trainee | None, critic: Trainee | None,
              ptx, step: int, kl_coef: float) -> dict[str, float]:
    """``ppo_epochs`` passes over the rollout in mini-batches of ``plan.micro_per_mini`` micro-batches, a policy
    step (``policy`` None: not trained this step) and a critic step on each; returns the mean statistics."""
    totals: dict[str, float] = {}
    n_updates = 0
    overlap = policy is not None and critic_beside_policy(cfg, plan, critic, chunks[0].loss_mask.device)
    with critic_thread(overlap) as submit:
        for epoch in range(cfg.ppo_epochs):
            order = epoch_order(len(chunks), plan.group_span, cfg.seed, step, epoch)
            for first in range(0, len(order), plan.micro_per_mini):
                group = [chunks[i] for i in order[first:first + plan.micro_per_mini]]
                counts = distributed.all_reduce_sum(torch.stack([
                    sum(c.loss_mask.sum() for c in group), sum((c.loss_mask.sum(1) > 0).sum() for c in group),
                    sum(c.response_mask.sum() for c in group)]).double()).tolist()
                stats: dict[str, float] = {}
                if critic is not None:  # first: on its own thread, it runs while the policy's step does
                    critic_stats = submit(critic_update, cfg, critic, group, max(counts[2], 1.0), plan.world_size)
                if policy is not None:
                    denominator = aggregation_denominator(cfg.loss_agg, counts[0], counts[1], cfg.max_new_tokens)
                    stats.update(policy_step(cfg, policy, group, max(denominator, 1.0), max(counts[0], 1.0),
                                             plan.world_size, kl_coef, first_update=epoch == 0 and first == 0))
                    if ptx is not None:
                        stats["policy/ptx_loss"] = lm_backward(policy, ptx(step * plan.updates_per_step + n_updates),
                                                               cfg.ptx_coef, plan.world_size)
                    stats["policy/grad_norm"] = policy.step()
                if critic is not None:
                    for key, value in critic_stats.result().items():
                        stats[key] = stats.get(key, 0.0) + value
                for key, value in stats.items():
                    totals[key] = totals.get(key, 0.0) + value
                n_updates += 1
    means = {k: v / (1 if k == "policy/first_ratio_mean" else n_updates) for k, v in totals.items()}
    for key in ("update/forward_tokens", "update/head_tokens"):  # per step, not per update
        means[key] = totals.get(key, 0.0)
    # gradient norms (after DDP's all-reduce) and the PTX loss (reduced in lm_backward) are already global
    return {k: float(distributed.all_reduce_sum(torch.tensor(v, dtype=torch.float64)) if k in SHARED_STATS
                     else v) for k, v in means.items()}


def policy_step(cfg, policy: Trainee, group: list[Experience], denominator: float, n_tokens: float,
                world_size: int, kl_coef: float, first_update: bool = False) -> dict[str, float]:
    """Backward of the policy loss over one mini-batch (``denominator``: the aggregation's, over every process;
    ``n_tokens``: the mini-batch's loss tokens, which weigh the token statistics); returns this process's share of
    the statistics. In a step's ``first_update`` the policy is still the one that sampled: the ratio's denominator
    is its own detached log-prob (exactly what a stored forward gives; TRL does the same), so a step with one
    update needs no stored policy log-probs."""
    kl_in_loss = cfg.kl_placement == "loss" and kl_coef > 0
    stats = dict.fromkeys(("policy/loss", "policy/entropy", "policy/clipfrac", "policy/approx_kl",
                           "policy/ratio_mean", "update/forward_tokens", "update/head_tokens"), 0.0)
    if kl_in_loss:
        stats["policy/kl_loss"] = 0.0
    if first_update:
        stats["policy/first_ratio_mean"] = 0.0
    tis = getattr(cfg, "rollout_is", "none") == "tis"
    if tis:
        stats.update({"rollout/is_weight_mean": 0.0, "rollout/is_capped_share": 0.0})
    head_runs_at_responses = plain_output_head(policy.model) is not None
    for j, chunk in enumerate(group):
        mask = chunk.loss_mask
        share = float(mask.sum()) / n_tokens
        with policy.no_sync(j == len(group) - 1):
            logprobs, entropy = packed_logprobs(policy.module, chunk.packed, cfg.temperature, with_entropy=True,
                                                entropy_grad=cfg.entropy_coef != 0)
            old = logprobs.detach() if first_update else chunk.old_logprobs
            if first_update:  # the diagnostic: against what the experience stored (1 unless the two disagree)
                stats["policy/first_ratio_mean"] += float(masked_mean(torch.exp(old - chunk.old_logprobs),
                                                                      mask)) * share
            per_token, pstats = clipped_policy_loss(logprobs, old, chunk.advantages, mask,
                                                    cfg.clip_eps, reduction="none", clip_eps_high=cfg.clip_eps_high)
            if tis:  # the engine sampled from μ, the surrogate assumes π_old: weigh each token by min(π_old/μ, C)
                ratio = torch.exp(chunk.old_logprobs - chunk.sample_logprobs)
                weight = ratio.clamp(max=cfg.rollout_is_cap)
                per_token = per_token * weight
                stats["rollout/is_weight_mean"] += float(masked_mean(weight, mask)) * share
                stats["rollout/is_capped_share"] += float(masked_mean((ratio > weight).float(), mask)) * share
            if kl_in_loss:
                kl = kl_penalty(logprobs, chunk.ref_logprobs, cfg.kl_estimator, cfg.kl_clamp)
                per_token = per_token + kl_coef * kl
                stats["policy/kl_loss"] += float(masked_mean(kl.detach(), mask)) * share
            if cfg.entropy_coef:
                per_token = per_token - cfg.entropy_coef * entropy
            loss = aggregate(per_token, mask, cfg.loss_agg)
            (loss * world_size / denominator).backward()  # DDP averages over processes
        stats["policy/loss"] += float(loss.detach()) / denominator
        stats["policy/entropy"] += float(masked_mean(entropy.detach(), mask)) * share
        for key in ("clipfrac", "approx_kl", "ratio_mean"):
            stats[f"policy/{key}"] += float(pstats[key]) * share
        stats["update/forward_tokens"] += chunk.packed.n_tokens
        stats["update/head_tokens"] += (len(chunk.packed.predict_index) if head_runs_at_responses
                                        else chunk.packed.n_tokens)
    return stats


def critic_beside_policy(cfg, plan: BatchPlan, critic: Trainee | None, device: torch.device) -> bool:
    """Whether the critic's steps run beside the policy's (``--overlap-critic``): one process, not sharded, on a
    CPU with two or more of torch's threads to share. Otherwise they run in turn: both models' collectives (DDP's,
    FSDP's — even over a group of one) go through one process group, which must see them in one order."""
    return (getattr(cfg, "overlap_critic", False) and critic is not None and plan.world_size == 1
            and getattr(cfg, "parallel", "ddp") != "fsdp" and device.type == "cpu" and torch.get_num_threads() > 1)


@contextlib.contextmanager
def critic_thread(enabled: bool):
    """Yields ``submit(fn, *args) -> Future``: ``fn`` runs on one worker thread, with torch's intra-op threads
    split between it and the calling thread (restored at the end) — or, not ``enabled``, at once on the calling
    thread. Autocast is per thread, so the worker enters the caller's (bf16 runs)."""
    if not enabled:
        def at_once(fn, *args) -> Future:
            done = Future()
            done.set_result(fn(*args))
            return done

        yield at_once
        return
    threads = torch.get_num_threads()
    autocast_on, autocast_dtype = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")

    def in_caller_autocast(fn, *args):
        with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_on):
            return fn(*args)

    pool = ThreadPoolExecutor(1, thread_name_prefix="critic",
                              initializer=lambda: torch.set_num_threads(threads - threads // 2))
    torch.set_num_threads(threads // 2)
    try:
        yield lambda fn, *args: pool.submit(in_caller_autocast, fn, *args)
    finally:
        pool.shutdown()  # waits for a step still running (the policy's side raised)
        torch.set_num_threads(threads)


def critic_update(cfg, critic: Trainee, group: list[Experience], n_tokens: float,
                  world_size: int) -> dict[str, float]:
    """The critic's whole update on one mini-batch: backward of its loss, then its optimizer step."""
    stats = critic_step(cfg, critic, group, n_tokens, world_size)
    stats["critic/grad_norm"] = critic.step()
    return stats


def critic_step(cfg, critic: Trainee, group: list[Experience], n_tokens: float,
                world_size: int) -> dict[str, float]:
    """Backward of the clipped value loss (token mean over the mini-batch's responses, every process) over one
    mini-batch; returns this process's share of the statistics."""
    stats = {"critic/value_loss": 0.0, "critic/vf_clipfrac": 0.0, "update/forward_tokens": 0.0}
    for j, chunk in enumerate(group):
        with critic.no_sync(j == len(group) - 1):
            values = packed_values(critic.module, chunk.packed)
            loss, vstats = clipped_value_loss(values, chunk.old_values, chunk.returns, chunk.response_mask,
                                              cfg.value_clip or float("inf"), reduction="sum")
            (loss * world_size / n_tokens).backward()
        stats["critic/value_loss"] += float(loss.detach()) / n_tokens
        stats["critic/vf_clipfrac"] += float(vstats["vf_clipfrac"]) * float(chunk.response_mask.sum()) / n_tokens
        stats["update/forward_tokens"] += chunk.packed.n_tokens
    return stats
