"""The one held-out split: seeded, reproducible, order-preserving, a share or a count, never empty on either side."""

from __future__ import annotations

import pytest

from moss_rlhf.config import ConfigError
from moss_rlhf.data.splits import held_out_split, load_split


def test_split_is_seeded_and_keeps_the_order():
    items = list(range(100))
    train, held = held_out_split(items, 0.1, seed=7)
    assert len(held) == 10 and len(train) == 90
    assert sorted(train + held) == items and train == sorted(train) and held == sorted(held)
    assert held_out_split(items, 0.1, seed=7) == (train, held)
    assert held_out_split(items, 0.1, seed=8)[1] != held
    assert held != list(range(10)) and held != list(range(90, 100))  # not simply the first or last items


def test_a_count_or_a_share_and_the_limits():
    assert len(held_out_split(list(range(10)), 3, seed=0)[1]) == 3
    assert len(held_out_split(list(range(10)), 0.01, seed=0)[1]) == 1  # a share rounds up to one item
    with pytest.raises(ConfigError, match="5 pairs cannot be split into 5 held out"):
        held_out_split(list(range(5)), 5, seed=0, what="pairs")
    with pytest.raises(ConfigError, match="cannot be split"):
        held_out_split([1], 0.5, seed=0)


def test_load_split_reads_a_held_out_file_when_given():
    data = {"a": [1, 2, 3, 4], "b": [5, 6], "held": [9]}
    assert load_split(data.__getitem__, ["a", "b"], ["held"], 0.5, seed=0, what="x") == ([1, 2, 3, 4, 5, 6], [9])
    train, held = load_split(data.__getitem__, ["a", "b"], [], 2, seed=0, what="x")
    assert len(held) == 2 and sorted(train + held) == [1, 2, 3, 4, 5, 6]
