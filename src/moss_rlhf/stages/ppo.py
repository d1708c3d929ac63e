"""``moss-rlhf ppo``: PPO-max (Zheng et al. 2023, "Secrets of RLHF in Large Language Models Part I: PPO",
arXiv 2307.04964) — the policy learns from a frozen reward model while a per-token KL penalty holds it near the SFT
reference.

Four models (``rollout.RLModels``): the policy and the frozen reference (both from SFT; with ``--lora-r`` the
reference is the policy with its adapters switched off), the frozen reward model, and the critic (by default
initialised from the reward model, one value per token; ``--no-use-critic`` runs without one). Dropout is off in
all four. Every PPO step, top to bottom:

  1. rollout: the sampler samples responses to ``rollout_batch`` prompts (per-prompt seeds), and all models score
     them once, log-probs at the sampling temperature (``rollout.make_experience``);
  2. rewards (``rollout.assign_advantages``): reward-model score (normalised by running moments, clipped) on the
     last token, minus ``kl_coef × KL(policy ‖ reference)`` on every token; GAE(γ, λ) gives advantages and returns
     (without a critic the values are 0: the reward-to-go); advantages are whitened over the global batch;
  3. update: ``ppo_epochs`` passes over the batch in mini-batches; on each, a policy step (clipped surrogate,
     + entropy bonus, + PPO-ptx LM loss) and a critic step (clipped value loss), each model's gradient norm clipped
     on its own; for the first ``critic_warmup_steps`` steps only the critic learns; then the sampler syncs weights;
  4. monitor: reward, KL, perplexity, length, entropy, clip fraction... and the paper's collapse signals; validate on
     held-out prompts (with the caller's scorers, e.g. the demo's gold judge), keep the best policy in ``best/``,
     checkpoint atomically (exact resume).

Every trick is a switch; ``--preset ppo_max`` (the default) and ``--preset vanilla`` set them together, and a
switch given explicitly wins over the preset. A NaN/Inf reward or update is never applied (``--on-nonfinite``)."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass

import torch

from moss_rlhf import distributed
from moss_rlhf.checkpoint import Checkpointer, seed_everything
from moss_rlhf.config import ConfigError, TrainConfig, option
from moss_rlhf.files import atomic_write_text
from moss_rlhf.data.collate import BatchOrder
from moss_rlhf.data.formats import load_prompts
from moss_rlhf.data.splits import load_split
from moss_rlhf.losses import (AdaptiveKLController, FixedKLController, RunningMoments, clipped_policy_loss,
                              clipped_value_loss, masked_mean, masked_sum)
from moss_rlhf.models import LoraOptions, save_model
from moss_rlhf.rollout import (BatchPlan, Experience, RewardFn, assign_advantages, collapse_signals, critic_values,
                               load_rl_models, make_experience, nonfinite_rollout, plan_batches, response_logprobs,
                               reward_scores)
from moss_rlhf.runs import Progress, RunDir, plot_curves
from moss_rlhf.sampling import SamplingConfig, encode_prompts, prompt_seeds
from moss_rlhf.sampling.builtin import BuiltinSampler
from moss_rlhf.scoring import TextScorer, validate
from moss_rlhf.tokenizer import load_tokenizer
from moss_rlhf.training import Trainee, autocast, lm_backward, lm_batches, nonfinite, skip_or_stop

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
             "val/gold", "kl/coef"]


@dataclass
class PPOConfig(TrainConfig):
    out: str = option("runs/ppo", "run directory")
    policy: str = option("runs/sft/model", "SFT model: the policy starts here and it is the frozen reference")
    reference: str = option("", "reference model (default: --policy; with --lora-r: the policy without adapters)")
    reward_model: str = option("runs/reward/model", "reward model saved by `moss-rlhf reward`")
    critic: str = option("", "critic initialisation (default: the reward model; the policy without "
                             "--critic-from-reward)")
    tokenizer: str = option("", "tokenizer (default: the policy's)")
    prompts: list[str] = option([], "prompt files ({\"prompt\"} or {\"messages\"} records)")
    eval_prompts: list[str] = option([], "held-out prompts; default: --eval-size prompts held out of --prompts")
    eval_size: int = option(64, "held-out prompts used by each validation", at_least=1)
    preset: str = option("ppo_max", "ppo_max or vanilla: fills every switch not given explicitly",
                         choices=tuple(PRESETS))
    # batch geometry
    rollout_batch: int = option(32, "prompts sampled per PPO step (all processes together)", at_least=1)
    mini_batch: int = option(16, "sequences per optimizer update (all processes together)", at_least=1)
    batch_size: int = option(8, "sequences per policy/critic forward pass per process (micro-batch)", at_least=1)
    score_batch_size: int = option(0, "sequences per forward pass of the frozen models scoring a rollout (0: the "
                                      "whole rollout of a process at once)", at_least=0)
    ppo_epochs: int = option(2, "passes over each rollout batch", at_least=1)
    # sampling
    max_prompt_len: int = option(128, "longest prompt in tokens (longer ones keep their end)", at_least=1)
    max_new_tokens: int = option(48, "longest response in tokens", at_least=1)
    temperature: float = option(1.0, "sampling temperature; log-probs (ratio, KL) are scored at it", above=0.0)
    top_p: float = option(1.0, "nucleus sampling (< 1 needs --accept-sampling-bias)", above=0.0, at_most=1.0)
    top_k: int = option(0, "top-k sampling, 0: off (needs --accept-sampling-bias)", at_least=0)
    repetition_penalty: float = option(1.0, "repetition penalty (≠ 1 needs --accept-sampling-bias)", above=0.0)
    accept_sampling_bias: bool = option(False, "allow top-k/top-p/repetition penalty, scoring the ratio and KL "
                                               "against softmax(logits/T) all the same (off-policy)")
    # optimisation
    max_steps: int = option(100, "PPO steps (rollout + update) to run", at_least=1)
    lr: float = option(3e-5, "policy learning rate", above=0.0)
    critic_lr: float = option(1e-4, "critic learning rate", above=0.0)
    warmup_steps: int = option(0, "learning-rate warm-up in PPO steps", at_least=0)
    min_lr_ratio: float = option(1.0, "cosine decay floor (1: constant learning rate)", at_least=0.0, at_most=1.0)
    max_grad_norm: float | None = option(None, "policy gradient-norm clip, 0 disables", at_least=0.0)
    critic_max_grad_norm: float | None = option(None, "critic gradient-norm clip, 0 disables", at_least=0.0)
    # PPO-max switches (None here and above: from --preset)
    kl_coef: float | None = option(None, "per-token KL penalty coefficient (initial one when adaptive)", at_least=0.0)
    kl_estimator: str = option("k1", "per-token KL estimator in the reward: k1 (log ratio), k2 or k3; each "
                                     "estimate is clamped to ±--kl-clamp", choices=("k1", "k2", "k3"))
    kl_clamp: float = option(10.0, "clamp of the per-token KL estimate (0: none)", at_least=0.0)
    adaptive_kl: bool = option(False, "adapt the KL coefficient towards --kl-target (Ziegler et al. 2019)")
    kl_target: float = option(1.0, "target KL per sequence for --adaptive-kl", above=0.0)
    kl_horizon: float = option(10000.0, "horizon in samples for --adaptive-kl", above=0.0)
    reward_norm: bool | None = option(None, "normalise rewards by running mean/std")
    reward_clip: float | None = option(None, "clip (normalised) rewards to ±this, 0 disables", at_least=0.0)
    whiten_advantages: bool | None = option(None, "whiten advantages over the batch")
    advantage_clip: float | None = option(None, "clip advantages to ±this after whitening, 0 disables", at_least=0.0)
    value_clip: float | None = option(None, "value-loss clip range around the old values, 0 disables", at_least=0.0)
    critic_from_reward: bool | None = option(None, "initialise the critic from the reward model (else the policy)")
    use_critic: bool = option(True, "train a critic; without one the values are 0 and GAE's advantages are the "
                                    "(γλ-discounted) reward-to-go")
    gamma: float = option(1.0, "GAE discount γ", at_least=0.0, at_most=1.0)
    lam: float = option(0.95, "GAE λ", at_least=0.0, at_most=1.0)
    clip_eps: float = option(0.2, "policy ratio clip ε", above=0.0)
    entropy_coef: float = option(0.0, "entropy bonus coefficient", at_least=0.0)
    critic_warmup_steps: int = option(0, "PPO steps in which only the critic learns", at_least=0)
    ptx_data: list[str] = option([], "PPO-ptx: conversation files whose LM loss is mixed into the policy loss")
    ptx_coef: float = option(0.0, "PPO-ptx loss coefficient", at_least=0.0)
    ptx_batch_size: int = option(4, "PPO-ptx conversations per update per process", at_least=1)
    lora_r: int = option(0, "LoRA rank for the policy (0: full fine-tuning); the reference is the base", at_least=0)
    lora_alpha: int = option(16, "LoRA alpha", at_least=1)
    # monitoring
    log_every: int = option(1, "write metrics every N steps", at_least=1)
    eval_every: int = option(10, "validate on held-out prompts every N steps (0: only at the end)", at_least=0)
    save_every: int = option(20, "checkpoint every N steps (0: only at the end)", at_least=0)
    best_metric: str = option("auto", "what picks best/: 'reward' (the reward model on the held-out prompts), the "
                                      "name of a validation scorer the caller passes (the demo: 'gold'), or 'auto' "
                                      "(the first such scorer, else reward)", free_on_resume=True)
    collapse_kl: float = option(0.5, "warn when KL per token to the reference exceeds this", above=0.0,
                                free_on_resume=True)
    collapse_perplexity: float = option(1.1, "warn when the policy's perplexity of its replies falls below this",
                                        at_least=1.0, free_on_resume=True)
    collapse_length_share: float = option(0.8, "warn when this share of replies hits --max-new-tokens", above=0.0,
                                          at_most=1.0, free_on_resume=True)
    collapse_reward_sigmas: float = option(6.0, "warn when the raw reward p95 exceeds the first step's mean by this "
                                                "many of its standard deviations", above=0.0, free_on_resume=True)
    stop_on_collapse: bool = option(False, "stop the run at the first collapse warning", free_on_resume=True)

    def check(self) -> None:
        if not self.prompts:
            raise ConfigError("give --prompts FILE (repeat for several): the prompts to sample responses to")
        if self.grad_accum != 1:
            raise ConfigError("--grad-accum is derived in PPO: mini_batch / (batch_size × processes); leave it at 1")
        if self.rollout_batch % self.mini_batch:
            raise ConfigError(f"--rollout-batch ({self.rollout_batch}) must be a multiple of --mini-batch "
                              f"({self.mini_batch})")
        if self.ptx_coef > 0 and not self.ptx_data:
            raise ConfigError("--ptx-coef > 0 needs --ptx-data")
        sampling = SamplingConfig(self.max_new_tokens, self.temperature, self.top_p, self.top_k,
                                  self.repetition_penalty)
        if sampling.filters_distribution and not self.accept_sampling_bias:
            raise ConfigError(f"--top-k {self.top_k} / --top-p {self.top_p} / --repetition-penalty "
                              f"{self.repetition_penalty}: rollouts would not come from softmax(logits / T), the "
                              f"distribution PPO's ratio and KL are computed for; pass --accept-sampling-bias to "
                              f"train off-policy anyway")


def resolve_preset(cfg: PPOConfig) -> PPOConfig:
    """The config with every unset (None) switch taken from ``cfg.preset``; explicit values are kept."""
    fills = {k: v for k, v in PRESETS[cfg.preset].items() if getattr(cfg, k) is None}
    return dataclasses.replace(cfg, **fills)


# ------------------------------------------------------------------------------------------------------------- update


def ppo_update(cfg: PPOConfig, plan: BatchPlan, chunks: list[Experience], policy: Trainee | None,
               critic: Trainee | None, ptx, step: int) -> dict[str, float]:
    """``ppo_epochs`` passes over the rollout in mini-batches of ``plan.micro_per_mini`` micro-batches, a policy step
    (``policy`` None: not trained this step) and a critic step on each. Losses are token sums divided by the
    mini-batch's global token count, so accumulation equals one big batch. Epoch 0 keeps the micro-batches of
    experience making in order (ratio exactly 1 at the first update); later epochs shuffle."""
    totals: dict[str, float] = {}
    n_updates = 0
    order = list(range(len(chunks)))
    for epoch in range(cfg.ppo_epochs):
        if epoch > 0:
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 101 + epoch)
            order = torch.randperm(len(chunks), generator=g).tolist()
        for first in range(0, len(order), plan.micro_per_mini):
            group = [chunks[i] for i in order[first:first + plan.micro_per_mini]]
            n_tokens = float(distributed.all_reduce_sum(sum(c.response_mask.sum() for c in group).double()))
            stats = {}
            if policy is not None:
                stats.update(policy_step(cfg, policy, group, max(n_tokens, 1.0), plan.world_size))
                if ptx is not None:
                    stats["policy/ptx_loss"] = lm_backward(policy, ptx(step * plan.updates_per_step + n_updates),
                                                           cfg.ptx_coef, plan.world_size)
                stats["policy/grad_norm"] = policy.step()
                if epoch == 0 and first == 0:
                    stats["policy/first_ratio_mean"] = stats["policy/ratio_mean"]
            if critic is not None:
                stats.update(critic_step(cfg, critic, group, max(n_tokens, 1.0), plan.world_size))
                stats["critic/grad_norm"] = critic.step()
            for key, value in stats.items():
                totals[key] = totals.get(key, 0.0) + value
            n_updates += 1
    means = {k: v / (1 if k == "policy/first_ratio_mean" else n_updates) for k, v in totals.items()}
    # each process holds its token share of the token-weighted statistics: their sum over processes is the global
    # value; gradient norms (after DDP's all-reduce) and the PTX loss (reduced in lm_backward) are already global
    return {k: float(distributed.all_reduce_sum(torch.tensor(v, dtype=torch.float64)) if k in TOKEN_SHARE_STATS
                     else v) for k, v in means.items()}


TOKEN_SHARE_STATS = {"policy/loss", "policy/clipfrac", "policy/approx_kl", "policy/ratio_mean", "policy/entropy",
                     "policy/first_ratio_mean", "critic/value_loss", "critic/vf_clipfrac"}


def policy_step(cfg: PPOConfig, policy: Trainee, group: list[Experience], n_tokens: float,
                world_size: int) -> dict[str, float]:
    """Backward of the clipped surrogate (+ entropy bonus) over one mini-batch; returns this process's token share
    of the statistics."""
    stats = dict.fromkeys(("policy/loss", "policy/entropy", "policy/clipfrac", "policy/approx_kl",
                           "policy/ratio_mean"), 0.0)
    for j, chunk in enumerate(group):
        share = float(chunk.response_mask.sum()) / n_tokens
        with policy.no_sync(j == len(group) - 1):
            logprobs, entropy = response_logprobs(policy.module, chunk.sequences, chunk.attention_mask,
                                                  chunk.position_ids, chunk.response_width, cfg.temperature,
                                                  with_entropy=True, entropy_grad=cfg.entropy_coef != 0)
            loss, pstats = clipped_policy_loss(logprobs, chunk.old_logprobs, chunk.advantages, chunk.response_mask,
                                               cfg.clip_eps, reduction="sum")
            if cfg.entropy_coef:
                loss = loss - cfg.entropy_coef * masked_sum(entropy, chunk.response_mask)
            (loss * world_size / n_tokens).backward()  # DDP averages over processes
        stats["policy/loss"] += float(loss.detach()) / n_tokens
        stats["policy/entropy"] += float(masked_mean(entropy.detach(), chunk.response_mask)) * share
        for key in ("clipfrac", "approx_kl", "ratio_mean"):
            stats[f"policy/{key}"] += float(pstats[key]) * share
    return stats


def critic_step(cfg: PPOConfig, critic: Trainee, group: list[Experience], n_tokens: float,
                world_size: int) -> dict[str, float]:
    """Backward of the clipped value loss over one mini-batch; returns this process's token share of the
    statistics."""
    stats = {"critic/value_loss": 0.0, "critic/vf_clipfrac": 0.0}
    for j, chunk in enumerate(group):
        with critic.no_sync(j == len(group) - 1):
            values = critic_values(critic.module, chunk.sequences, chunk.attention_mask, chunk.position_ids,
                                   chunk.response_width)
            loss, vstats = clipped_value_loss(values, chunk.old_values, chunk.returns, chunk.response_mask,
                                              cfg.value_clip or float("inf"), reduction="sum")
            (loss * world_size / n_tokens).backward()
        stats["critic/value_loss"] += float(loss.detach()) / n_tokens
        stats["critic/vf_clipfrac"] += float(vstats["vf_clipfrac"]) * float(chunk.response_mask.sum()) / n_tokens
    return stats


# --------------------------------------------------------------------------------------------------------------- run


def run(cfg: PPOConfig, reward_fn: RewardFn | None = None,
        scorers: dict[str, TextScorer] | None = None) -> dict[str, float]:
    """``moss-rlhf ppo``. ``reward_fn`` replaces the reward model by a Python function of the rollout (tests, rule
    rewards); ``scorers`` are extra validation scores (``val/<name>``; the demo passes its gold judge), which never
    reach the training signal. Returns the last step's metrics."""
    cfg = resolve_preset(cfg)
    scorers = scorers or {}
    best_name = next(iter(scorers), "reward") if cfg.best_metric == "auto" else cfg.best_metric
    if best_name != "reward" and best_name not in scorers:
        raise ConfigError(f"--best-metric {cfg.best_metric}: no validation scorer of that name (given: "
                          f"{', '.join(scorers) or 'none'})")
    best_key = f"val/{best_name}"
    dist = distributed.init(cfg.device)
    plan = plan_batches(cfg, dist.world_size)
    seed_everything(cfg.seed)
    run_dir = RunDir(cfg.out, cfg, dist.is_main, resume=cfg.resume, overwrite=cfg.overwrite)
    prompts, eval_prompts = load_split(load_prompts, cfg.prompts, cfg.eval_prompts, cfg.eval_size, cfg.seed,
                                       "prompts in --prompts")
    eval_prompts = eval_prompts[:cfg.eval_size]
    if len(prompts) < cfg.rollout_batch:
        raise ConfigError(f"{len(prompts)} training prompts in {', '.join(cfg.prompts)} are fewer than one "
                          f"--rollout-batch ({cfg.rollout_batch})")

    tokenizer = load_tokenizer(cfg.tokenizer or cfg.policy, "--tokenizer" if cfg.tokenizer else "--policy")
    critic_source = cfg.critic or (cfg.reward_model if cfg.critic_from_reward and reward_fn is None else cfg.policy)
    models = load_rl_models(cfg.policy, cfg.reference or cfg.policy, None if reward_fn else cfg.reward_model,
                            critic_source if cfg.use_critic else None, tokenizer,
                            LoraOptions(cfg.lora_r, cfg.lora_alpha), dist.device)
    policy = Trainee.create(models.policy, cfg)
    tracked = {"policy": models.policy, "policy_opt": policy.optimizer, "policy_schedule": policy.schedule}
    critic = None
    if models.critic is not None:
        critic = Trainee.create(models.critic, cfg, cfg.critic_lr, cfg.critic_max_grad_norm)
        tracked.update(critic=models.critic, critic_opt=critic.optimizer, critic_schedule=critic.schedule)
    moments = RunningMoments()
    kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
              else FixedKLController(cfg.kl_coef))
    checkpoints = Checkpointer(run_dir.checkpoints, {**tracked, "moments": moments, "kl_ctl": kl_ctl}, tokenizer,
                               cfg.keep_checkpoints, dist.is_main, "ppo")
    state = {"step": 0, "best": -math.inf, "first_stats": None}
    if cfg.resume:
        state.update(checkpoints.restore() or {})
        run_dir.truncate_metrics(state["step"])
    step, best, first_stats = state["step"], state["best"], state["first_stats"]
    for trainee in (policy, critic):
        if trainee is not None:
            trainee.module = distributed.wrap_ddp(trainee.model, dist)
    sampling = SamplingConfig(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k, cfg.repetition_penalty)
    sampler = BuiltinSampler(models.policy, tokenizer)
    order = BatchOrder(len(prompts), plan.rollout_per_process, 1, dist.world_size, cfg.seed)
    ptx = (lm_batches(tokenizer, cfg.ptx_data, cfg.max_prompt_len + cfg.max_new_tokens, cfg.ptx_batch_size, dist,
                      cfg.seed) if cfg.ptx_coef > 0 else None)
    if dist.is_main:
        print(f"ppo: {plan.describe(cfg)}")
        print(f"ppo: preset {cfg.preset}; {len(prompts)} prompts, {len(eval_prompts)} held out; reward from "
              f"{'a Python function' if reward_fn else cfg.reward_model}; {'a' if critic else 'no'} critic")
    progress = Progress(cfg.max_steps, step, "ppo", enabled=cfg.progress and dist.is_main)
    metrics: dict[str, float] = {}
    skipped = state.get("skipped", 0)
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        # 1. rollout: seeds from each prompt's place in the data stream, so a resumed run, or one on more
        # processes, samples exactly what the uninterrupted single-process one did
        batch_prompts = [prompts[i] for i in order.indices(step, 0, dist.rank)]
        rollout = sampler.generate(encode_prompts(tokenizer, batch_prompts, cfg.max_prompt_len), sampling,
                                   prompt_seeds(cfg.seed, order.positions(step, 0, dist.rank)))
        t_generate = time.perf_counter()
        with autocast(dist.device, cfg.precision):
            chunks = make_experience(models, rollout, cfg.batch_size, cfg.temperature, reward_fn,
                                     cfg.score_batch_size)
        t_score = time.perf_counter()
        # 2. rewards, advantages: a NaN reward is caught before it reaches the running moments
        problem = nonfinite_rollout(chunks)
        stats = {} if problem else assign_advantages(chunks, cfg, moments, kl_ctl.value)
        # 3. update (an update with a non-finite gradient norm is not applied)
        train_policy = step >= cfg.critic_warmup_steps
        update = {}
        if problem is None:
            with autocast(dist.device, cfg.precision):
                update = ppo_update(cfg, plan, chunks, policy if train_policy else None, critic, ptx, step)
            problem = nonfinite({k: v for k, v in update.items() if k.endswith(("grad_norm", "/loss"))})
        skipped += skip_or_stop(cfg, "ppo", step + 1, skipped, problem)
        for trainee in (policy if train_policy else None, critic):
            if trainee is not None:
                trainee.schedule.step()
        sampler.sync_weights(models.policy)
        step += 1
        if problem:
            run_dir.log(step, {"ppo/skipped_steps": skipped})
            continue
        kl_ctl.update(float(stats["kl/per_sequence"]), cfg.rollout_batch)
        t_update = time.perf_counter()
        # 4. monitor
        metrics = {k: float(v) for k, v in {**stats, **update}.items()}
        metrics.update({"time/generate_s": t_generate - t0, "time/score_s": t_score - t_generate,
                        "time/update_s": t_update - t_score, "time/step_s": t_update - t0,
                        "policy/lr": policy.schedule.get_last_lr()[0], "policy/trained": float(train_policy)})
        first_stats = first_stats or {k: metrics[k] for k in ("reward/raw_mean", "reward/raw_std")}
        warnings = collapse_signals(metrics, cfg, first_stats) if train_policy else []
        metrics["collapse/warnings"] = float(len(warnings))
        if step == cfg.max_steps or cfg.eval_every and step % cfg.eval_every == 0:
            val, samples = validate(sampler, tokenizer, eval_prompts, sampling, seed=cfg.seed + 12345,
                                    batch_size=cfg.rollout_batch, max_prompt_len=cfg.max_prompt_len,
                                    reward=lambda r: reward_scores(models.reward_model, r, cfg.batch_size, reward_fn),
                                    scorers=scorers)
            metrics.update(val)
            if dist.is_main:
                atomic_write_text(run_dir.path / "samples" / f"step-{step:06d}.jsonl",
                                  "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in samples))
                if val[best_key] > best:
                    best = val[best_key]
                    save_model(models.policy, tokenizer, run_dir.path / "best")
                    atomic_write_text(run_dir.path / "best.json", json.dumps({"step": step, **val}, indent=1))
        if step % cfg.log_every == 0 or step == cfg.max_steps or step == 1 or "val/reward" in metrics:
            run_dir.log(step, metrics)
        progress.update(0, reward=metrics["reward/raw_mean"], kl=metrics["kl/per_token"])
        if warnings and dist.is_main:
            print(f"ppo: step {step}: collapse warning: {'; '.join(warnings)}")
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
            checkpoints.save(step, best=best, first_stats=first_stats, skipped=skipped)
        if warnings and cfg.stop_on_collapse:
            if dist.is_main:
                print(f"ppo: stopping at step {step} (--stop-on-collapse)")
            break
    progress.close()
    checkpoints.save(step, best=best, first_stats=first_stats, skipped=skipped)
    if dist.is_main:
        save_model(models.policy, tokenizer, run_dir.model_path)
        plot_curves(run_dir.path, PLOT_KEYS, title=f"ppo ({cfg.preset})")
        shown = ", ".join(f"{k} {metrics[k]:.3f}" for k in ("reward/raw_mean", "kl/per_token", "response/length",
                                                           "val/reward", best_key) if k in metrics)
        print(f"ppo: step {step}: {shown} -> {run_dir.model_path}")
    distributed.barrier()
    run_dir.close()
    return metrics
