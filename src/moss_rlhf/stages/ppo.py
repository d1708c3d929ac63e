"""``moss-rlhf ppo``: PPO-max (Zheng et al. 2023, "Secrets of RLHF in Large Language Models Part I: PPO",
arXiv 2307.04964) — the policy learns from a frozen reward model while a per-token KL penalty holds it near the SFT
reference.

Four models: the policy and the frozen reference (both from SFT; with ``--lora-r`` the reference is the policy with
its adapters switched off), the frozen reward model, and the critic (by default initialised from the reward model,
one value per token). Every PPO step, top to bottom:

  1. rollout: sample responses to ``rollout_batch`` prompts, score them once with all four models (``rollout.py``);
  2. rewards: reward-model score (normalised by running moments and clipped) on the last token, minus
     ``kl_coef × KL(policy ‖ reference)`` on every token; GAE(γ, λ) gives advantages and returns;
     advantages are whitened over the batch (and optionally clipped);
  3. update: ``ppo_epochs`` passes over the batch in mini-batches — clipped policy loss (+ entropy bonus, + PPO-ptx
     LM loss) and clipped value loss, each model's gradient norm clipped on its own; for the first
     ``critic_warmup_steps`` steps only the critic learns;
  4. monitor: reward, KL, perplexity, length, entropy, clip fraction... and the paper's collapse signals; validate on
     held-out prompts, keep the best policy in ``best/``, checkpoint atomically (exact resume).

Every trick is a switch; ``--preset ppo_max`` (the default) and ``--preset vanilla`` set them together, and any
switch given explicitly wins over the preset (the preset only fills switches left unset).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moss_rlhf import distributed
from moss_rlhf.config import ConfigError, TrainConfig, atomic_write_text, option
from moss_rlhf.data.collate import BatchOrder, chat_example, left_pad, pad_examples
from moss_rlhf.data.corpus import DEFAULT_WORLD_DIR, world_file
from moss_rlhf.data.formats import load_conversations, load_prompts
from moss_rlhf.generation import SamplingConfig, decode_responses, generate, stop_token_ids
from moss_rlhf.losses import (AdaptiveKLController, FixedKLController, RunningMoments, clipped_policy_loss,
                              clipped_value_loss, gae, lm_loss_sum, masked_mean, masked_sum,
                              per_token_rewards)
from moss_rlhf.models import (LoraOptions, apply_lora, load_causal_lm, load_scorer, load_trainable_state,
                              load_weights, save_model, trainable_state)
from moss_rlhf.rollout import Experience, RewardFn, cat_field, critic_values, make_experience, policy_logprobs
from moss_rlhf.runs import Progress, RunDir, load_checkpoint_state, plot_curves, seed_everything
from moss_rlhf.tokenizer import encode_chat, load_tokenizer
from moss_rlhf.training import autocast, build_optimizer, build_schedule, clip_gradients

# Switches a preset decides; left at None on the command line they come from --preset.
PRESETS: dict[str, dict] = {
    # The paper's PPO-max: reward normalisation + clipping, per-token KL penalty, value clipping, advantage whitening,
    # critic initialised from the reward model, global gradient clipping (PPO-ptx stays optional).
    "ppo_max": dict(reward_norm=True, reward_clip=5.0, kl_coef=0.1, whiten_advantages=True, advantage_clip=0.0,
                    value_clip=0.2, critic_from_reward=True, max_grad_norm=1.0, critic_max_grad_norm=1.0),
    # Plain PPO: raw rewards, no KL penalty, no whitening or clipping of anything but the policy ratio.
    "vanilla": dict(reward_norm=False, reward_clip=0.0, kl_coef=0.0, whiten_advantages=False, advantage_clip=0.0,
                    value_clip=0.0, critic_from_reward=False, max_grad_norm=0.0, critic_max_grad_norm=0.0),
}

PLOT_KEYS = ["reward/raw_mean", "reward/normalized_mean", "kl/per_token", "policy/perplexity", "response/length",
             "policy/entropy", "policy/clipfrac", "critic/value_loss", "critic/explained_variance", "val/reward",
             "gold/score", "kl/coef"]


@dataclass
class PPOConfig(TrainConfig):
    out: str = option("runs/ppo", "run directory")
    policy: str = option("runs/sft/model", "SFT model: the policy starts here and it is the frozen reference")
    reference: str = option("", "reference model (default: --policy; with --lora-r: the policy without adapters)")
    reward_model: str = option("runs/reward/model", "reward model saved by `moss-rlhf reward`")
    critic: str = option("", "critic initialisation (default: the reward model, or the policy with "
                             "--critic-from-reward false)")
    tokenizer: str = option("", "tokenizer (default: the policy's)")
    prompts: list[str] = option([], "prompt files; default: the demo world's rl_prompts.jsonl")
    eval_prompts: list[str] = option([], "held-out prompts; default: the demo world's eval_prompts.jsonl")
    eval_size: int = option(64, "held-out prompts used by each validation")
    world: str = option(DEFAULT_WORLD_DIR, "directory of the demo world (written there if absent)")
    world_size: str = option("default", "demo world size: default or quick", choices=("default", "quick"))
    preset: str = option("ppo_max", "ppo_max or vanilla: fills every switch not given explicitly",
                         choices=("ppo_max", "vanilla"))
    # batch geometry
    rollout_batch: int = option(32, "prompts sampled per PPO step (all processes together)")
    mini_batch: int = option(16, "sequences per optimizer update (all processes together)")
    batch_size: int = option(8, "sequences per policy/critic forward pass per process (micro-batch)")
    score_batch_size: int = option(0, "sequences per forward pass of the frozen reference, reward model and the critic "
                                      "when scoring a rollout (0: the whole rollout of a process at once)")
    ppo_epochs: int = option(2, "passes over each rollout batch")
    # sampling
    max_prompt_len: int = option(128, "longest prompt in tokens (longer ones keep their end)")
    max_new_tokens: int = option(48, "longest response in tokens")
    temperature: float = option(1.0, "sampling temperature")
    top_p: float = option(1.0, "nucleus sampling")
    top_k: int = option(0, "top-k sampling (0: off)")
    repetition_penalty: float = option(1.0, "repetition penalty (>1 penalises)")
    # optimisation
    max_steps: int = option(100, "PPO steps (rollout + update) to run")
    lr: float = option(3e-5, "policy learning rate")
    critic_lr: float = option(1e-4, "critic learning rate")
    warmup_steps: int = option(0, "learning-rate warm-up in PPO steps")
    min_lr_ratio: float = option(1.0, "cosine decay floor (1: constant learning rate)")
    max_grad_norm: float | None = option(None, "policy gradient-norm clip, 0 disables (default: from --preset)")
    critic_max_grad_norm: float | None = option(None, "critic gradient-norm clip, 0 disables (default: from --preset)")
    # PPO-max switches (None: from --preset)
    kl_coef: float | None = option(None, "per-token KL penalty coefficient (initial one when adaptive)")
    kl_estimator: str = option("k1", "per-token KL estimator: k1 (log ratio) or k3", choices=("k1", "k3"))
    adaptive_kl: bool = option(False, "adapt the KL coefficient towards --kl-target (Ziegler et al. 2019)")
    kl_target: float = option(1.0, "target KL per sequence for --adaptive-kl")
    kl_horizon: float = option(10000.0, "horizon in samples for --adaptive-kl")
    reward_norm: bool | None = option(None, "normalise rewards by running mean/std")
    reward_clip: float | None = option(None, "clip (normalised) rewards to ±this, 0 disables")
    whiten_advantages: bool | None = option(None, "whiten advantages over the batch")
    advantage_clip: float | None = option(None, "clip advantages to ±this after whitening, 0 disables")
    value_clip: float | None = option(None, "value-loss clip range around the old values, 0 disables")
    critic_from_reward: bool | None = option(None, "initialise the critic from the reward model (else the policy)")
    gamma: float = option(1.0, "GAE discount γ")
    lam: float = option(0.95, "GAE λ")
    clip_eps: float = option(0.2, "policy ratio clip ε")
    entropy_coef: float = option(0.0, "entropy bonus coefficient")
    critic_warmup_steps: int = option(0, "PPO steps in which only the critic learns")
    ptx_data: list[str] = option([], "PPO-ptx: conversation files whose LM loss is mixed into the policy loss")
    ptx_coef: float = option(0.0, "PPO-ptx loss coefficient")
    ptx_batch_size: int = option(4, "PPO-ptx conversations per update per process")
    lora_r: int = option(0, "LoRA rank for the policy (0: full fine-tuning); the reference is then the base")
    lora_alpha: int = option(16, "LoRA alpha")
    # monitoring
    log_every: int = option(1, "write metrics every N steps")
    eval_every: int = option(10, "validate on held-out prompts every N steps (0: only at the end)")
    save_every: int = option(20, "checkpoint every N steps (0: only at the end)")
    best_metric: str = option("auto", "what picks best/: reward (RM), gold (demo judge) or auto (gold if available)",
                              choices=("auto", "reward", "gold"))
    collapse_kl: float = option(0.5, "warn when KL per token to the reference exceeds this")
    collapse_perplexity: float = option(1.1, "warn when the response perplexity under the policy falls below this")
    collapse_length_share: float = option(0.8, "warn when this share of responses hits --max-new-tokens")
    collapse_reward_sigmas: float = option(6.0, "warn when the raw reward p95 exceeds the first step's mean by this "
                                                "many of its standard deviations")
    stop_on_collapse: bool = option(False, "stop the run at the first collapse warning")

    def check(self) -> None:
        if self.grad_accum != 1:
            raise ConfigError("--grad-accum is derived in PPO: mini_batch / (batch_size × processes); leave it at 1")
        for name in ("rollout_batch", "mini_batch", "batch_size", "ppo_epochs", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.rollout_batch % self.mini_batch:
            raise ConfigError(f"--rollout-batch ({self.rollout_batch}) must be a multiple of --mini-batch "
                              f"({self.mini_batch})")
        if self.ptx_coef > 0 and not self.ptx_data:
            raise ConfigError("--ptx-coef > 0 needs --ptx-data")


def resolve_preset(cfg: PPOConfig) -> PPOConfig:
    """The config with every unset (None) switch taken from ``cfg.preset``; explicit values are kept."""
    fills = {k: v for k, v in PRESETS[cfg.preset].items() if getattr(cfg, k) is None}
    return dataclasses.replace(cfg, **fills)


@dataclass(frozen=True)
class BatchPlan:
    world_size: int
    rollout_per_process: int
    mini_per_process: int
    micro_per_mini: int       # gradient accumulation
    updates_per_step: int     # optimizer steps per model per PPO step

    def describe(self, cfg: PPOConfig) -> str:
        return (f"ppo: rollout batch {cfg.rollout_batch} = {self.world_size} process(es) × "
                f"{self.rollout_per_process}; mini-batch {cfg.mini_batch} = {self.world_size} × "
                f"{self.micro_per_mini} micro-batch(es) × {cfg.batch_size}; {cfg.ppo_epochs} epoch(s) × "
                f"{cfg.rollout_batch // cfg.mini_batch} mini-batches = {self.updates_per_step} updates per step; "
                f"{cfg.max_steps} steps = {cfg.max_steps * cfg.rollout_batch} episodes")


def plan_batches(cfg: PPOConfig, world_size: int) -> BatchPlan:
    """Derived batch sizes; impossible combinations are a ConfigError naming the flags."""
    if cfg.mini_batch % (cfg.batch_size * world_size):
        raise ConfigError(f"--mini-batch ({cfg.mini_batch}) must be a multiple of --batch-size ({cfg.batch_size}) × "
                          f"{world_size} process(es)")
    if cfg.rollout_batch % cfg.mini_batch:
        raise ConfigError(f"--rollout-batch ({cfg.rollout_batch}) must be a multiple of --mini-batch "
                          f"({cfg.mini_batch})")
    return BatchPlan(world_size, cfg.rollout_batch // world_size, cfg.mini_batch // world_size,
                     cfg.mini_batch // (cfg.batch_size * world_size),
                     cfg.ppo_epochs * cfg.rollout_batch // cfg.mini_batch)


# ------------------------------------------------------------------------------------------------------------ rewards


def _gather(x: torch.Tensor) -> torch.Tensor:
    """All processes' rows, concatenated (for percentiles); the tensor itself in a single process."""
    if not distributed.is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def _global_mean_var(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, (biased) variance and count of the counted entries of every process's batch: one set of statistics
    for the whole rollout, in float64, in two passes (sum and count, then squared deviations from the global mean)."""
    x = x.double()
    totals = distributed.all_reduce_sum(torch.stack([masked_sum(x, mask), mask.sum().double()]))
    count = totals[1].clamp(min=1)
    mean = totals[0] / count
    squares = distributed.all_reduce_sum(masked_sum((x - mean) ** 2, mask).reshape(1))[0]
    return mean, squares / count, totals[1]


def _global_whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Whiten over the counted entries of every process's batch (one mean and unbiased std for the rollout)."""
    mean, var, n = _global_mean_var(x, mask)
    var = var * n / (n - 1).clamp(min=1)
    return torch.where(mask.bool(), (x - mean) * torch.rsqrt(var + 1e-8), 0.0).to(x.dtype)


def _global_explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - Var(R - V) / Var(R)`` over the counted tokens of the whole rollout; NaN when the returns are constant."""
    _, var_returns, _ = _global_mean_var(returns, mask)
    if float(var_returns) == 0.0:
        return torch.tensor(float("nan"))
    _, var_errors, _ = _global_mean_var(returns - values, mask)
    return 1.0 - var_errors / var_returns


@torch.no_grad()
def assign_advantages(chunks: list[Experience], cfg: PPOConfig, moments: RunningMoments, kl_coef: float) -> dict:
    """Reward shaping, GAE and whitening for the whole rollout, written into each chunk; returns the step's stats."""
    raw = cat_field(chunks, "scores")
    if cfg.reward_norm:
        moments.update(raw)  # synced across processes: every rank normalises with the same moments
        scores = moments.normalize(raw, clip=cfg.reward_clip or None)
    else:
        scores = raw.clamp(-cfg.reward_clip, cfg.reward_clip) if cfg.reward_clip else raw
    mask = cat_field(chunks, "response_mask")
    rewards, kl = per_token_rewards(scores, cat_field(chunks, "old_logprobs"), cat_field(chunks, "ref_logprobs"),
                                    mask, kl_coef, cfg.kl_estimator)
    values = cat_field(chunks, "old_values")
    advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = _global_whiten(advantages, mask)
    if cfg.advantage_clip:
        advantages = torch.where(mask.bool(), advantages.clamp(-cfg.advantage_clip, cfg.advantage_clip), 0.0)
    start = 0
    for chunk in chunks:
        rows = slice(start, start + chunk.sequences.shape[0])
        chunk.advantages, chunk.returns = advantages[rows], returns[rows]
        start = rows.stop

    lengths = mask.sum(1)
    all_raw, all_scores, all_len = _gather(raw), _gather(scores), _gather(lengths)
    logprobs = cat_field(chunks, "old_logprobs")
    sums = torch.stack([masked_sum(kl, mask), mask.sum(), masked_sum(logprobs, mask), torch.ones_like(lengths).sum(),
                        (~cat_field(chunks, "finished")).float().sum()]).double()
    distributed.all_reduce_sum(sums)
    return {"reward/raw_mean": all_raw.mean(), "reward/raw_p50": all_raw.quantile(0.5),
            "reward/raw_p95": all_raw.quantile(0.95), "reward/raw_std": all_raw.std() if len(all_raw) > 1 else 0.0,
            "reward/normalized_mean": all_scores.mean(), "reward/normalized_p50": all_scores.quantile(0.5),
            "reward/normalized_p95": all_scores.quantile(0.95),
            "kl/per_token": sums[0] / sums[1], "kl/per_sequence": sums[0] / sums[3], "kl/coef": kl_coef,
            "policy/perplexity": torch.exp(-sums[2] / sums[1]), "response/length": all_len.float().mean(),
            "response/truncated_share": sums[4] / sums[3],
            "critic/explained_variance": _global_explained_variance(values, returns, mask)}


# ------------------------------------------------------------------------------------------------------------- update


def ppo_update(cfg: PPOConfig, plan: BatchPlan, chunks: list[Experience], policy, critic, policy_opt, critic_opt,
               train_policy: bool, ptx_batch, step: int) -> dict[str, float]:
    """``ppo_epochs`` passes over the rollout in mini-batches of ``plan.micro_per_mini`` micro-batches. Losses are
    token sums divided by the mini-batch's global token count, so accumulation equals one big batch. Epoch 0 keeps
    the micro-batches of experience making in order (ratio exactly 1 at the first update); later epochs shuffle."""
    totals: dict[str, float] = {}
    n_updates = 0
    order = list(range(len(chunks)))
    for epoch in range(cfg.ppo_epochs):
        if epoch > 0:
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 101 + epoch)
            order = torch.randperm(len(chunks), generator=g).tolist()
        for first in range(0, len(order), plan.micro_per_mini):
            group = [chunks[i] for i in order[first:first + plan.micro_per_mini]]
            n_tokens = distributed.all_reduce_sum(sum(c.response_mask.sum() for c in group).double()).clamp(min=1)
            scale = float(plan.world_size / n_tokens)  # DDP averages over processes
            stats = dict.fromkeys(_TOKEN_SHARE_STATS, 0.0)
            for j, chunk in enumerate(group):
                sync = j == len(group) - 1 or plan.world_size == 1
                share = float(chunk.response_mask.sum()) * scale / plan.world_size
                width = chunk.response_width
                with _no_sync(policy, sync), torch.set_grad_enabled(train_policy):
                    logprobs, entropy = policy_logprobs(policy, chunk.sequences, chunk.attention_mask,
                                                        chunk.position_ids, width, with_entropy=True,
                                                        entropy_grad=cfg.entropy_coef != 0)
                    loss, pstats = clipped_policy_loss(logprobs, chunk.old_logprobs, chunk.advantages,
                                                       chunk.response_mask, cfg.clip_eps, reduction="sum")
                    if cfg.entropy_coef:
                        loss = loss - cfg.entropy_coef * masked_sum(entropy, chunk.response_mask)
                    if train_policy:
                        (loss * scale).backward()
                with _no_sync(critic, sync):
                    values = critic_values(critic, chunk.sequences, chunk.attention_mask, chunk.position_ids, width)
                    vloss, vstats = clipped_value_loss(values, chunk.old_values, chunk.returns, chunk.response_mask,
                                                       cfg.value_clip or float("inf"), reduction="sum")
                    (vloss * scale).backward()
                stats["policy/loss"] += float(loss.detach()) * scale / plan.world_size
                stats["critic/value_loss"] += float(vloss.detach()) * scale / plan.world_size
                stats["policy/entropy"] += float(masked_mean(entropy.detach(), chunk.response_mask)) * share
                for key, value in (("clipfrac", pstats["clipfrac"]), ("approx_kl", pstats["approx_kl"]),
                                   ("ratio_mean", pstats["ratio_mean"])):
                    stats[f"policy/{key}"] += float(value) * share
                stats["critic/vf_clipfrac"] += float(vstats["vf_clipfrac"]) * share
            if train_policy and cfg.ptx_coef > 0:
                stats["policy/ptx_loss"] = _ptx_backward(policy, ptx_batch(step * plan.updates_per_step + n_updates),
                                                         cfg.ptx_coef)
            stats["critic/grad_norm"] = clip_gradients(critic, cfg.critic_max_grad_norm)
            critic_opt.step()
            critic_opt.zero_grad(set_to_none=True)
            if train_policy:
                stats["policy/grad_norm"] = clip_gradients(policy, cfg.max_grad_norm)
                policy_opt.step()
            policy_opt.zero_grad(set_to_none=True)
            if epoch == 0 and first == 0:
                stats["policy/first_ratio_mean"] = stats["policy/ratio_mean"]
            for key, value in stats.items():
                totals[key] = totals.get(key, 0.0) + value
            n_updates += 1
    means = {k: v / n_updates for k, v in totals.items() if k != "policy/first_ratio_mean"}
    means["policy/first_ratio_mean"] = totals["policy/first_ratio_mean"]
    # each process holds its token share of the token-weighted statistics: their sum over processes is the global
    # value; gradient norms (after DDP's all-reduce) and the PTX loss (reduced in _ptx_backward) are already global
    summed = set(_TOKEN_SHARE_STATS) | {"policy/first_ratio_mean"}
    return {k: float(distributed.all_reduce_sum(torch.tensor(v, dtype=torch.float64)) if k in summed else v)
            for k, v in means.items()}


_TOKEN_SHARE_STATS = ("policy/loss", "policy/clipfrac", "policy/approx_kl", "policy/ratio_mean", "policy/entropy",
                      "critic/value_loss", "critic/vf_clipfrac")


def _no_sync(model, sync: bool):
    return contextlib.nullcontext() if sync or not hasattr(model, "no_sync") else model.no_sync()


def _ptx_backward(policy, batch: dict[str, torch.Tensor], coef: float) -> float:
    """PPO-ptx (InstructGPT; PPO-max's optional term): ``coef ×`` the mean LM loss on SFT/pretraining data."""
    logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss_sum, n = lm_loss_sum(logits, batch["labels"])
    n_total = distributed.all_reduce_sum(n.double()).clamp(min=1)
    world_size = torch.distributed.get_world_size() if distributed.is_distributed() else 1
    (coef * loss_sum * world_size / n_total).backward()  # DDP averages over processes
    return float(distributed.all_reduce_sum(loss_sum.detach().double()) / n_total)


# --------------------------------------------------------------------------------------------------------------- data


def encode_prompts(tokenizer, conversations: list[list[dict]], max_len: int) -> list[list[int]]:
    """Chat-rendered prompts ending with the assistant tag; a long one keeps its end (where the question is)."""
    return [encode_chat(tokenizer, c, add_generation_prompt=True)[-max_len:] for c in conversations]


def ptx_batches(cfg: PPOConfig, tokenizer, dist: distributed.Dist):
    """PPO-ptx micro-batches: ``batch_at(update)`` is a pure function of the global update number (exact resume)."""
    examples = [chat_example(tokenizer, c, cfg.max_prompt_len + cfg.max_new_tokens)
                for path in cfg.ptx_data for c in load_conversations(path)]
    examples = [e for e in examples if any(label != -100 for label in e.labels[1:])]
    if not examples:
        raise ConfigError(f"--ptx-data {cfg.ptx_data}: no conversation with an assistant turn")
    order = BatchOrder(len(examples), cfg.ptx_batch_size, 1, dist.world_size, cfg.seed)

    def batch_at(update: int) -> dict[str, torch.Tensor]:
        batch = pad_examples([examples[i] for i in order.indices(update, 0, dist.rank)], tokenizer.pad_token_id)
        return {k: v.to(dist.device) for k, v in batch.items()}

    return batch_at


def collapse_signals(metrics: dict[str, float], cfg: PPOConfig, first: dict[str, float]) -> list[str]:
    """The paper's signs of a policy that games the reward model (§5.1): KL running away from the reference,
    perplexity towards 1 (the policy repeats one answer), responses at the length cap, a blown-up reward tail."""
    found = []
    if metrics["kl/per_token"] > cfg.collapse_kl:
        found.append(f"KL per token {metrics['kl/per_token']:.3f} > {cfg.collapse_kl}")
    if metrics["policy/perplexity"] < cfg.collapse_perplexity:
        found.append(f"response perplexity {metrics['policy/perplexity']:.3f} < {cfg.collapse_perplexity}")
    if metrics["response/truncated_share"] > cfg.collapse_length_share:
        found.append(f"{metrics['response/truncated_share']:.0%} of responses hit the length limit")
    ceiling = first["reward/raw_mean"] + cfg.collapse_reward_sigmas * max(first["reward/raw_std"], 1e-6)
    if metrics["reward/raw_p95"] > ceiling:
        found.append(f"reward p95 {metrics['reward/raw_p95']:.3f} > first step's mean + "
                     f"{cfg.collapse_reward_sigmas:g} std ({ceiling:.3f})")
    return found


# ---------------------------------------------------------------------------------------------------------- validate


def _demo_world_prompts(conversations: list[list[dict]]) -> bool:
    """Whether the gold judge recognises every validation prompt (the demo world's, from any file)."""
    if importlib.util.find_spec("moss_rlhf.demo.judge") is None:
        return False
    from moss_rlhf.demo.judge import task_of

    return bool(conversations) and all(task_of(c[-1]["content"]) is not None for c in conversations)


@torch.no_grad()
def validate(cfg: PPOConfig, policy, reward_model, reward_fn, tokenizer, prompts: list[list[dict]],
             sampling: SamplingConfig, use_gold: bool, dist: distributed.Dist) -> tuple[dict[str, float], list[dict]]:
    """Reward-model score (and the demo world's gold judge, labelled ``gold/``) of sampled replies to held-out
    prompts, with a fixed sampling seed so two validations differ only by the policy."""
    generator = torch.Generator(device=dist.device).manual_seed(cfg.seed + 12345)
    rows: list[dict] = []
    rewards: list[torch.Tensor] = []
    for start in range(0, len(prompts), cfg.rollout_batch):
        chunk = prompts[start:start + cfg.rollout_batch]
        ids, mask = left_pad(encode_prompts(tokenizer, chunk, cfg.max_prompt_len), tokenizer.pad_token_id)
        rollout = generate(policy, ids.to(dist.device), mask.to(dist.device), sampling, stop_token_ids(tokenizer),
                           tokenizer.pad_token_id, generator)
        if reward_fn is not None:
            scores = reward_fn(rollout).float()
        else:
            from moss_rlhf.models import sequence_scores

            scores = torch.cat([sequence_scores(reward_model, rollout.sequences[i:i + cfg.batch_size],
                                                rollout.attention_mask[i:i + cfg.batch_size])
                                for i in range(0, len(chunk), cfg.batch_size)]).float()
        rewards.append(scores.cpu())
        for conv, reply, score, length in zip(chunk, decode_responses(tokenizer, rollout), scores.tolist(),
                                              rollout.response_mask.sum(1).tolist()):
            rows.append({"prompt": conv[-1]["content"], "response": reply, "reward": score, "length": length})
    metrics = {"val/reward": float(torch.cat(rewards).mean()),
               "val/length": sum(r["length"] for r in rows) / max(len(rows), 1)}
    if use_gold:
        from moss_rlhf.demo.judge import judge

        for r in rows:
            r["gold"] = judge(r["prompt"], r["response"]).score
        metrics["gold/score"] = sum(r["gold"] for r in rows) / max(len(rows), 1)
    return metrics, rows


def save_policy_atomically(policy, tokenizer, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(policy, tokenizer, tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


# --------------------------------------------------------------------------------------------------------------- run


def _load_models(cfg: PPOConfig, tokenizer, reward_fn: RewardFn | None):
    policy = load_causal_lm(cfg.policy)
    policy.config.use_cache = True
    reference = None
    if cfg.lora_r:
        policy = apply_lora(policy, LoraOptions(cfg.lora_r, cfg.lora_alpha))  # reference = adapters disabled
    else:
        reference = load_causal_lm(cfg.reference or cfg.policy).requires_grad_(False).eval()
    reward_model = None if reward_fn is not None else load_scorer(cfg.reward_model, tokenizer).requires_grad_(False)
    critic_source = cfg.critic or (cfg.reward_model if cfg.critic_from_reward and reward_fn is None else cfg.policy)
    critic = load_scorer(critic_source, tokenizer)
    return policy, reference, reward_model, critic


def run(cfg: PPOConfig, reward_fn: RewardFn | None = None) -> dict[str, float]:
    """``moss-rlhf ppo``. ``reward_fn`` replaces the reward model by a Python function (tests, rule rewards).
    Returns the last step's metrics."""
    cfg = resolve_preset(cfg)
    dist = distributed.init(cfg.device)
    plan = plan_batches(cfg, dist.world_size)
    seed_everything(cfg.seed)
    run_dir = RunDir(cfg.out, cfg, dist.is_main, resume=cfg.resume)
    prompt_files = cfg.prompts or [world_file("rl_prompts.jsonl", cfg.world, cfg.seed, cfg.world_size)]
    eval_files = cfg.eval_prompts or [world_file("eval_prompts.jsonl", cfg.world, cfg.seed, cfg.world_size)]
    prompts = [c for path in prompt_files for c in load_prompts(path)]
    eval_prompts = [c for path in eval_files for c in load_prompts(path)][:cfg.eval_size]
    if len(prompts) < cfg.rollout_batch:
        raise ConfigError(f"{len(prompts)} prompts in {prompt_files} are fewer than one --rollout-batch "
                          f"({cfg.rollout_batch})")
    # gold scores are a validation metric only, for the demo world's prompts, and never reach the training signal
    use_gold = cfg.best_metric != "reward" and reward_fn is None and _demo_world_prompts(eval_prompts)
    if cfg.best_metric == "gold" and not use_gold:
        raise ConfigError("--best-metric gold needs the demo world's eval prompts (no --eval-prompts) and a reward model")

    tokenizer = load_tokenizer(cfg.tokenizer or cfg.policy)
    policy, reference, reward_model, critic = _load_models(cfg, tokenizer, reward_fn)
    for model in (policy, reference, reward_model, critic):
        if model is not None:
            model.to(dist.device)
    policy_opt, critic_opt = build_optimizer(policy, cfg), build_optimizer(critic, cfg, lr=cfg.critic_lr)
    policy_schedule, critic_schedule = build_schedule(policy_opt, cfg), build_schedule(critic_opt, cfg)
    moments = RunningMoments()
    kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
              else FixedKLController(cfg.kl_coef))
    sampling = SamplingConfig(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k, cfg.repetition_penalty)
    order = BatchOrder(len(prompts), plan.rollout_per_process, 1, dist.world_size, cfg.seed)

    step, best, first_stats = 0, -math.inf, None
    checkpoint = run_dir.last_checkpoint() if cfg.resume else None
    if checkpoint is not None:
        state = load_checkpoint_state(checkpoint)
        load_weights(policy, checkpoint / "policy")
        load_trainable_state(policy, state["policy_trainable"])
        load_weights(critic, checkpoint / "critic")
        for obj, key in ((policy_opt, "policy_opt"), (critic_opt, "critic_opt"), (policy_schedule, "policy_schedule"),
                         (critic_schedule, "critic_schedule"), (moments, "moments"), (kl_ctl, "kl_ctl")):
            obj.load_state_dict(state[key])
        step, best, first_stats = state["step"], state["best"], state["first_stats"]
        run_dir.truncate_metrics(step)
        if dist.is_main:
            print(f"ppo: resumed from {checkpoint} at step {step}")
    policy_ddp, critic_ddp = distributed.wrap_ddp(policy, dist), distributed.wrap_ddp(critic, dist)
    ptx = ptx_batches(cfg, tokenizer, dist) if cfg.ptx_coef > 0 else None

    def save(at_step: int) -> None:
        state = {"policy_opt": policy_opt.state_dict(), "critic_opt": critic_opt.state_dict(),
                 "policy_schedule": policy_schedule.state_dict(), "critic_schedule": critic_schedule.state_dict(),
                 "moments": moments.state_dict(), "kl_ctl": kl_ctl.state_dict(), "best": best,
                 "first_stats": first_stats, "policy_trainable": trainable_state(policy)}
        run_dir.save_checkpoint(at_step, {"policy": policy, "critic": critic}, state, tokenizer,
                                keep=cfg.keep_checkpoints)

    if dist.is_main:
        print(plan.describe(cfg))
        print(f"ppo: preset {cfg.preset}; {len(prompts)} prompts, {len(eval_prompts)} held out; reward from "
              f"{'a Python function' if reward_fn else cfg.reward_model}")
    progress = Progress(cfg.max_steps, step, "ppo", enabled=cfg.progress and dist.is_main)
    metrics: dict[str, float] = {}
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        # 1. rollout: a per-step generator, so a resumed run samples exactly what the uninterrupted one did
        batch_prompts = [prompts[i] for i in order.indices(step, 0, dist.rank)]
        ids, mask = left_pad(encode_prompts(tokenizer, batch_prompts, cfg.max_prompt_len), tokenizer.pad_token_id)
        generator = torch.Generator(device=dist.device).manual_seed(cfg.seed * 1_000_003 + step * 7919 + dist.rank)
        policy.eval()
        rollout = generate(policy, ids.to(dist.device), mask.to(dist.device), sampling, stop_token_ids(tokenizer),
                           tokenizer.pad_token_id, generator)
        t_generate = time.perf_counter()
        with autocast(dist.device, cfg.precision):
            chunks = make_experience(policy, reference, critic, reward_model, rollout, cfg.batch_size, reward_fn,
                                     cfg.score_batch_size)
        t_score = time.perf_counter()
        # 2. rewards, advantages
        stats = assign_advantages(chunks, cfg, moments, kl_ctl.value)
        # 3. update
        policy.train()
        critic.train()
        train_policy = step >= cfg.critic_warmup_steps
        with autocast(dist.device, cfg.precision):
            update = ppo_update(cfg, plan, chunks, policy_ddp, critic_ddp, policy_opt, critic_opt, train_policy, ptx,
                                step)
        if train_policy:
            policy_schedule.step()
        critic_schedule.step()
        kl_ctl.update(float(stats["kl/per_sequence"]), cfg.rollout_batch)
        step += 1
        t_update = time.perf_counter()
        # 4. monitor
        metrics = {k: float(v) for k, v in {**stats, **update}.items()}
        metrics.update({"time/generate_s": t_generate - t0, "time/score_s": t_score - t_generate,
                        "time/update_s": t_update - t_score, "time/step_s": t_update - t0,
                        "policy/lr": policy_schedule.get_last_lr()[0], "policy/trained": float(train_policy)})
        first_stats = first_stats or {k: metrics[k] for k in ("reward/raw_mean", "reward/raw_std")}
        warnings = collapse_signals(metrics, cfg, first_stats) if train_policy else []
        metrics["collapse/warnings"] = float(len(warnings))
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.max_steps) or (
                not cfg.eval_every and step == cfg.max_steps):
            val, samples = validate(cfg, policy, reward_model, reward_fn, tokenizer, eval_prompts, sampling, use_gold,
                                    dist)
            metrics.update(val)
            score = val["gold/score"] if use_gold else val["val/reward"]
            if dist.is_main:
                atomic_write_text(run_dir.path / "samples" / f"step-{step:06d}.jsonl",
                                  "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in samples))
                if score > best:
                    best = score
                    save_policy_atomically(policy, tokenizer, run_dir.path / "best")
                    atomic_write_text(run_dir.path / "best.json", json.dumps({"step": step, **val}, indent=1))
        if step % cfg.log_every == 0 or step == cfg.max_steps or step == 1 or "val/reward" in metrics:
            run_dir.log(step, metrics)
        progress.update(0, reward=metrics["reward/raw_mean"], kl=metrics["kl/per_token"])
        if warnings and dist.is_main:
            print(f"ppo: step {step}: collapse warning: {'; '.join(warnings)}")
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
            save(step)
        if warnings and cfg.stop_on_collapse:
            if dist.is_main:
                print(f"ppo: stopping at step {step} (--stop-on-collapse)")
            break
    progress.close()
    save(step)
    if dist.is_main:
        save_model(policy, tokenizer, run_dir.model_path)
        plot_curves(run_dir.path, PLOT_KEYS, title=f"ppo ({cfg.preset})")
        shown = ", ".join(f"{k} {metrics[k]:.3f}" for k in ("reward/raw_mean", "kl/per_token", "response/length",
                                                           "val/reward", "gold/score") if k in metrics)
        print(f"ppo: step {step}: {shown} -> {run_dir.model_path}")
    distributed.barrier()
    run_dir.close()
    return metrics
