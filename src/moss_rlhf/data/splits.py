"""The one held-out split of the pipeline: every stage that sets data aside for evaluation (pretraining's held-out
text, SFT's held-out conversations, the reward model's held-out pairs, RL's validation prompts, the demo's test
prompts) calls :func:`held_out_split`, so "held out" means the same thing everywhere: a seeded random choice,
reproducible from the seed alone, with both parts kept in their original order."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import TypeVar

from moss_rlhf.config import ConfigError

T = TypeVar("T")


def held_out_split(items: Sequence[T], held_out: float | int, seed: int, what: str = "items"
                   ) -> tuple[list[T], list[T]]:
    """``(train, held_out)``: ``held_out`` items chosen at random with ``seed`` — a share of them when it is a float
    below 1 (at least one item), a count otherwise. Both parts must be non-empty."""
    n = len(items)
    count = max(1, round(n * held_out)) if isinstance(held_out, float) and held_out < 1 else int(held_out)
    if count < 1 or count >= n:
        raise ConfigError(f"{n} {what} cannot be split into {count} held out and at least one for training")
    chosen = set(random.Random(seed).sample(range(n), count))
    return [x for i, x in enumerate(items) if i not in chosen], [x for i, x in enumerate(items) if i in chosen]


def load_split(load: Callable[[str], list[T]], paths: Sequence[str], eval_paths: Sequence[str],
               held_out: float | int, seed: int, what: str) -> tuple[list[T], list[T]]:
    """``(train, held_out)`` records: ``eval_paths`` when given, else :func:`held_out_split` of ``paths``."""
    items = [x for path in paths for x in load(path)]
    if eval_paths:
        return items, [x for path in eval_paths for x in load(path)]
    return held_out_split(items, held_out, seed, what)
