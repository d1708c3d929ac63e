"""PPO experience making: sample responses, then score them once with the four models of RLHF.

A rollout step (Zheng et al. 2023, "Secrets of RLHF in Large Language Models Part I: PPO", §3 and Fig. 1):

  1. ``generation.generate`` samples responses to left-padded prompts with the KV cache (the only engine call, so
     vLLM can stand behind it later);
  2. ONE training-style forward over prompt + response per model gives, for exactly the sampled tokens, the policy's
     log-probs ("old" log-probs), the reference's log-probs, the critic's values, and the reward model's score at
     the last token.

Step 2 uses the very function the PPO update uses (:func:`policy_logprobs`, same padding, same position ids, same
micro-batches), so the first mini-batch of the first PPO epoch has a probability ratio of exactly 1: sampling-time
log-probs are *not* reused, because the KV-cache forward differs from the full forward in the last bits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from moss_rlhf.generation import Rollout
from moss_rlhf.losses import entropy_from_logits, token_logprobs
from moss_rlhf.models import sequence_scores, token_scores, unwrap

# A reward computed in Python instead of a reward model (tests, rule-based rewards): rollout -> score per row [B].
RewardFn = Callable[[Rollout], torch.Tensor]


@dataclass
class Experience:
    """One micro-batch of experience. ``[b, R]`` tensors are aligned with the response tokens."""

    sequences: torch.Tensor       # [b, P+R] left-padded prompt, right-padded response
    attention_mask: torch.Tensor  # [b, P+R]
    position_ids: torch.Tensor    # [b, P+R] counting real tokens only, as in generation
    response_mask: torch.Tensor   # [b, R] float 1 for sampled tokens (the stop token included)
    old_logprobs: torch.Tensor    # [b, R] policy at sampling time
    ref_logprobs: torch.Tensor    # [b, R] frozen reference
    old_values: torch.Tensor      # [b, R] critic: value of the state before each response token
    scores: torch.Tensor          # [b] reward-model score of the whole response (raw)
    finished: torch.Tensor        # [b] bool: ended with a stop token (not cut at the length limit)
    advantages: torch.Tensor | None = None  # [b, R] filled by the PPO step (GAE)
    returns: torch.Tensor | None = None     # [b, R]

    @property
    def response_width(self) -> int:
        return self.response_mask.shape[1]

    def to(self, device: torch.device) -> Experience:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return Experience(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in moved.items()})


def position_ids_of(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only (left padding does not shift them) — the ones generation used."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _logits_kwargs(model, keep: int) -> dict:
    """``logits_to_keep``: the LM head runs on the response positions only (the prompt's logits are never used)."""
    import inspect

    return {"logits_to_keep": keep} if "logits_to_keep" in inspect.signature(unwrap(model).forward).parameters else {}


def policy_logprobs(model, sequences: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                    response_width: int, with_entropy: bool = False,
                    entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs ``[b, R]`` of the response tokens (and their entropies when asked; differentiable only with
    ``entropy_grad``, for an entropy bonus) from one full forward. Both experience making and the PPO update call
    this, so the two agree bit for bit on the same inputs."""
    out = model(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids,
                **_logits_kwargs(model, response_width + 1))
    logits = out.logits[:, -(response_width + 1):-1]  # position t predicts token t + 1
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
def make_experience(policy, reference, critic, reward_model, rollout: Rollout, micro_batch: int,
                    reward_fn: RewardFn | None = None, score_batch: int = 0) -> list[Experience]:
    """Score a rollout. The policy runs in micro-batches of ``micro_batch`` rows, the very micro-batches the update
    will use (bitwise-equal log-probs); the reference, critic and reward model run in chunks of ``score_batch`` rows
    (0: the whole rollout at once — fewer, larger forward passes)."""
    sequences, attention_mask = rollout.sequences, rollout.attention_mask
    position_ids = position_ids_of(attention_mask)
    width = rollout.response_ids.shape[1]
    n, score_batch = sequences.shape[0], score_batch or sequences.shape[0]
    ref_logprobs, values, scores = [], [], []
    for start in range(0, n, score_batch):
        rows = slice(start, start + score_batch)
        seq, mask, pos = sequences[rows], attention_mask[rows], position_ids[rows]
        with reference_context(policy, reference):
            ref_logprobs.append(policy_logprobs(reference if reference is not None else policy, seq, mask, pos,
                                                width)[0])
        values.append(critic_values(critic, seq, mask, pos, width))
        if reward_fn is None:
            scores.append(sequence_scores(reward_model, seq, mask).float())
    ref_all, values_all = torch.cat(ref_logprobs), torch.cat(values)
    scores_all = reward_fn(rollout).to(sequences.device).float() if reward_fn is not None else torch.cat(scores)
    chunks: list[Experience] = []
    for start in range(0, n, micro_batch):
        rows = slice(start, start + micro_batch)
        seq, mask, pos = sequences[rows], attention_mask[rows], position_ids[rows]
        old_logprobs, _ = policy_logprobs(policy, seq, mask, pos, width)
        chunks.append(Experience(seq, mask, pos, rollout.response_mask[rows].float(), old_logprobs, ref_all[rows],
                                 values_all[rows], scores_all[rows], rollout.finished[rows]))
    return chunks


def cat_field(chunks: list[Experience], name: str) -> torch.Tensor:
    return torch.cat([getattr(c, name) for c in chunks])
