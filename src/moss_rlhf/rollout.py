"""Experience for online RL: a sampler's rollout scored once by the models of RLHF (Zheng et al. 2023, "Secrets of
RLHF in Large Language Models Part I: PPO", §3 and Fig. 1).

  1. a sampler (``moss_rlhf.sampling``) samples responses to the prompts;
  2. ONE training-style forward over prompt + response per model gives, for exactly the sampled tokens, the policy's
     log-probs (the "old" log-probs), the frozen reference's log-probs, the critic's values — when there is a critic —
     and the reward: a reward model's score at the reply's turn end, or a Python function's.

Log-probs are scored at the sampler's temperature, ``log softmax(logits / T)``: that is the distribution the tokens
were drawn from, so the PPO ratio and the KL penalty are on-policy ("The N+ implementation details of RLHF with
PPO", Huang et al. 2024). Top-k, top-p and a repetition penalty change the distribution in ways a forward pass does
not see; the RL stage refuses them unless told to accept the bias.

Step 2 uses the very function the update uses (:func:`response_logprobs`, same padding, same position ids, same
micro-batches), so the first mini-batch of the first epoch has a probability ratio of exactly 1; the sampler's own
log-probs are kept beside them (``sample_logprobs``) to measure how far the two engines disagree.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from moss_rlhf import distributed
from moss_rlhf.config import ConfigError
from moss_rlhf.losses import RunningMoments, entropy_from_logits, gae, masked_sum, per_token_rewards, token_logprobs
from moss_rlhf.models import (LoraOptions, accepts, apply_lora, check_vocabulary, disable_dropout, load_causal_lm,
                              load_scorer, position_ids_of, sequence_scores, token_scores, unwrap)
from moss_rlhf.sampling import Rollout

# A reward computed in Python instead of a reward model (tests, rule-based rewards): rollout -> score per row [B].
RewardFn = Callable[[Rollout], torch.Tensor]


@dataclass
class RLModels:
    """The models of online RL. ``reference`` None: the policy with its LoRA adapters switched off;
    ``reward_model`` None: rewards come from a function; ``critic`` None: critic-free (values are 0)."""

    policy: torch.nn.Module
    reference: torch.nn.Module | None
    reward_model: torch.nn.Module | None
    critic: torch.nn.Module | None

    def all(self) -> list[torch.nn.Module]:
        return [m for m in (self.policy, self.reference, self.reward_model, self.critic) if m is not None]


def load_rl_models(policy: str, reference: str, reward_model: str | None, critic: str | None, tokenizer,
                   lora: LoraOptions, device: torch.device) -> RLModels:
    """The models of online RL from their paths: with LoRA (``lora.r`` > 0) the reference is the policy with its
    adapters off; no ``reward_model``: rewards come from a function; no ``critic``: critic-free. Dropout is off in
    all of them and they stay in eval mode (gradients flow in eval mode; RL never wants dropout)."""
    policy_model = load_causal_lm(policy, flag="--policy")
    reference_model = None
    if lora.r:
        policy_model = apply_lora(policy_model, lora)
    else:
        reference_model = load_causal_lm(reference, flag="--reference").requires_grad_(False)
    models = RLModels(policy_model, reference_model,
                      load_scorer(reward_model, tokenizer, flag="--reward-model", trained=True).requires_grad_(False)
                      if reward_model else None,
                      load_scorer(critic, tokenizer, flag="--critic") if critic else None)
    for model in models.all():
        check_vocabulary(model, tokenizer)
        disable_dropout(model)
        model.to(device).eval()
    return models


@dataclass(frozen=True)
class BatchPlan:
    """How one RL step's rollout is cut: per process, into mini-batches (one optimizer step each), into micro-batches
    (one forward pass each)."""

    world_size: int
    rollout_per_process: int
    mini_per_process: int
    micro_per_mini: int       # gradient accumulation
    updates_per_step: int     # optimizer steps per model per PPO step

    def describe(self, cfg) -> str:
        return (f"rollout batch {cfg.rollout_batch} = {self.world_size} process(es) × "
                f"{self.rollout_per_process}; mini-batch {cfg.mini_batch} = {self.world_size} × "
                f"{self.micro_per_mini} micro-batch(es) × {cfg.batch_size}; {cfg.ppo_epochs} epoch(s) × "
                f"{cfg.rollout_batch // cfg.mini_batch} mini-batches = {self.updates_per_step} updates per step; "
                f"{cfg.max_steps} steps = {cfg.max_steps * cfg.rollout_batch} episodes")


def plan_batches(cfg, world_size: int) -> BatchPlan:
    """Derived batch sizes from ``cfg``'s rollout_batch, mini_batch, batch_size and ppo_epochs; impossible
    combinations are a ConfigError naming the flags."""
    if cfg.mini_batch % (cfg.batch_size * world_size):
        raise ConfigError(f"--mini-batch ({cfg.mini_batch}) must be a multiple of --batch-size ({cfg.batch_size}) × "
                          f"{world_size} process(es)")
    return BatchPlan(world_size, cfg.rollout_batch // world_size, cfg.mini_batch // world_size,
                     cfg.mini_batch // (cfg.batch_size * world_size),
                     cfg.ppo_epochs * cfg.rollout_batch // cfg.mini_batch)


@dataclass
class Experience:
    """One micro-batch of experience. ``[b, R]`` tensors are aligned with the response tokens."""

    sequences: torch.Tensor        # [b, P+R] left-padded prompt, right-padded response
    attention_mask: torch.Tensor   # [b, P+R]
    position_ids: torch.Tensor     # [b, P+R] counting real tokens only, as in sampling
    response_mask: torch.Tensor    # [b, R] float 1 for sampled tokens (the stop token included)
    old_logprobs: torch.Tensor     # [b, R] the policy's, by the training forward, at the sampling temperature
    sample_logprobs: torch.Tensor  # [b, R] the sampler's own
    ref_logprobs: torch.Tensor     # [b, R] frozen reference, at the sampling temperature
    old_values: torch.Tensor       # [b, R] critic: value of the state before each response token (0 without one)
    scores: torch.Tensor           # [b] reward of the whole response (raw)
    finished: torch.Tensor         # [b] bool: ended with a stop token (not cut at the length limit)
    advantages: torch.Tensor | None = None  # [b, R] filled by the RL step
    returns: torch.Tensor | None = None     # [b, R] value targets (with a critic)

    @property
    def response_width(self) -> int:
        return self.response_mask.shape[1]

    def to(self, device: torch.device) -> Experience:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return Experience(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in moved.items()})


def _logits_kwargs(model, keep: int) -> dict:
    """``logits_to_keep``: the LM head runs on the response positions only (the prompt's logits are never used)."""
    return {"logits_to_keep": keep} if accepts(model, "logits_to_keep") else {}


def response_logprobs(model, sequences: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                      response_width: int, temperature: float = 1.0, with_entropy: bool = False,
                      entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs ``[b, R]`` of the last ``response_width`` tokens under ``softmax(logits / temperature)`` (and the
    entropies of those distributions when asked; differentiable only with ``entropy_grad``, for an entropy bonus)
    from one full forward. Experience making, the update and evaluation's KL all call this, so they agree bit for
    bit on the same inputs. ``temperature`` 0 (greedy) scores at 1."""
    out = model(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                **_logits_kwargs(model, response_width + 1))
    logits = out.logits[:, -(response_width + 1):-1]  # position t predicts token t + 1
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    logprobs = token_logprobs(logits, sequences[:, -response_width:])
    entropy = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy = entropy_from_logits(logits)
    return logprobs, entropy


def critic_values(critic, sequences: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                  response_width: int) -> torch.Tensor:
    """Values ``[b, R]``: the critic's per-token score at the position that predicts each response token."""
    values = token_scores(critic, sequences, attention_mask, position_ids)
    return values[:, -(response_width + 1):-1]


def reference_context(policy, reference):
    """With a LoRA policy and no separate reference, the reference is the policy with its adapters switched off."""
    if reference is None:
        return unwrap(policy).disable_adapter()
    return contextlib.nullcontext()


@torch.no_grad()
def make_experience(models: RLModels, rollout: Rollout, micro_batch: int, temperature: float,
                    reward_fn: RewardFn | None = None, score_batch: int = 0) -> list[Experience]:
    """Score a rollout. The policy runs in micro-batches of ``micro_batch`` rows, the very micro-batches the update
    will use (bitwise-equal log-probs); the reference, critic and reward model run in chunks of ``score_batch`` rows
    (0: the whole rollout at once — fewer, larger forward passes)."""
    sequences, attention_mask = rollout.sequences, rollout.attention_mask
    position_ids = position_ids_of(attention_mask)
    width = rollout.response_ids.shape[1]
    n, score_batch = sequences.shape[0], score_batch or sequences.shape[0]
    ref_logprobs, values = [], []
    for start in range(0, n, score_batch):
        rows = slice(start, start + score_batch)
        seq, mask, pos = sequences[rows], attention_mask[rows], position_ids[rows]
        with reference_context(models.policy, models.reference):
            ref_logprobs.append(response_logprobs(models.reference or models.policy, seq, mask, pos, width,
                                                  temperature)[0])
        if models.critic is not None:
            values.append(critic_values(models.critic, seq, mask, pos, width))
    ref_all = torch.cat(ref_logprobs)
    values_all = torch.cat(values) if values else torch.zeros_like(ref_all)
    scores_all = reward_scores(models.reward_model, rollout, score_batch, reward_fn).to(sequences.device)
    chunks: list[Experience] = []
    for start in range(0, n, micro_batch):
        rows = slice(start, start + micro_batch)
        seq, mask, pos = sequences[rows], attention_mask[rows], position_ids[rows]
        old_logprobs, _ = response_logprobs(models.policy, seq, mask, pos, width, temperature)
        chunks.append(Experience(seq, mask, pos, rollout.response_mask[rows].float(), old_logprobs,
                                 rollout.logprobs[rows].to(old_logprobs.dtype), ref_all[rows], values_all[rows],
                                 scores_all[rows], rollout.finished[rows]))
    return chunks


def reward_scores(reward_model, rollout: Rollout, batch_size: int, reward_fn: RewardFn | None = None) -> torch.Tensor:
    """``[B]`` rewards of a rollout: ``reward_fn``'s, or the reward model's at each reply's last token (its turn
    end), ``batch_size`` rows per forward pass."""
    if reward_fn is not None:
        return reward_fn(rollout).float()
    seq, mask = rollout.sequences, rollout.attention_mask
    return torch.cat([sequence_scores(reward_model, seq[i:i + batch_size], mask[i:i + batch_size]).float()
                      for i in range(0, len(seq), batch_size)])


def nonfinite_rollout(chunks: list[Experience]) -> str | None:
    """"3 rewards, 1 value are NaN or infinite" over every process's rollout (rewards, and at response tokens the
    log-probs and values), or None when all are finite — before anything reaches the running reward statistics."""
    mask = cat_field(chunks, "response_mask").bool()
    counts = distributed.all_reduce_sum(torch.stack([
        (~torch.isfinite(cat_field(chunks, "scores"))).sum(),
        (~torch.isfinite(cat_field(chunks, "old_logprobs")) & mask).sum(),
        (~torch.isfinite(cat_field(chunks, "ref_logprobs")) & mask).sum(),
        (~torch.isfinite(cat_field(chunks, "old_values")) & mask).sum()]).double())
    names = ("rewards", "policy log-probs", "reference log-probs", "values")
    bad = [f"{int(n)} {name}" for n, name in zip(counts.tolist(), names) if n]
    return f"{', '.join(bad)} are NaN or infinite" if bad else None


def cat_field(chunks: list[Experience], name: str) -> torch.Tensor:
    return torch.cat([getattr(c, name) for c in chunks])


def engine_mismatch(chunks: list[Experience]) -> torch.Tensor:
    """Sums over the rollout's response tokens of ``[|log p_train - log p_sampler|, (log p_train - log p_sampler),
    count]``: how far the trainer's scoring of the sampled tokens is from the sampler's own log-probs (0 up to
    rounding for the builtin sampler; an inference engine's kernels differ)."""
    mask = cat_field(chunks, "response_mask").bool()
    diff = torch.where(mask, cat_field(chunks, "old_logprobs") - cat_field(chunks, "sample_logprobs"), 0.0)
    return torch.stack([diff.abs().sum(), diff.sum(), mask.sum()]).double()


@torch.no_grad()
def assign_advantages(chunks: list[Experience], cfg, moments: RunningMoments, kl_coef: float) -> dict:
    """PPO-max's reward shaping, GAE and whitening for the whole rollout, written into each chunk; returns the
    step's statistics. ``cfg`` holds the switches (reward_norm, reward_clip, kl_estimator, kl_clamp, gamma, lam,
    whiten_advantages, advantage_clip, use_critic)."""
    raw = cat_field(chunks, "scores")
    if cfg.reward_norm:
        moments.update(raw)  # synced across processes: every rank normalises with the same moments
        scores = moments.normalize(raw, clip=cfg.reward_clip or None)
    else:
        scores = raw.clamp(-cfg.reward_clip, cfg.reward_clip) if cfg.reward_clip else raw
    mask, logprobs = cat_field(chunks, "response_mask"), cat_field(chunks, "old_logprobs")
    rewards, kl = per_token_rewards(scores, logprobs, cat_field(chunks, "ref_logprobs"), mask, kl_coef,
                                    cfg.kl_estimator, cfg.kl_clamp)
    values = cat_field(chunks, "old_values")
    advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = distributed.global_whiten(advantages, mask)
    if cfg.advantage_clip:
        advantages = torch.where(mask.bool(), advantages.clamp(-cfg.advantage_clip, cfg.advantage_clip), 0.0)
    start = 0
    for chunk in chunks:
        rows = slice(start, start + chunk.sequences.shape[0])
        chunk.advantages, chunk.returns = advantages[rows], returns[rows]
        start = rows.stop

    stats = rollout_stats(chunks, raw, scores, kl, kl_coef)
    if cfg.use_critic:
        stats["critic/explained_variance"] = distributed.global_explained_variance(values, returns, mask)
    return stats


def rollout_stats(chunks: list[Experience], raw: torch.Tensor, scores: torch.Tensor, kl: torch.Tensor,
                  kl_coef: float) -> dict[str, torch.Tensor]:
    """The step's rollout statistics over every process: raw and shaped rewards (mean and percentiles), KL to the
    reference per token and per sequence, the policy's perplexity of its own samples, reply length, the share cut
    at the length limit, and the trainer-vs-sampler log-prob difference."""
    mask, logprobs = cat_field(chunks, "response_mask"), cat_field(chunks, "old_logprobs")
    all_raw, all_scores = distributed.gather_rows(raw), distributed.gather_rows(scores)
    sums = distributed.all_reduce_sum(torch.cat([
        torch.stack([masked_sum(kl, mask), mask.sum(), masked_sum(logprobs, mask), torch.tensor(float(len(raw))),
                     (~cat_field(chunks, "finished")).sum()]).double(), engine_mismatch(chunks)]))
    return {"reward/raw_mean": all_raw.mean(), "reward/raw_p50": all_raw.quantile(0.5),
            "reward/raw_p95": all_raw.quantile(0.95), "reward/raw_std": all_raw.std() if len(all_raw) > 1 else 0.0,
            "reward/normalized_mean": all_scores.mean(), "reward/normalized_p50": all_scores.quantile(0.5),
            "reward/normalized_p95": all_scores.quantile(0.95),
            "kl/per_token": sums[0] / sums[1], "kl/per_sequence": sums[0] / sums[3], "kl/coef": kl_coef,
            "policy/perplexity": torch.exp(-sums[2] / sums[1]), "response/length": sums[1] / sums[3],
            "response/truncated_share": sums[4] / sums[3], "rollout/logprob_abs_diff": sums[5] / sums[7]}


def collapse_signals(metrics: dict[str, float], cfg, first: dict[str, float]) -> list[str]:
    """The paper's signs of a policy that games the reward model (§5.1): KL running away from the reference,
    perplexity towards 1 (the policy repeats one answer), responses at the length cap, a blown-up reward tail.
    A NaN counts as a collapse (``not x <= limit``). ``cfg`` holds the ``collapse_*`` thresholds."""
    found = []
    if not metrics["kl/per_token"] <= cfg.collapse_kl:
        found.append(f"KL per token {metrics['kl/per_token']:.3f} > {cfg.collapse_kl}")
    if not metrics["policy/perplexity"] >= cfg.collapse_perplexity:
        found.append(f"response perplexity {metrics['policy/perplexity']:.3f} < {cfg.collapse_perplexity}")
    if not metrics["response/truncated_share"] <= cfg.collapse_length_share:
        found.append(f"{metrics['response/truncated_share']:.0%} of responses hit the length limit")
    ceiling = first["reward/raw_mean"] + cfg.collapse_reward_sigmas * max(first["reward/raw_std"], 1e-6)
    if not metrics["reward/raw_p95"] <= ceiling:
        found.append(f"reward p95 {metrics['reward/raw_p95']:.3f} > first step's mean + "
                     f"{cfg.collapse_reward_sigmas:g} std ({ceiling:.3f})")
    return found
