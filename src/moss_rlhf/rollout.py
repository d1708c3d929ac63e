"""Experience for online RL: a sampler's rollout scored once by the models of RLHF (Zheng et al. 2023, "Secrets of
RLHF in Large Language Models Part I: PPO", §3 and Fig. 1).

  1. a sampler (``moss_rlhf.sampling``) samples ``group_size`` responses to each prompt (:func:`sample_groups`;
     a group's rows stay together), and the reward sources score them (``moss_rlhf.rewards``). With dynamic
     sampling (DAPO, Yu et al. 2025, §3.2) a group whose rewards are all equal — it carries no signal for a group
     baseline — is replaced by a group for another prompt, drawn from a refill stream that depends only on the
     group's place in the data stream; ReMax's greedy baseline is sampled by the same sampler;
  2. ONE training-style forward over prompt + response per model gives, for exactly the sampled tokens, the policy's
     log-probs (the "old" log-probs), the frozen reference's log-probs and the critic's values — when there is a
     critic (:func:`make_experience`). Every forward is padding-free (``moss_rlhf.packing``).

Log-probs are scored at the sampler's temperature, ``log softmax(logits / T)``: that is the distribution the tokens
were drawn from, so the PPO ratio and the KL penalty are on-policy ("The N+ implementation details of RLHF with
PPO", Huang et al. 2024). Top-k, top-p and a repetition penalty change the distribution in ways a forward pass does
not see; the RL stage refuses them unless told to accept the bias.

Step 2 uses the very function the update uses (``packing.packed_logprobs``, on the same packed rows of the same
micro-batches), so the first mini-batch of the first epoch has a probability ratio of exactly 1; the sampler's own
log-probs are kept beside them (``sample_logprobs``) to measure how far the two engines disagree.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch

from moss_rlhf import distributed, packed_attention
from moss_rlhf.config import ConfigError
from moss_rlhf.losses import entropy_from_logits, masked_sum, token_logprobs
from moss_rlhf.models import (LoraOptions, accepts, apply_lora, check_vocabulary, compile_layers, disable_dropout,
                              load_causal_lm, load_scorer, token_scores, unwrap)
from moss_rlhf.packing import PackedRows, pack_sequences, packed_logprobs, packed_values, prompt_sharing
from moss_rlhf.data.formats import PromptRecord
from moss_rlhf.sampling import Rollout, SamplingConfig, cat_rollouts, encode_prompts, prompt_seeds


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

    def prepare_frozen(self, dist: distributed.Dist, cfg) -> None:
        """The frozen models (reference, reward model) as ``training.Trainee`` prepares the policy and the critic:
        sharded under ``--parallel fsdp`` (without an optimizer), their blocks compiled under ``--compile``."""
        for model in filter(None, (self.reference, self.reward_model)):
            if cfg.parallel == "fsdp":
                distributed.shard(model, dist, cfg.cpu_offload, cfg.precision)
            if cfg.compile:
                compile_layers(model)


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
        packed_attention.install(model)  # packed rows attend segment by segment (packing.pack_sequences)
        model.to(device).eval()
    return models


@dataclass(frozen=True)
class BatchPlan:
    """How one RL step's rollout is cut: per process, into mini-batches (one optimizer step each), into micro-batches
    (one forward pass each)."""

    world_size: int
    rollout_per_process: int  # prompts
    group_size: int           # replies per prompt
    mini_per_process: int     # sequences
    micro_per_mini: int       # gradient accumulation
    updates_per_step: int     # optimizer steps per model per RL step
    group_span: int           # micro-batches a group spans (1 when a micro-batch holds whole groups)

    def describe(self, cfg) -> str:
        sequences = cfg.rollout_batch * self.group_size
        groups = f" × {self.group_size} replies = {sequences} sequences" if self.group_size > 1 else ""
        return (f"rollout batch {cfg.rollout_batch} prompts = {self.world_size} process(es) × "
                f"{self.rollout_per_process}{groups}; mini-batch {cfg.mini_batch} = {self.world_size} × "
                f"{self.micro_per_mini} micro-batch(es) × {cfg.batch_size}; {cfg.ppo_epochs} epoch(s) × "
                f"{sequences // cfg.mini_batch} mini-batches = {self.updates_per_step} updates per step; "
                f"{cfg.max_steps} steps = {cfg.max_steps * sequences} episodes")


def plan_batches(cfg, world_size: int) -> BatchPlan:
    """Derived batch sizes from ``cfg``'s rollout_batch (prompts), group_size, mini_batch, batch_size (sequences)
    and ppo_epochs; impossible combinations are a ConfigError naming the flags. A process holds whole groups, a
    mini-batch whole groups, and a micro-batch whole groups or a whole number of micro-batches one group."""
    k = cfg.group_size
    sequences = cfg.rollout_batch * k
    if cfg.rollout_batch % world_size:
        raise ConfigError(f"--rollout-batch ({cfg.rollout_batch}) must be a multiple of the {world_size} "
                          f"process(es): each process samples whole groups")
    if sequences % cfg.mini_batch:
        raise ConfigError(f"--rollout-batch × --group-size ({cfg.rollout_batch} × {k} = {sequences} sequences) "
                          f"must be a multiple of --mini-batch ({cfg.mini_batch})")
    if cfg.mini_batch % (cfg.batch_size * world_size):
        raise ConfigError(f"--mini-batch ({cfg.mini_batch}) must be a multiple of --batch-size ({cfg.batch_size}) × "
                          f"{world_size} process(es)")
    if (cfg.mini_batch // world_size) % k:
        raise ConfigError(f"--mini-batch ({cfg.mini_batch}) per process must hold whole groups of --group-size {k} "
                          f"({world_size} process(es))")
    if k > 1 and cfg.batch_size % k and k % cfg.batch_size:
        raise ConfigError(f"--batch-size ({cfg.batch_size}) and --group-size ({k}): one must divide the other, so "
                          f"that micro-batches never split a group unevenly")
    return BatchPlan(world_size, cfg.rollout_batch // world_size, k, cfg.mini_batch // world_size,
                     cfg.mini_batch // (cfg.batch_size * world_size), cfg.ppo_epochs * sequences // cfg.mini_batch,
                     max(1, k // cfg.batch_size))


@dataclass
class Experience:
    """One micro-batch of experience. ``[b, R]`` tensors are aligned with the response tokens."""

    sequences: torch.Tensor        # [b, P+R] left-padded prompt, right-padded response
    attention_mask: torch.Tensor   # [b, P+R]
    packed: PackedRows             # the same sequences without padding: every forward pass runs on these
    response_mask: torch.Tensor    # [b, R] float 1 for sampled tokens (the stop token included)
    old_logprobs: torch.Tensor     # [b, R] the policy's, by the training forward, at the sampling temperature
    sample_logprobs: torch.Tensor  # [b, R] the sampler's own
    ref_logprobs: torch.Tensor     # [b, R] frozen reference, at the sampling temperature
    old_values: torch.Tensor       # [b, R] critic: value of the state before each response token (0 without one)
    scores: torch.Tensor           # [b] reward of the whole response (raw, shaped)
    finished: torch.Tensor         # [b] bool: ended with a stop token (not cut at the length limit)
    advantages: torch.Tensor | None = None  # [b, R] filled by the RL step
    returns: torch.Tensor | None = None     # [b, R] value targets (with a critic)
    loss_mask: torch.Tensor | None = None   # [b, R] the tokens the policy loss counts (truncated replies masked)

    @property
    def response_width(self) -> int:
        return self.response_mask.shape[1]

    def to(self, device: torch.device) -> Experience:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return Experience(**{k: v.to(device) if isinstance(v, (torch.Tensor, PackedRows)) else v
                             for k, v in moved.items()})


def _logits_kwargs(model, keep: int) -> dict:
    """``logits_to_keep``: the LM head runs on the response positions only (the prompt's logits are never used)."""
    return {"logits_to_keep": keep} if accepts(model, "logits_to_keep") else {}


def response_logprobs(model, sequences: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                      response_width: int, temperature: float = 1.0, with_entropy: bool = False,
                      entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs ``[b, R]`` of the last ``response_width`` tokens of padded rows under ``softmax(logits /
    temperature)`` (and the entropies of those distributions when asked; differentiable only with
    ``entropy_grad``) from one forward: evaluation's KL and the sampler's tests. RL runs the padding-free
    ``packing.packed_logprobs``. ``temperature`` 0 (greedy) scores at 1."""
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
def make_experience(models: RLModels, rollout: Rollout, scores: torch.Tensor, micro_batch: int, temperature: float,
                    score_batch: int = 0, score_policy: bool = True,
                    reference_temperature: float | None = None, share_prompts: bool = False) -> list[Experience]:
    """Score a rollout whose rewards ``scores`` ``[B]`` are known. The policy runs in micro-batches of
    ``micro_batch`` rows, the very micro-batches (packed once, here) that the update will use: bitwise-equal
    log-probs. The reference and the critic run in chunks of ``score_batch`` rows (0: the whole rollout at once —
    fewer, larger forward passes). ``score_policy=False`` skips the policy's forward and keeps the sampler's
    log-probs as ``old_logprobs`` (for a step with one update, whose ratio needs no stored log-probs, when the
    sampler is the policy itself: its log-probs are the training forward's up to rounding). ``share_prompts``: a
    group's replies attend to one copy of their prompt in every forward where that is less work and every model's
    attention takes a mask (``packing.pack_sequences``)."""
    sequences, attention_mask = rollout.sequences, rollout.attention_mask
    width = rollout.response_ids.shape[1]
    n, score_batch = sequences.shape[0], score_batch or sequences.shape[0]
    ref_logprobs, values = [], []
    share = prompt_sharing(models.all()) if share_prompts else 0
    for start in range(0, n, score_batch):
        packed = pack_sequences(sequences[start:start + score_batch], attention_mask[start:start + score_batch],
                                width, share_prompts=share)
        with reference_context(models.policy, models.reference):
            ref_logprobs.append(packed_logprobs(models.reference or models.policy, packed,
                                                reference_temperature or temperature)[0])
        if models.critic is not None:
            values.append(packed_values(models.critic, packed))
    ref_all = torch.cat(ref_logprobs)
    values_all = torch.cat(values) if values else torch.zeros_like(ref_all)
    scores = scores.to(sequences.device)
    chunks: list[Experience] = []
    for start in range(0, n, micro_batch):
        rows = slice(start, start + micro_batch)
        packed = pack_sequences(sequences[rows], attention_mask[rows], width, share_prompts=share)
        old_logprobs = (packed_logprobs(models.policy, packed, temperature)[0] if score_policy
                        else rollout.logprobs[rows].to(ref_all.dtype) * rollout.response_mask[rows])
        chunks.append(Experience(sequences[rows], attention_mask[rows], packed, rollout.response_mask[rows].float(),
                                 old_logprobs, rollout.logprobs[rows].to(old_logprobs.dtype), ref_all[rows],
                                 values_all[rows], scores[rows], rollout.finished[rows]))
    return chunks


@dataclass
class GroupRollout:
    """One step's rollout: ``group_size`` consecutive rows per prompt, each row's prompt record, its training
    score (shaped) and each reward source's raw score; ReMax's greedy-reply scores when asked."""

    rollout: Rollout
    records: list[PromptRecord]
    scores: torch.Tensor
    parts: dict[str, torch.Tensor]
    baseline: torch.Tensor | None = None
    group_size: int = 1
    dynamic: bool = False     # dynamic sampling was on
    sampled_groups: int = 0   # groups generated, refills included
    unfilled_groups: int = 0  # groups still of equal rewards after the last dynamic-sampling try
    reward_s: float = 0.0     # seconds this process spent in the reward sources (the rest of the phase: sampling)

    def stats(self) -> dict[str, torch.Tensor]:
        """Over every process: each reward source's mean raw score (``reward/<source>``) and, with dynamic
        sampling, the groups sampled per group kept and the share of kept groups still of equal rewards."""
        kept = len(self.scores) // self.group_size
        sums = distributed.all_reduce_sum(torch.tensor(
            [float(p.double().sum()) for p in self.parts.values()]
            + [float(len(self.scores)), float(kept), float(self.sampled_groups), float(self.unfilled_groups)],
            dtype=torch.float64))
        n = len(self.parts)
        out = {f"reward/{name}": sums[i] / sums[n] for i, name in enumerate(self.parts)}
        if self.dynamic:
            out["dynamic/sampled_per_kept_group"] = sums[n + 2] / sums[n + 1]
            out["dynamic/unfilled_share"] = sums[n + 3] / sums[n + 1]
        return out


Score = Callable[[Rollout, Sequence[PromptRecord]], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def refill_prompt(seed: int, position: int, attempt: int, n_prompts: int) -> int:
    """The prompt that dynamic sampling tries at ``attempt`` (≥ 1) for the group at ``position`` of the data stream:
    a function of those alone, so a resumed run or one on more processes refills exactly as this one."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + position * 7_919 + attempt * 104_729) % (1 << 62))
    return int(torch.randint(n_prompts, (1,), generator=g))


def sample_groups(sampler, tokenizer, prompts: Sequence[PromptRecord], indices: Sequence[int],
                  positions: Sequence[int], sampling: SamplingConfig, score: Score, *, group_size: int, seed: int,
                  max_prompt_len: int, dynamic_tries: int = 0, greedy_baseline: bool = False,
                  lockstep: bool = False) -> GroupRollout:
    """``group_size`` replies to each of ``prompts[indices]`` and their scores. Reply ``j`` to the prompt at stream
    position ``p`` samples with seed ``prompt_seeds(seed, [p·k + j])`` (with k = 1, exactly a single reply's seed).
    ``dynamic_tries`` > 0: a group whose scores are all equal is replaced, up to that many times, by a group for
    ``refill_prompt(seed, p, attempt)``; one still equal after the last try is kept (its advantages are 0).
    ``greedy_baseline``: also the score of the greedy reply to each prompt, repeated over its group (ReMax).
    ``lockstep`` (a sharded reward model, whose forward is a collective): every process refills as many groups as the
    process with the most to refill, the extra ones dummies whose replies are dropped."""
    k = group_size
    reward_s = 0.0

    def timed_score(rollout: Rollout, records: list[PromptRecord]):
        nonlocal reward_s
        start = time.perf_counter()
        scored = score(rollout, records)
        reward_s += time.perf_counter() - start
        return scored

    def draw(slot_prompts: list[int], slot_positions: list[int], attempt: int):
        records = [prompts[i] for i in slot_prompts for _ in range(k)]
        encoded = encode_prompts(tokenizer, [prompts[i].messages for i in slot_prompts], max_prompt_len)
        seeds = prompt_seeds(seed + attempt * 7_919, [p * k + j for p in slot_positions for j in range(k)])
        rollout = sampler.generate([ids for ids in encoded for _ in range(k)], sampling, seeds)
        return rollout, records, *timed_score(rollout, records)

    rollout, records, scores, parts = draw(list(indices), list(positions), 0)
    sampled, unfilled = len(indices), 0
    if dynamic_tries:
        slots = [(rollout, records, scores, parts, range(s * k, (s + 1) * k)) for s in range(len(indices))]
        for attempt in range(1, dynamic_tries + 1):
            pending = [s for s, (_, _, sc, _, rows) in enumerate(slots) if bool((sc[rows] == sc[rows][0]).all())]
            dummies = [0] * distributed.lockstep(len(pending), lockstep)
            if not pending and not dummies:
                break
            refills = [refill_prompt(seed, positions[s], attempt, len(prompts)) for s in pending + dummies]
            new = draw(refills, [positions[s] for s in pending + dummies], attempt)
            sampled += len(pending)
            for n, s in enumerate(pending):
                slots[s] = (*new[:4], range(n * k, (n + 1) * k))
        unfilled = sum(bool((sc[rows] == sc[rows][0]).all()) for _, _, sc, _, rows in slots)
        rollout = cat_rollouts([r.select(rows) for r, _, _, _, rows in slots], tokenizer.pad_token_id)
        records = [rec[i] for _, rec, _, _, rows in slots for i in rows]
        scores = torch.cat([sc[rows] for _, _, sc, _, rows in slots])
        parts = {name: torch.cat([p[name][rows] for _, _, _, p, rows in slots]) for name in parts}
    baseline = None
    if greedy_baseline:
        unique = [records[i] for i in range(0, len(records), k)]
        greedy = sampler.generate(encode_prompts(tokenizer, [r.messages for r in unique], max_prompt_len),
                                  dataclasses.replace(sampling, temperature=0.0))
        baseline = timed_score(greedy, unique)[0].repeat_interleave(k)
    return GroupRollout(rollout, records, scores, parts, baseline, k, dynamic_tries > 0, sampled, unfilled, reward_s)


def nonfinite_rollout(chunks: list[Experience], baseline: torch.Tensor | None = None) -> str | None:
    """"3 rewards, 1 value are NaN or infinite" over every process's rollout (rewards — ReMax's baseline rewards
    too —, and at response tokens the log-probs and values), or None when all are finite — before anything reaches
    the running reward statistics."""
    mask = cat_field(chunks, "response_mask").bool()
    scores = cat_field(chunks, "scores")
    counts = distributed.all_reduce_sum(torch.stack([
        (~torch.isfinite(scores)).sum() + (0 if baseline is None else (~torch.isfinite(baseline)).sum()),
        (~torch.isfinite(cat_field(chunks, "old_logprobs")) & mask).sum(),
        (~torch.isfinite(cat_field(chunks, "ref_logprobs")) & mask).sum(),
        (~torch.isfinite(cat_field(chunks, "old_values")) & mask).sum()]).double())
    names = ("rewards", "policy log-probs", "reference log-probs", "values")
    bad = [f"{int(n)} {name}" for n, name in zip(counts.tolist(), names) if n]
    return f"{', '.join(bad)} are NaN or infinite" if bad else None


def cat_field(chunks: list[Experience], name: str) -> torch.Tensor:
    return torch.cat([getattr(c, name) for c in chunks])


def engine_mismatch(chunks: list[Experience]) -> dict[str, torch.Tensor]:
    """How far the trainer's scoring of the sampled tokens is from the sampler's own log-probs, over every
    process's response tokens (0 up to rounding for the builtin sampler; an inference engine's kernels differ):
    the mean |log π_old − log μ|, the KL(μ ‖ π_old) estimated on μ's samples (k1), and the largest and smallest
    per-token ratio π_old/μ (what truncated importance sampling caps)."""
    mask = cat_field(chunks, "response_mask").bool()
    diff = torch.where(mask, cat_field(chunks, "old_logprobs") - cat_field(chunks, "sample_logprobs"), 0.0)
    sums = distributed.all_reduce_sum(torch.stack([diff.abs().sum(), diff.sum(), mask.sum()]).double())
    extremes = distributed.gather_rows(torch.stack([torch.where(mask, diff, -torch.inf).max(),
                                                    -torch.where(mask, diff, torch.inf).min()]).reshape(1, 2))
    count = sums[2].clamp(min=1)
    return {"rollout/logprob_abs_diff": sums[0] / count, "rollout/kl_engine_trainer": -sums[1] / count,
            "rollout/ratio_max": torch.exp(extremes[:, 0].max()), "rollout/ratio_min": torch.exp(-extremes[:, 1].max())}


def rollout_stats(chunks: list[Experience], raw: torch.Tensor, scores: torch.Tensor, kl: torch.Tensor,
                  kl_coef: float) -> dict[str, torch.Tensor]:
    """The step's rollout statistics over every process: raw and shaped rewards (mean and percentiles), KL to the
    reference per token and per sequence, the policy's perplexity of its own samples, reply length, the share cut
    at the length limit, and the trainer-vs-sampler log-prob difference."""
    mask, logprobs = cat_field(chunks, "response_mask"), cat_field(chunks, "old_logprobs")
    all_raw, all_scores = distributed.gather_rows(raw), distributed.gather_rows(scores)
    sums = distributed.all_reduce_sum(
        torch.stack([masked_sum(kl, mask), mask.sum(), masked_sum(logprobs, mask), torch.tensor(float(len(raw))),
                     (~cat_field(chunks, "finished")).sum()]).double())
    return {"reward/raw_mean": all_raw.mean(), "reward/raw_p50": all_raw.quantile(0.5),
            "reward/raw_p95": all_raw.quantile(0.95), "reward/raw_std": all_raw.std() if len(all_raw) > 1 else 0.0,
            "reward/normalized_mean": all_scores.mean(), "reward/normalized_p50": all_scores.quantile(0.5),
            "reward/normalized_p95": all_scores.quantile(0.95),
            "kl/per_token": sums[0] / sums[1], "kl/per_sequence": sums[0] / sums[3], "kl/coef": kl_coef,
            "policy/perplexity": torch.exp(-sums[2] / sums[1]), "response/length": sums[1] / sums[3],
            "response/truncated_share": sums[4] / sums[3], **engine_mismatch(chunks)}


def collapse_signals(metrics: dict[str, float], cfg, first: dict[str, float]) -> list[str]:
    """The paper's signs of a policy that games the reward model (§5.1): KL running away from the reference,
    perplexity towards 1 (the policy repeats one answer), responses at the length cap, a blown-up reward tail.
    A NaN counts as a collapse (``not x <= limit``). ``cfg`` holds the ``collapse_*`` thresholds. The KL counts
    from the first step's: 0 for a policy that starts as its reference, more for a sharpened reference
    (``--reference-temperature``), whose distance at the start is no collapse."""
    found = []
    start = first.get("kl/per_token", 0.0)
    start = start if math.isfinite(start) and start > 0 else 0.0
    if not metrics["kl/per_token"] <= start + cfg.collapse_kl:
        found.append(f"KL per token {metrics['kl/per_token']:.3f} > "
                     + (f"the first step's {start:.3f} + {cfg.collapse_kl}" if start > 1e-3 else f"{cfg.collapse_kl}"))
    if not metrics["policy/perplexity"] >= cfg.collapse_perplexity:
        found.append(f"response perplexity {metrics['policy/perplexity']:.3f} < {cfg.collapse_perplexity}")
    if not metrics["response/truncated_share"] <= cfg.collapse_length_share:
        found.append(f"{metrics['response/truncated_share']:.0%} of responses hit the length limit")
    ceiling = first["reward/raw_mean"] + cfg.collapse_reward_sigmas * max(first["reward/raw_std"], 1e-6)
    if not metrics["reward/raw_p95"] <= ceiling:
        found.append(f"reward p95 {metrics['reward/raw_p95']:.3f} > first step's mean + "
                     f"{cfg.collapse_reward_sigmas:g} std ({ceiling:.3f})")
    return found
