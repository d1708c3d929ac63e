"""Scores of replies from either source the pipeline knows, behind one call: a reward model (a
``*ForSequenceClassification`` directory, read at the reply's turn end exactly as in reward training and PPO) or a
Python function (a verifiable reward, a rule, the demo world's gold judge). RL's validation and ``moss-rlhf
evaluate`` use them; nothing here knows the demo world — its judge arrives as ``moss_rlhf.demo.judge:gold_scores``.

A text scorer is ``scorer(conversations, replies) -> list[float]``: one score per (prompt conversation, reply).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from moss_rlhf.config import ConfigError, UserError

TextScorer = Callable[[Sequence[list[dict]], Sequence[str]], list[float]]
# ``gold``: the demo world's gold judge, by name (this module imports nothing of the demo)
SCORER_ALIASES = {"gold": "moss_rlhf.demo.judge:gold_scores"}


def load_function(spec: str, flag: str) -> Callable:
    """The function named ``package.module:function`` (importable from the current environment)."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise ConfigError(f"{flag}: expected package.module:function, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{flag}: cannot import {module_name!r} ({e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"{flag}: {module_name} has no function {name!r}")
    return fn


def call_user_function(fn: Callable, args: tuple, label: str, n: int, finite: bool = False) -> list[float]:
    """``fn(*args)``, a user's scorer or reward function, which must return one number per reply (``n``; with
    ``finite``, finite ones): its failure or any other answer is a user error naming it (``label``: its flag and
    spec), the cause kept."""
    try:
        values = list(fn(*args))
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{label} raised {type(e).__name__}: {e}") from e
    if len(values) != n:
        raise UserError(f"{label} returned {len(values)} values for {n} responses; expected one number per response")
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) and not (torch.is_tensor(v) and v.numel() == 1):
            raise UserError(f"{label} returned {v!r} for response {i}; expected a number")
        if finite and not math.isfinite(float(v)):
            raise UserError(f"{label} returned {float(v)} for response {i}; expected a finite number")
    return [float(v) for v in values]


def reward_model_scorer(model, tokenizer, max_len: int = 512, batch_size: int = 32) -> TextScorer:
    """A text scorer from a loaded reward model: each conversation + reply rendered as in reward training
    (``collate.reply_example``: ending at the reply's turn end) and scored there."""
    from moss_rlhf.data.collate import pad_examples, reply_example
    from moss_rlhf.models import sequence_scores

    device = next(model.parameters()).device

    @torch.no_grad()
    def score(conversations: Sequence[list[dict]], replies: Sequence[str]) -> list[float]:
        model.eval()
        out: list[float] = []
        for start in range(0, len(replies), batch_size):
            batch = pad_examples([reply_example(tokenizer, c, r, max_len) for c, r in
                                  zip(conversations[start:start + batch_size], replies[start:start + batch_size])],
                                 tokenizer.pad_token_id, side="left")
            out.extend(sequence_scores(model, *(batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
                                       ).float().tolist())
        return out

    return score


def text_scorer(spec: str, device: torch.device, flag: str = "--judge", max_len: int = 512) -> TextScorer:
    """A reward-model directory, a ``package.module:function`` scorer or an alias (``gold``)."""
    spec = SCORER_ALIASES.get(spec, spec)
    if ":" in spec and not Path(spec).exists():
        fn = load_function(spec, flag)
        return lambda conversations, replies: call_user_function(fn, (conversations, replies), f"{flag} {spec}",
                                                                 len(replies), finite=True)
    from moss_rlhf.models import check_model_path, check_vocabulary, load_scorer
    from moss_rlhf.tokenizer import load_tokenizer

    check_model_path(spec, flag)
    tokenizer = load_tokenizer(spec, flag)
    model = load_scorer(spec, tokenizer, flag=flag, trained=True)
    check_vocabulary(model, tokenizer, flag)
    return reward_model_scorer(model.to(device), tokenizer, max_len)


def named_scorers(specs: Sequence[str], device: torch.device, flag: str, max_len: int = 512
                  ) -> dict[str, TextScorer]:
    """``NAME=SPEC`` scorers, in order; a bare ``SPEC`` is named after its alias, its function or its directory."""
    scorers: dict[str, TextScorer] = {}
    for item in specs:
        if "=" in item:
            name, spec = item.split("=", 1)
        else:
            spec = item
            name = spec if spec in SCORER_ALIASES else spec.rpartition(":")[2] if ":" in spec else Path(spec).name
        problem = ("an empty name or SPEC" if not name or not spec else
                   f"a second scorer named {name!r}" if name in scorers else
                   f"val/{name} is validation's own metric" if name in VALIDATION_KEYS else None)
        if problem:
            raise ConfigError(f"{flag} {item!r}: {problem}; give NAME=SPEC")
        scorers[name] = text_scorer(spec, device, flag, max_len)
    return scorers


VALIDATION_KEYS = ("reward", "length")  # validate's own val/<key> metrics: no scorer takes these names


@torch.no_grad()
def validate(sampler, tokenizer, conversations: Sequence[list[dict]], sampling, *, seed: int, batch_size: int,
             max_prompt_len: int, reward: Callable, scorers: dict[str, TextScorer] | None = None
             ) -> tuple[dict[str, float], list[dict]]:
    """Replies to held-out prompts, sampled with fixed per-prompt seeds (two validations differ only by the policy),
    scored by ``reward(rollout, rows) -> [B]`` (the training reward; ``rows``: the range of ``conversations`` the
    rollout answers) and by each named scorer (``val/<name>``: e.g. the
    demo's gold judge, which never reaches the training signal). Returns the mean metrics and one row per prompt."""
    from moss_rlhf.sampling import sample_replies

    texts, rollouts = sample_replies(sampler, tokenizer, conversations, sampling, seed, batch_size, max_prompt_len)
    starts = [0]
    for r in rollouts:
        starts.append(starts[-1] + len(r.finished))
    rewards = torch.cat([reward(r, range(a, b)).float().cpu() for r, a, b in zip(rollouts, starts, starts[1:])])
    lengths = torch.cat([r.response_mask.sum(1).cpu() for r in rollouts]).tolist()
    rows = [{"prompt": c[-1]["content"], "response": t, "reward": float(s), "length": n}
            for c, t, s, n in zip(conversations, texts, rewards, lengths)]
    metrics = {"val/reward": float(rewards.mean()), "val/length": sum(lengths) / max(len(lengths), 1)}
    for name, scorer in (scorers or {}).items():
        values = scorer(list(conversations), texts)
        for row, value in zip(rows, values):
            row[name] = value
        metrics[f"val/{name}"] = sum(values) / max(len(values), 1)
    return metrics, rows
