"""The rewards of online RL: where a rollout's scores come from, and how they are shaped before the advantages.

Sources, combined with weights (``score = Σ weight × source``):

* a reward model (``--reward-model``, ``--reward-model-weight``), read at each reply's turn end as in reward
  training (Zheng et al. 2023, "Secrets of RLHF ... Part I", §3);
* Python reward functions (``--reward-fn package.module:function``, ``--reward-fn-weight``): verifiable rewards —
  exact-match maths, unit tests, format checks, the demo world's gold judge — so that RL needs no reward model
  (DeepSeek-R1's "RL from verifiable rewards", Tülu 3's RLVR). A function is called as
  ``fn(prompts, responses, extras)`` — the prompt conversations (lists of ``{"role", "content"}``), the response
  texts and, per prompt, the prompt record's fields other than ``prompt``/``messages`` (e.g. ``{"answer": "42"}``);
  a function of two parameters is called without the extras — and returns one number per response;
* a function of the rollout's tokens (``rl.run(cfg, reward_fn=...)``: rules over token ids, tests).

Shaping, for training only (validation reports the unshaped sources):

* a missing-EOS penalty (TRL's ``missing_eos_penalty``): a reply cut at the length limit loses a constant;
* DAPO's soft overlong punishment (Yu et al. 2025, §3.4): a reply longer than ``L_max - L_buffer`` tokens loses
  ``factor × (L - (L_max - L_buffer)) / L_buffer``, growing linearly to ``factor`` at the limit ``L_max``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from moss_rlhf.config import ConfigError
from moss_rlhf.data.formats import PromptRecord
from moss_rlhf.packing import pack_sequences, packed_sequence_scores, prompt_sharing
from moss_rlhf.sampling import Rollout, decode_responses
from moss_rlhf.scoring import call_user_function, load_function

# A reward computed from the rollout's tokens instead of a reward model (tests, rules): rollout -> score per row [B].
RewardFn = Callable[[Rollout], torch.Tensor]


@dataclass(frozen=True)
class RewardFunction:
    """A Python reward function loaded from ``package.module:function``, with its weight."""

    name: str
    fn: Callable
    weight: float = 1.0

    @property
    def takes_extras(self) -> bool:
        try:
            params = list(inspect.signature(self.fn).parameters.values())
        except (TypeError, ValueError):  # builtins without a signature: call with everything
            return True
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        return len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params)

    def __call__(self, prompts: list[list[dict]], responses: list[str], extras: list[dict]) -> torch.Tensor:
        args = (prompts, responses, extras) if self.takes_extras else (prompts, responses)
        # a non-finite reward is the RL loop's to catch (--on-nonfinite stop or skip), not an error here
        values = call_user_function(self.fn, args, f"--reward-fn {self.name}", len(responses))
        return torch.tensor(values, dtype=torch.float32)


def load_reward_functions(specs: Sequence[str], weights: Sequence[float]) -> list[RewardFunction]:
    """``--reward-fn`` specs with their ``--reward-fn-weight`` (one per function, or none: all 1)."""
    if weights and len(weights) != len(specs):
        raise ConfigError(f"--reward-fn-weight: {len(weights)} weights for {len(specs)} --reward-fn functions; give "
                          f"one per function (or none: all 1)")
    return [RewardFunction(spec, load_function(spec, "--reward-fn"), float(w))
            for spec, w in zip(specs, weights or [1.0] * len(specs))]


@torch.no_grad()
def reward_model_scores(reward_model, rollout: Rollout, batch_size: int, share_prompts: int = 0) -> torch.Tensor:
    """``[B]`` reward-model scores at each reply's last token (its turn end), ``batch_size`` rows per (packed)
    forward pass (``share_prompts``: ``packing.pack_sequences``'s, a group's replies reading one copy of their
    prompt where that is less work)."""
    seq, mask, width = rollout.sequences, rollout.attention_mask, rollout.response_ids.shape[1]
    return torch.cat([packed_sequence_scores(reward_model, pack_sequences(seq[i:i + batch_size], mask[i:i + batch_size],
                                                                          width, share_prompts=share_prompts)).float()
                      for i in range(0, len(seq), batch_size)])


@dataclass
class RewardSources:
    """Every source of the training reward, weighted. ``__call__(rollout, records)`` → (``[B]`` total, each
    source's ``[B]`` scores by name)."""

    tokenizer: object
    reward_model: torch.nn.Module | None = None
    reward_model_weight: float = 1.0
    functions: list[RewardFunction] = field(default_factory=list)
    rollout_fn: RewardFn | None = None
    batch_size: int = 16
    share_prompts: bool = False

    def describe(self) -> str:
        parts = ([f"{self.reward_model_weight:g} × the reward model"] if self.reward_model is not None else [])
        parts += [f"{f.weight:g} × {f.name}" for f in self.functions]
        parts += ["a function of the rollout's tokens"] if self.rollout_fn is not None else []
        return " + ".join(parts) or "nothing"

    @torch.no_grad()
    def __call__(self, rollout: Rollout, records: Sequence[PromptRecord]) -> tuple[torch.Tensor, dict]:
        parts: dict[str, torch.Tensor] = {}
        total = torch.zeros(rollout.response_ids.shape[0], dtype=torch.float32)
        if self.reward_model is not None:
            share = prompt_sharing([self.reward_model]) if self.share_prompts else 0
            parts["reward_model"] = reward_model_scores(self.reward_model, rollout, self.batch_size, share).cpu()
            total += self.reward_model_weight * parts["reward_model"]
        if self.rollout_fn is not None:
            parts["rollout_fn"] = self.rollout_fn(rollout).float().cpu()
            total += parts["rollout_fn"]
        if self.functions:
            prompts, extras = [r.messages for r in records], [r.extras for r in records]
            responses = decode_responses(self.tokenizer, rollout)
            for function in self.functions:
                parts[function.name] = function(prompts, responses, extras)
                total += function.weight * parts[function.name]
        return total.to(rollout.response_ids.device), parts


def shape_scores(scores: torch.Tensor, rollout: Rollout, missing_eos_penalty: float, overlong_buffer: int,
                 overlong_penalty: float, max_new_tokens: int) -> torch.Tensor:
    """The training score: ``scores`` minus the missing-EOS penalty for replies cut at the length limit and minus
    DAPO's soft overlong punishment (``overlong_buffer`` 0: none)."""
    shaped = scores.float() - missing_eos_penalty * (~rollout.finished).float().to(scores.device)
    if overlong_buffer:
        lengths = rollout.response_mask.sum(1).float().to(scores.device)
        excess = (lengths - (max_new_tokens - overlong_buffer)).clamp(min=0) / overlong_buffer
        shaped = shaped - overlong_penalty * excess.clamp(max=1.0)
    return shaped
