"""The vLLM engine's sleep between rollout and update, with a recording stand-in for the engine (vLLM sleeps only on
CUDA and ROCm, so the real one cannot be put to sleep here): release() frees weights and KV cache, sync_weights()
wakes the weights, loads the new ones, then wakes the cache, and an asleep engine refuses to sample."""

from __future__ import annotations

import pytest
import torch

from moss_rlhf.sampling import SamplingConfig
from moss_rlhf.sampling.vllm import VLLMSampler


class RecordingEngine:
    def __init__(self):
        self.calls: list[tuple] = []

    def sleep(self, level: int):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tuple(tags)))

    def collective_rpc(self, method: str, kwargs: dict):
        names = [name for name, _ in kwargs["weights_iterator"]]  # the weights are streamed while the engine waits
        self.calls.append((method, len(names)))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))


def sampler_on(engine: RecordingEngine, sleeps: bool) -> VLLMSampler:
    sampler = VLLMSampler.__new__(VLLMSampler)  # everything but the engine start
    sampler.llm, sampler.sleeps, sampler.asleep, sampler.stop_ids, sampler.pad_id = engine, sleeps, False, [1], 0
    return sampler


def test_release_sleeps_and_sync_wakes_weights_before_the_cache():
    model = torch.nn.Linear(3, 2)
    engine = RecordingEngine()
    sampler = sampler_on(engine, sleeps=True)
    sampler.release()
    sampler.release()  # a second release before the sync changes nothing
    assert engine.calls == [("sleep", 2)]
    with pytest.raises(RuntimeError, match="asleep"):
        sampler.generate([[5, 6]], SamplingConfig(4))
    sampler.sync_weights(model)
    assert engine.calls == [("sleep", 2), ("wake_up", ("weights",)), ("reload_weights", 2),
                            ("wake_up", ("kv_cache",)), ("reset_prefix_cache",)]
    assert not sampler.asleep


def test_where_the_engine_cannot_sleep_release_does_nothing():
    engine = RecordingEngine()
    sampler = sampler_on(engine, sleeps=False)
    sampler.release()
    sampler.sync_weights(torch.nn.Linear(3, 2))
    assert engine.calls == [("reload_weights", 2), ("reset_prefix_cache",)]
