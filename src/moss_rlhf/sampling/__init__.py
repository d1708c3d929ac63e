"""One interface for sampling replies — token ids in, a :class:`Rollout` out — used by every part of the pipeline
that generates: PPO's rollouts and validation, ``evaluate``, the feedback pair maker, ``moss-rlhf generate`` and the
assistant (and through it the terminal chat and the server).

A sampler has four calls::

    sampler.generate(prompts, cfg, seeds) -> Rollout   # prompts: token-id lists; seeds: one per prompt
    sampler.release()                                   # before a policy update: free what the engine holds
    sampler.sync_weights(model)                         # after a policy update: sample from the new weights
    sampler.close()                                     # at the end: shut the engine down

:class:`moss_rlhf.sampling.builtin.BuiltinSampler` (a KV-cache loop over the transformers forward) is the first
implementation; an inference engine (:class:`moss_rlhf.sampling.vllm.VLLMSampler`) stands behind the same calls.

Seeds are per prompt: prompt ``i``'s random draws come from its own generator seeded with ``seeds[i]``, so its reply
depends neither on the other prompts of its batch nor on the batch size or the number of processes. A resumed run
and a run on more processes sample the same replies, and an engine that takes per-request seeds fits unchanged.

The rollout also carries each sampled token's log-probability under the distribution it was drawn from (after
temperature, top-k, top-p and repetition penalty), so a trainer can measure how far its own scoring is from the
sampler's.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Protocol

import torch

from moss_rlhf.config import Config, ConfigError, option


@dataclass
class SamplingConfig(Config):
    max_new_tokens: int = option(64, "longest reply in tokens", at_least=1)
    temperature: float = option(1.0, "sampling temperature (0: greedy)", at_least=0.0)
    top_p: float = option(1.0, "nucleus sampling: keep the smallest set of tokens with this much probability",
                          above=0.0, at_most=1.0)
    top_k: int = option(0, "keep only the k most likely tokens (0: all)", at_least=0)
    repetition_penalty: float = option(1.0, "divide the logits of tokens already in the sequence (CTRL, >1 penalises)",
                                       above=0.0)

    @property
    def filters_distribution(self) -> bool:
        """Whether replies are drawn from something other than ``softmax(logits / temperature)``: greedy decoding,
        top-k, top-p or a repetition penalty. Log-probabilities scored by a plain forward pass then do not describe
        the sampling distribution (PPO's ratio and KL would be off-policy)."""
        return (self.temperature == 0 or self.top_k > 0 or self.top_p < 1.0
                or self.repetition_penalty != 1.0)


@dataclass
class Rollout:
    """Prompt and response tokens of a batch. ``prompt_ids`` are left-padded, ``response_ids`` right-padded."""

    prompt_ids: torch.Tensor        # [B, P]
    prompt_mask: torch.Tensor       # [B, P]
    response_ids: torch.Tensor      # [B, R]
    response_mask: torch.Tensor     # [B, R]: 1 for generated tokens, the stop token included
    finished: torch.Tensor          # [B] bool: stopped at a stop token (not at the length limit)
    logprobs: torch.Tensor          # [B, R] float32: log-prob of each sampled token under the sampling distribution
    #                                 (greedy: under softmax(logits)); 0 after the end

    @property
    def sequences(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    @property
    def position_ids(self) -> torch.Tensor:
        from moss_rlhf.models import position_ids_of

        return position_ids_of(self.attention_mask)

    def select(self, rows) -> Rollout:
        """The rollout of some of its rows (a slice, a range or a list of indices)."""
        rows = rows if isinstance(rows, slice) else torch.as_tensor(list(rows), dtype=torch.long)
        return Rollout(*(getattr(self, f.name)[rows] for f in fields(self)))


def cat_rollouts(rollouts: Sequence[Rollout], pad_id: int) -> Rollout:
    """Rollouts of different prompt and response widths as one: prompts re-left-padded, responses re-right-padded
    to the widest."""
    prompt_width = max(r.prompt_ids.shape[1] for r in rollouts)
    response_width = max(r.response_ids.shape[1] for r in rollouts)

    def widen(x: torch.Tensor, width: int, value, left: bool) -> torch.Tensor:
        pad = x.new_full((x.shape[0], width - x.shape[1]), value)
        return torch.cat([pad, x] if left else [x, pad], dim=1)

    return Rollout(torch.cat([widen(r.prompt_ids, prompt_width, pad_id, True) for r in rollouts]),
                   torch.cat([widen(r.prompt_mask, prompt_width, 0, True) for r in rollouts]),
                   torch.cat([widen(r.response_ids, response_width, pad_id, False) for r in rollouts]),
                   torch.cat([widen(r.response_mask, response_width, 0, False) for r in rollouts]),
                   torch.cat([r.finished for r in rollouts]),
                   torch.cat([widen(r.logprobs, response_width, 0.0, False) for r in rollouts]))


class Sampler(Protocol):
    """Token ids in, a rollout out (see the module docstring)."""

    def generate(self, prompts: Sequence[Sequence[int]], cfg: SamplingConfig,
                 seeds: Sequence[int] | None = None) -> Rollout: ...

    def release(self) -> None: ...

    def sync_weights(self, model) -> None: ...

    def close(self) -> None: ...


def make_sampler(cfg, policy, tokenizer) -> Sampler:
    """The rollout engine ``cfg.rollout_engine`` names for ``policy``: the builtin loop on the policy itself, or a
    colocated vLLM engine started from ``cfg.policy`` and given the policy's current weights (a resumed run's).
    Either samples in the training precision: with ``--precision bf16`` from bf16 weights (the builtin loop from a
    bf16 copy of the policy's), as the update's forward computes. A prompt and reply that cannot fit the policy's
    context are refused here, at the start, not at the first prompt that long, hours into the run."""
    from moss_rlhf.models import context_length

    context = context_length(policy)
    if context and cfg.max_prompt_len + cfg.max_new_tokens > context:
        raise ConfigError(f"--max-prompt-len {cfg.max_prompt_len} + --max-new-tokens {cfg.max_new_tokens} exceed the "
                          f"policy's context of {context} tokens: lower one of them")
    bf16 = cfg.precision == "bf16"
    if cfg.rollout_engine == "builtin":
        from moss_rlhf.sampling.builtin import BuiltinSampler

        return BuiltinSampler(policy, tokenizer, dtype=torch.bfloat16 if bf16 else None, compiled=cfg.compile)
    from moss_rlhf.sampling.vllm import VLLMSampler

    sampler = VLLMSampler(cfg.policy, tokenizer, seed=cfg.seed, max_model_len=cfg.max_prompt_len + cfg.max_new_tokens,
                          memory_fraction=cfg.rollout_memory, dtype="bfloat16" if bf16 else "float32")
    sampler.sync_weights(policy)
    return sampler


def prompt_seeds(seed: int, indices: Sequence[int]) -> list[int]:
    """Per-prompt seeds from a run seed and each prompt's place (its index in a file, its position in a training
    run's data stream): the same place gets the same seed whichever batch or process it lands in."""
    return [(seed * 1_000_003 + int(i) * 104_729) % (1 << 62) for i in indices]


def fresh_seeds(n: int) -> list[int]:
    """Seeds from the operating system, for callers that ask for new randomness on every call (never the global
    RNG, whose state belongs to training)."""
    rng = random.SystemRandom()
    return [rng.randrange(1 << 62) for _ in range(n)]


def encode_prompts(tokenizer, conversations: Sequence[list[dict]], max_len: int = 0) -> list[list[int]]:
    """Chat-rendered prompts ending with the assistant tag; with ``max_len`` a long one keeps its end (where the
    question is)."""
    from moss_rlhf.tokenizer import encode_chat

    encoded = [encode_chat(tokenizer, c, add_generation_prompt=True) for c in conversations]
    return [ids[-max_len:] for ids in encoded] if max_len else encoded


def decode_responses(tokenizer, rollout: Rollout) -> list[str]:
    """Response texts without padding or the stop token."""
    from moss_rlhf.tokenizer import stop_token_ids

    stops = set(stop_token_ids(tokenizer))
    texts = []
    for ids, mask in zip(rollout.response_ids.tolist(), rollout.response_mask.tolist()):
        kept = [t for t, m in zip(ids, mask) if m and t not in stops]
        texts.append(tokenizer.decode(kept, skip_special_tokens=True))
    return texts


def sample_replies(sampler: Sampler, tokenizer, conversations: Sequence[list[dict]], cfg: SamplingConfig,
                   seed: int = 0, batch_size: int = 32, max_prompt_len: int = 0) -> tuple[list[str], list[Rollout]]:
    """Replies (texts) to many conversations and the token rollouts they came from, ``batch_size`` prompts at a
    time; prompt ``i`` samples with ``prompt_seeds(seed, [i])``."""
    texts: list[str] = []
    rollouts: list[Rollout] = []
    for start in range(0, len(conversations), batch_size):
        chunk = conversations[start:start + batch_size]
        rollout = sampler.generate(encode_prompts(tokenizer, chunk, max_prompt_len), cfg,
                                   prompt_seeds(seed, range(start, start + len(chunk))))
        texts.extend(decode_responses(tokenizer, rollout))
        rollouts.append(rollout)
    return texts, rollouts
