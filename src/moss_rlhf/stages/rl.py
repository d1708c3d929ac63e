"""``moss-rlhf rl`` (alias ``moss-rlhf ppo``): online RL from a reward model or Python rewards — PPO-max (Zheng et
al. 2023, "Secrets of RLHF in Large Language Models Part I: PPO", arXiv 2307.04964) and the critic-free estimators
(GRPO, Dr.GRPO, DAPO, RLOO, REINFORCE++, ReMax) as switches of one loop.

Models (``rollout.RLModels``): the policy and the frozen reference (both from SFT; with ``--lora-r`` the reference
is the policy with its adapters off), the frozen reward model (unless the rewards are Python functions only), and
for GAE a critic (from the reward model, one value per token); dropout off in all, all sharded by ``--parallel fsdp``.
Every step:

  1. rollout (``rollout.sample_groups``): ``group_size`` replies to each of ``rollout_batch`` prompts (per-reply
     seeds), scored by the reward sources (``rewards``: reward model, ``--reward-fn`` functions, missing-EOS
     penalty, overlong shaping); dynamic sampling refills groups of equal rewards (DAPO); ReMax also samples the
     greedy reply. All models score the rollout once, padding-free, a group's prompt once (``make_experience``);
  2. advantages (``advantages.assign_advantages``): PPO-max's reward normalisation and clipping, the KL penalty
     when it is in the reward (k1/k2/k3), then the estimator: GAE(γ, λ) with the critic, group baselines (GRPO's
     with group, batch or no std scaling; RLOO's leave-one-out), REINFORCE++'s whitened reward-to-go (with a group
     baseline or without), ReMax's greedy baseline;
  3. update (``update.rl_update``): ``ppo_epochs`` passes in mini-batches; a policy step (clipped surrogate with
     ε_low/ε_high, the KL in the loss when placed there, entropy bonus, PPO-ptx; aggregated by token, by sequence or
     by a constant) and a critic step (beside it: ``--overlap-critic``); ``critic_warmup_steps`` train the critic alone;
  4. monitor: reward (per source), KL, perplexity, length (and by outcome), entropy, clip fraction, advantages,
     equal-reward groups, memory, the paper's collapse signals; validate on held-out prompts (the caller's scorers
     too, e.g. the demo's gold judge), keep the best policy in ``best/``, checkpoint atomically (exact resume).

``--reference-temperature τ`` < T takes the KL to the reference's sharpened distribution ``softmax(logits_ref / τ)``:
the policy is held near the reference's mode, where a reward model that cannot judge something (the demo world's
content) leaves the reference's knowledge to decide ("sharpening", Huang et al. 2024, arXiv 2412.01951).

``--preset`` sets a published recipe's switches (``recipes``; explicit ones win). ``--rollout-engine vllm`` samples
with a colocated vLLM engine (truncated importance sampling corrects its difference). No NaN/Inf is ever applied."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass

from moss_rlhf import distributed
from moss_rlhf.advantages import ESTIMATORS, assign_advantages
from moss_rlhf.checkpoint import Checkpointer, seed_everything
from moss_rlhf.config import ConfigError, TrainConfig, option
from moss_rlhf.data.collate import BatchOrder
from moss_rlhf.data.formats import load_prompt_records
from moss_rlhf.data.splits import load_split
from moss_rlhf.files import atomic_write_text
from moss_rlhf.losses import AGGREGATIONS, AdaptiveKLController, FixedKLController, RunningMoments
from moss_rlhf.models import LoraOptions, save_model
from moss_rlhf.recipes import GROUP_BASELINES, PRESETS
from moss_rlhf.rewards import RewardFn, RewardSources, load_reward_functions, shape_scores
from moss_rlhf.rollout import collapse_signals, load_rl_models, make_experience, nonfinite_rollout, plan_batches, \
    sample_groups
from moss_rlhf.runs import Progress, RunDir, plot_curves
from moss_rlhf.sampling import SamplingConfig, make_sampler
from moss_rlhf.scoring import TextScorer, named_scorers, validate
from moss_rlhf.tokenizer import load_tokenizer
from moss_rlhf.training import Trainee, autocast, lm_batches, memory_report, nonfinite, skip_or_stop
from moss_rlhf.update import critic_beside_policy, rl_update

PLOT_KEYS = ["reward/raw_mean", "reward/normalized_mean", "kl/per_token", "policy/perplexity", "response/length",
             "policy/entropy", "policy/clipfrac", "advantage/std", "groups/equal_reward_share",
             "critic/value_loss", "critic/explained_variance", "val/reward", "val/gold", "kl/coef",
             "rollout/logprob_abs_diff"]


@dataclass
class RLConfig(TrainConfig):
    out: str = option("runs/rl", "run directory")
    policy: str = option("runs/sft/model", "SFT model: the policy starts here and it is the frozen reference")
    reference: str = option("", "reference model (default: --policy; with --lora-r: the policy without adapters)")
    reward_model: str = option("runs/reward/model", "reward model saved by `moss-rlhf reward`")
    reward_model_weight: float | None = option(None, "weight of the reward model's score (default 1, or 0 — not "
                                                     "loaded — when --reward-fn is given)", at_least=0.0)
    reward_fn: list[str] = option([], "Python reward package.module:function, called fn(prompts, responses, "
                                      "extras) → one number per response (prompts: conversations; extras: each "
                                      "prompt record's other fields; a two-parameter fn gets no extras)")
    reward_fn_weight: list[float] = option([], "weight of each --reward-fn (default: 1 each)")
    critic: str = option("", "critic initialisation (default: the reward model; the policy without "
                             "--critic-from-reward)")
    tokenizer: str = option("", "tokenizer (default: the policy's)")
    prompts: list[str] = option([], "prompt files ({\"prompt\"} or {\"messages\"} records, any extra fields)")
    eval_prompts: list[str] = option([], "held-out prompts; default: --eval-size prompts held out of --prompts")
    eval_size: int = option(64, "held-out prompts used by each validation", at_least=1)
    preset: str = option("ppo_max", "fills every switch not given explicitly", choices=tuple(PRESETS))
    # batch geometry
    rollout_batch: int = option(32, "prompts sampled per step (all processes together)", at_least=1)
    group_size: int | None = option(None, "replies sampled per prompt (GRPO's G); a group stays in one process and "
                                          "one mini-batch", at_least=1)
    mini_batch: int = option(16, "sequences per optimizer update (all processes together)", at_least=1)
    batch_size: int = option(8, "sequences per policy/critic forward pass per process (micro-batch)", at_least=1)
    score_batch_size: int = option(0, "sequences per forward pass of the frozen models scoring a rollout (0: the "
                                      "whole rollout of a process at once)", at_least=0)
    ppo_epochs: int = option(2, "passes over each rollout batch (GRPO's μ)", at_least=1)
    # sampling
    max_prompt_len: int = option(128, "longest prompt in tokens (longer ones keep their end)", at_least=1)
    max_new_tokens: int = option(48, "longest response in tokens", at_least=1)
    temperature: float = option(1.0, "sampling temperature; log-probs (ratio, KL) are scored at it", above=0.0)
    reference_temperature: float | None = option(None, "take the KL to the reference at this temperature "
                                                       "(default: --temperature); below it, to the reference "
                                                       "sharpened towards its mode", above=0.0)
    top_p: float = option(1.0, "nucleus sampling (< 1 needs --accept-sampling-bias)", above=0.0, at_most=1.0)
    top_k: int = option(0, "top-k sampling, 0: off (needs --accept-sampling-bias)", at_least=0)
    repetition_penalty: float = option(1.0, "repetition penalty (≠ 1 needs --accept-sampling-bias)", above=0.0)
    rollout_engine: str = option("builtin", "who samples: builtin (our KV-cache loop on the policy itself) or vllm "
                                            "(a colocated vLLM engine, weights synced after every update; one "
                                            "process; pip install 'moss-rlhf[vllm]')", choices=("builtin", "vllm"))
    rollout_is: str = option("none", "correct for the engine sampling from μ ≠ π_old: tis (truncated importance "
                                     "sampling, each token's policy loss × min(π_old/μ, --rollout-is-cap)) or none",
                             choices=("none", "tis"))
    rollout_is_cap: float = option(2.0, "the TIS cap C", at_least=1.0)
    rollout_memory: float = option(0.3, "vllm: share of the device's memory for the engine (weights + KV cache)",
                                   above=0.0, below=1.0)
    accept_sampling_bias: bool = option(False, "allow top-k/top-p/repetition penalty, scoring the ratio and KL "
                                               "against softmax(logits/T) all the same (off-policy)")
    dynamic_sampling: bool | None = option(None, "replace groups whose rewards are all equal by groups for other "
                                                 "prompts (DAPO); needs a group baseline")
    dynamic_sampling_tries: int = option(3, "dynamic sampling: refills per group and step", at_least=1)
    # optimisation
    max_steps: int = option(100, "RL steps (rollout + update) to run", at_least=1)
    lr: float = option(3e-5, "policy learning rate", above=0.0)
    critic_lr: float = option(1e-4, "critic learning rate", above=0.0)
    warmup_steps: int = option(0, "learning-rate warm-up in RL steps", at_least=0)
    min_lr_ratio: float = option(1.0, "cosine decay floor (1: constant learning rate)", at_least=0.0, at_most=1.0)
    max_grad_norm: float | None = option(None, "policy gradient-norm clip, 0 disables", at_least=0.0)
    critic_max_grad_norm: float | None = option(None, "critic gradient-norm clip, 0 disables", at_least=0.0)
    # estimator and its switches (None here and above: from --preset)
    advantage: str | None = option(None, "advantage estimator: gae (critic), grpo, rloo, reinforce_pp, "
                                         "reinforce_pp_baseline, remax (critic-free)", choices=ESTIMATORS)
    std_scaling: str | None = option(None, "grpo: divide by the group's std (GRPO), the batch's (Lite PPO) or none "
                                           "(Dr.GRPO)", choices=("group", "batch", "none"))
    loss_agg: str | None = option(None, "policy loss aggregation: token_mean (DAPO, PPO), seq_mean_token_mean "
                                        "(GRPO), seq_mean_token_sum_norm (Dr.GRPO)", choices=AGGREGATIONS)
    kl_coef: float | None = option(None, "KL coefficient β (initial one when adaptive)", at_least=0.0)
    kl_placement: str | None = option(None, "where the KL to the reference goes: 'reward' (−β·KL per token in the "
                                            "reward, PPO/RLOO/REINFORCE++; summed per sequence for outcome "
                                            "estimators) or 'loss' (+β·KL per token in the policy loss, GRPO)",
                                      choices=("reward", "loss"))
    kl_estimator: str | None = option(None, "per-token KL estimator (Schulman 2020): k1 = log r, k2 = (log r)²/2, "
                                            "k3 = 1/r − 1 + log r with r = π/π_ref; clamped to ±--kl-clamp",
                                      choices=("k1", "k2", "k3"))
    kl_clamp: float = option(10.0, "clamp of the per-token KL estimate (0: none)", at_least=0.0)
    adaptive_kl: bool = option(False, "adapt the KL coefficient towards --kl-target (Ziegler et al. 2019)")
    kl_target: float = option(1.0, "target KL per sequence for --adaptive-kl", above=0.0)
    kl_horizon: float = option(10000.0, "horizon in samples for --adaptive-kl", above=0.0)
    reward_norm: bool | None = option(None, "normalise rewards by running mean/std")
    reward_clip: float | None = option(None, "clip (normalised) rewards to ±this, 0 disables", at_least=0.0)
    missing_eos_penalty: float = option(0.0, "subtract this from the score of a reply cut at the length limit",
                                        at_least=0.0)
    overlong_buffer: float | None = option(None, "soft overlong punishment (DAPO): share of --max-new-tokens at the "
                                                 "end of which a reply loses up to --overlong-penalty; 0 disables",
                                           at_least=0.0, below=1.0)
    overlong_penalty: float = option(1.0, "largest overlong punishment", at_least=0.0)
    mask_truncated: bool = option(False, "leave replies cut at the length limit out of the policy loss (DAPO's "
                                         "overlong filtering)")
    whiten_advantages: bool | None = option(None, "whiten advantages over the batch")
    advantage_clip: float | None = option(None, "clip advantages to ±this after whitening, 0 disables", at_least=0.0)
    value_clip: float | None = option(None, "value-loss clip range around the old values, 0 disables", at_least=0.0)
    critic_from_reward: bool | None = option(None, "initialise the critic from the reward model (else the policy)")
    use_critic: bool | None = option(None, "train a critic (gae only); without one GAE's advantages are the "
                                           "(γλ-discounted) reward-to-go")
    gamma: float = option(1.0, "discount γ (GAE, REINFORCE++)", at_least=0.0, at_most=1.0)
    lam: float = option(0.95, "GAE λ", at_least=0.0, at_most=1.0)
    clip_eps: float = option(0.2, "policy ratio clip ε (ε_low)", above=0.0)
    clip_eps_high: float | None = option(None, "upper ratio clip ε_high (DAPO's clip-higher; default: --clip-eps)",
                                         above=0.0)
    entropy_coef: float = option(0.0, "entropy bonus coefficient", at_least=0.0)
    critic_warmup_steps: int = option(0, "RL steps in which only the critic learns", at_least=0)
    overlap_critic: bool = option(True, "one process on a CPU: the critic's update steps on a thread of their own "
                                        "beside the policy's, half of torch's threads each (the same run, faster)")
    share_prompts: bool = option(True, "forwards over a rollout run a group's prompt once where that is less work, "
                                       "its replies attending to it (attention that takes a mask: sdpa, eager)")
    ptx_data: list[str] = option([], "PPO-ptx: conversation files whose LM loss is mixed into the policy loss")
    ptx_coef: float = option(0.0, "PPO-ptx loss coefficient", at_least=0.0)
    ptx_batch_size: int = option(4, "PPO-ptx conversations per update per process", at_least=1)
    lora_r: int = option(0, "LoRA rank for the policy (0: full fine-tuning); the reference is the base", at_least=0)
    lora_alpha: int = option(16, "LoRA alpha", at_least=1)
    # monitoring
    log_every: int = option(1, "write metrics every N steps", at_least=1)
    eval_every: int = option(10, "validate on held-out prompts every N steps (0: only at the end)", at_least=0)
    save_every: int = option(20, "checkpoint every N steps (0: only at the end)", at_least=0)
    val_scorer: list[str] = option([], "validation-only scorer [NAME=]SPEC, repeatable: a reward-model directory, a "
                                       "function(prompts, responses) as package.module:function, or 'gold' (the demo "
                                       "world's judge); reported as val/NAME beside val/reward, never part of the "
                                       "training reward", free_on_resume=True)
    best_metric: str = option("auto", "what picks best/: 'reward' (the training reward on the held-out prompts), "
                                      "the name of a validation scorer (--val-scorer, or one the caller passes: the "
                                      "demo's 'gold'), or 'auto' (the first such scorer, else reward)",
                              free_on_resume=True)
    collapse_kl: float = option(0.5, "warn when KL per token to the reference exceeds the first step's (0, or "
                                     "more with --reference-temperature) by this", above=0.0, free_on_resume=True)
    collapse_perplexity: float = option(1.1, "warn when the policy's perplexity of its replies falls below this",
                                        at_least=1.0, free_on_resume=True)
    collapse_length_share: float = option(0.8, "warn when this share of replies hits --max-new-tokens", above=0.0,
                                          at_most=1.0, free_on_resume=True)
    collapse_reward_sigmas: float = option(6.0, "warn when the raw reward p95 exceeds the first step's mean by this "
                                                "many of its standard deviations", above=0.0, free_on_resume=True)
    stop_on_collapse: bool = option(False, "stop the run at the first collapse warning", free_on_resume=True)

    def check(self) -> None:
        super().check()
        if not self.prompts:
            raise ConfigError("give --prompts FILE (repeat for several): the prompts to sample responses to")
        if self.grad_accum != 1:
            raise ConfigError("--grad-accum is derived in RL: mini_batch / (batch_size × processes); leave it at 1")
        if self.ptx_coef > 0 and not self.ptx_data:
            raise ConfigError("--ptx-coef > 0 needs --ptx-data")
        if not all(math.isfinite(w) for w in self.reward_fn_weight):
            raise ConfigError(f"--reward-fn-weight must be finite numbers, got {self.reward_fn_weight}")
        sampling = SamplingConfig(self.max_new_tokens, self.temperature, self.top_p, self.top_k,
                                  self.repetition_penalty)
        if sampling.filters_distribution and not self.accept_sampling_bias:
            raise ConfigError(f"--top-k {self.top_k} / --top-p {self.top_p} / --repetition-penalty "
                              f"{self.repetition_penalty}: rollouts would not come from softmax(logits / T), the "
                              f"distribution the ratio and KL are computed for; pass --accept-sampling-bias to "
                              f"train off-policy anyway")
        k = self.group_size or PRESETS[self.preset]["group_size"]
        if (self.rollout_batch * k) % self.mini_batch:
            raise ConfigError(f"--rollout-batch × --group-size ({self.rollout_batch} × {k}) must be a multiple of "
                              f"--mini-batch ({self.mini_batch})")
        if self.advantage is None:  # not resolved yet: the checks below run again after resolve_preset
            return
        if self.reference_temperature is not None and self.kl_coef == 0:
            raise ConfigError("--reference-temperature sharpens the reference of the KL term; with --kl-coef 0 "
                              "there is none")
        if self.advantage != "gae" and self.use_critic:
            raise ConfigError(f"--advantage {self.advantage} is critic-free; --use-critic needs --advantage gae")
        if self.advantage in GROUP_BASELINES and self.group_size < 2:
            raise ConfigError(f"--advantage {self.advantage} takes its baseline from the other replies to the same "
                              f"prompt: --group-size must be at least 2, got {self.group_size}")
        if self.dynamic_sampling and (self.advantage not in GROUP_BASELINES or self.group_size < 2):
            raise ConfigError("--dynamic-sampling drops groups of equal rewards: it needs a group baseline "
                              f"({', '.join(GROUP_BASELINES)}) and --group-size ≥ 2")


def resolve_preset(cfg: RLConfig) -> RLConfig:
    """The config with every unset (None) switch taken from ``cfg.preset``; explicit values are kept."""
    fills = {k: v for k, v in PRESETS[cfg.preset].items() if getattr(cfg, k) is None}
    return dataclasses.replace(cfg, **fills)


def run(cfg: RLConfig, reward_fn: RewardFn | None = None,
        scorers: dict[str, TextScorer] | None = None) -> dict[str, float]:
    """``moss-rlhf rl``. ``reward_fn`` adds a Python function of the rollout's tokens to the reward (tests, rules;
    with it, as with ``--reward-fn``, the reward model is not used unless ``--reward-model-weight`` says so);
    ``scorers`` are extra validation scores (``val/<name>``; the demo passes its gold judge), which never reach the
    training signal. Returns the last step's metrics."""
    cfg = resolve_preset(cfg)
    dist = distributed.init(cfg.device)
    scorers = {**(scorers or {}), **named_scorers(cfg.val_scorer, dist.device, "--val-scorer",
                                                  cfg.max_prompt_len + cfg.max_new_tokens)}
    best_name = next(iter(scorers), "reward") if cfg.best_metric == "auto" else cfg.best_metric
    if best_name != "reward" and best_name not in scorers:
        raise ConfigError(f"--best-metric {cfg.best_metric}: no validation scorer of that name (given: "
                          f"{', '.join(scorers) or 'none'})")
    best_key = f"val/{best_name}"
    functions = load_reward_functions(cfg.reward_fn, cfg.reward_fn_weight)
    rm_weight = cfg.reward_model_weight if cfg.reward_model_weight is not None else float(not (functions or reward_fn))
    plan = plan_batches(cfg, dist.world_size)
    seed_everything(cfg.seed)
    run_dir = RunDir(cfg.out, cfg, dist.is_main, resume=cfg.resume, overwrite=cfg.overwrite)
    prompts, eval_prompts = load_split(load_prompt_records, cfg.prompts, cfg.eval_prompts, cfg.eval_size, cfg.seed,
                                       "prompts in --prompts")
    eval_prompts = eval_prompts[:cfg.eval_size]
    if len(prompts) < cfg.rollout_batch:
        raise ConfigError(f"{len(prompts)} training prompts in {', '.join(cfg.prompts)} are fewer than one "
                          f"--rollout-batch ({cfg.rollout_batch})")
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.policy, "--tokenizer" if cfg.tokenizer else "--policy")
    critic_source = cfg.critic or (cfg.reward_model if cfg.critic_from_reward and rm_weight else cfg.policy)
    models = load_rl_models(cfg.policy, cfg.reference or cfg.policy, cfg.reward_model if rm_weight else None,
                            critic_source if cfg.use_critic else None, tokenizer,
                            LoraOptions(cfg.lora_r, cfg.lora_alpha), dist.device)
    sources = RewardSources(tokenizer, models.reward_model, rm_weight, functions, reward_fn, cfg.batch_size,
                            share_prompts=cfg.share_prompts)
    overlong = round(cfg.overlong_buffer * cfg.max_new_tokens)

    def training_score(rollout, records):
        total, parts = sources(rollout, records)
        return shape_scores(total, rollout, cfg.missing_eos_penalty, overlong, cfg.overlong_penalty,
                            cfg.max_new_tokens), parts

    policy = Trainee.create(models.policy, cfg, dist)
    tracked = {"policy": models.policy, "policy_opt": policy.optimizer, "policy_schedule": policy.schedule}
    critic = None
    if models.critic is not None:
        critic = Trainee.create(models.critic, cfg, dist, cfg.critic_lr, cfg.critic_max_grad_norm)
        tracked.update(critic=models.critic, critic_opt=critic.optimizer, critic_schedule=critic.schedule)
    moments = RunningMoments()
    kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
              else FixedKLController(cfg.kl_coef))
    checkpoints = Checkpointer(run_dir.checkpoints, {**tracked, "moments": moments, "kl_ctl": kl_ctl}, tokenizer,
                               cfg.keep_checkpoints, dist.is_main, "rl")
    state = {"step": 0, "best": -math.inf, "first_stats": None}
    if cfg.resume:
        state.update(checkpoints.restore() or {})
        run_dir.truncate_metrics(state["step"])
    step, best, first_stats, skipped = state["step"], state["best"], state["first_stats"], state.get("skipped", 0)
    models.prepare_frozen(dist, cfg)
    sampling = SamplingConfig(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k, cfg.repetition_penalty)
    sampler = make_sampler(cfg, models.policy, tokenizer)
    order = BatchOrder(len(prompts), plan.rollout_per_process, 1, dist.world_size, cfg.seed)
    ptx = (lm_batches(tokenizer, cfg.ptx_data, cfg.max_prompt_len + cfg.max_new_tokens, cfg.ptx_batch_size, dist,
                      cfg.seed) if cfg.ptx_coef > 0 else None)
    if dist.is_main:
        print(f"rl: {plan.describe(cfg)}")
        sharpened = f" to the reference at T {cfg.reference_temperature:g}" if cfg.reference_temperature else ""
        beside = (", its steps beside the policy's on a thread of their own"
                  if critic_beside_policy(cfg, plan, critic, dist.device) else "")
        print(f"rl: preset {cfg.preset}, advantage {cfg.advantage}; KL β {cfg.kl_coef:g} ({cfg.kl_estimator}) in the "
              f"{cfg.kl_placement}{sharpened}; loss {cfg.loss_agg}; {len(prompts)} prompts, {len(eval_prompts)} held "
              f"out; reward = {sources.describe()}; {'a' if critic else 'no'} critic{beside}")
    progress = Progress(cfg.max_steps, step, "rl", enabled=cfg.progress and dist.is_main)
    metrics: dict[str, float] = {}
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        # 1. rollout: seeds from each prompt's place in the data stream, so a resumed run, or one on more
        # processes, samples exactly what the uninterrupted single-process one did
        grouped = sample_groups(sampler, tokenizer, prompts, order.indices(step, 0, dist.rank),
                                order.positions(step, 0, dist.rank), sampling, training_score,
                                group_size=cfg.group_size, seed=cfg.seed, max_prompt_len=cfg.max_prompt_len,
                                dynamic_tries=cfg.dynamic_sampling_tries if cfg.dynamic_sampling else 0,
                                greedy_baseline=cfg.advantage == "remax", lockstep=cfg.parallel == "fsdp")
        t_generate = time.perf_counter()
        with autocast(dist.device, cfg.precision):
            # another engine's log-probs, or a bf16 copy's, are not the trainer's
            foreign = cfg.rollout_engine != "builtin" or cfg.precision == "bf16"
            chunks = make_experience(models, grouped.rollout, grouped.scores, cfg.batch_size, cfg.temperature,
                                     cfg.score_batch_size, score_policy=plan.updates_per_step > 1 or foreign,
                                     reference_temperature=cfg.reference_temperature, share_prompts=cfg.share_prompts)
        sampler.release()  # until the next sync_weights: an engine's device memory goes to the update (vLLM sleeps)
        t_score = time.perf_counter()
        # 2. advantages: a NaN reward is caught before it reaches the running moments
        problem = nonfinite_rollout(chunks, grouped.baseline)
        stats = {} if problem else assign_advantages(chunks, cfg, moments, kl_ctl.value, grouped.baseline)
        # 3. update (an update with a non-finite gradient norm is not applied)
        train_policy = step >= cfg.critic_warmup_steps
        update = {}
        if problem is None:
            with autocast(dist.device, cfg.precision):
                update = rl_update(cfg, plan, chunks, policy if train_policy else None, critic, ptx, step,
                                   kl_ctl.value)
            problem = nonfinite({k: v for k, v in update.items() if k.endswith(("grad_norm", "/loss"))})
        skipped += skip_or_stop(cfg, "rl", step + 1, skipped, problem)
        for trainee in filter(None, (policy if train_policy else None, critic)):
            trainee.schedule.step()
        sampler.sync_weights(models.policy)
        step += 1
        if problem:
            run_dir.log(step, {"rl/skipped_steps": skipped})
            continue
        kl_ctl.update(float(stats["kl/per_sequence"]), cfg.rollout_batch * cfg.group_size)
        t_update = time.perf_counter()
        # 4. monitor
        metrics = {k: float(v) for k, v in {**stats, **update, **grouped.stats()}.items()}
        metrics.update({"time/generate_s": t_generate - t0 - grouped.reward_s, "time/reward_s": grouped.reward_s,
                        "time/score_s": t_score - t_generate, "time/update_s": t_update - t_score,
                        "time/step_s": t_update - t0, "policy/lr": policy.schedule.get_last_lr()[0],
                        "policy/trained": float(train_policy)})
        metrics.update(memory_report({"policy": policy, "critic": critic, "reference": models.reference,
                                      "reward_model": models.reward_model}, "rl", dist) if step == 1 else {})
        first_stats = first_stats or {k: metrics[k] for k in ("reward/raw_mean", "reward/raw_std", "kl/per_token")}
        warnings = collapse_signals(metrics, cfg, first_stats) if train_policy else []
        metrics["collapse/warnings"] = float(len(warnings))
        if step == cfg.max_steps or cfg.eval_every and step % cfg.eval_every == 0:
            val, samples = validate(sampler, tokenizer, [r.messages for r in eval_prompts], sampling,
                                    seed=cfg.seed + 12345, batch_size=cfg.rollout_batch,
                                    max_prompt_len=cfg.max_prompt_len,
                                    reward=lambda r, rows: sources(r, [eval_prompts[i] for i in rows])[0],
                                    scorers=scorers)
            metrics.update(val)
            if dist.is_main:
                atomic_write_text(run_dir.path / "samples" / f"step-{step:06d}.jsonl",
                                  "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in samples))
            if distributed.broadcast_object(val[best_key] > best):  # one decision: saving may be a collective
                best = val[best_key]
                save_model(models.policy, tokenizer, run_dir.path / "best", dist.is_main)
                if dist.is_main:
                    atomic_write_text(run_dir.path / "best.json", json.dumps({"step": step, **val}, indent=1))
        if step % cfg.log_every == 0 or step == cfg.max_steps or step == 1 or "val/reward" in metrics:
            run_dir.log(step, metrics)
        progress.update(0, reward=metrics["reward/raw_mean"], kl=metrics["kl/per_token"])
        if warnings and dist.is_main:
            print(f"rl: step {step}: collapse warning: {'; '.join(warnings)}"
                  + (" — stopping (--stop-on-collapse)" if cfg.stop_on_collapse else ""))
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
            checkpoints.save(step, best=best, first_stats=first_stats, skipped=skipped)
        if warnings and cfg.stop_on_collapse:
            break
    progress.close()
    checkpoints.save(step, best=best, first_stats=first_stats, skipped=skipped)
    save_model(models.policy, tokenizer, run_dir.model_path, dist.is_main)
    if dist.is_main:
        plot_curves(run_dir.path, PLOT_KEYS, title=f"rl ({cfg.preset})")
        keys = dict.fromkeys(("reward/raw_mean", "kl/per_token", "response/length", "val/reward", best_key))
        shown = ", ".join(f"{k} {metrics[k]:.3f}" for k in keys if k in metrics)
        print(f"rl: step {step}: {shown} -> {run_dir.model_path}")
    distributed.barrier()
    run_dir.close()
    sampler.close()  # last: a vLLM engine's teardown ends the process group it joined
    return metrics
