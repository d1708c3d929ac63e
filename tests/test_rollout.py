"""Experience making: rewards from a reward model are read at each reply's turn end, in any chunking; without a
critic the values are 0; the trainer's log-probs match the sampler's; the step statistics match their definitions
over the rollout; the collapse checks fire on NaN; batch geometry is derived or refused."""

from __future__ import annotations

import math

import pytest
import torch

from moss_rlhf.config import ConfigError
from moss_rlhf.data.collate import left_pad
from moss_rlhf.models import load_causal_lm, load_scorer, sequence_scores
from moss_rlhf.rewards import reward_model_scores
from moss_rlhf.rollout import RLModels, cat_field, collapse_signals, make_experience, plan_batches, rollout_stats
from moss_rlhf.sampling import SamplingConfig, encode_prompts
from moss_rlhf.sampling.builtin import BuiltinSampler
from moss_rlhf.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def parts(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    policy = load_causal_lm(str(tiny_model_dir)).eval()
    reward_model = load_scorer(str(tiny_model_dir), tokenizer).eval()
    torch.nn.init.normal_(reward_model.score.weight, std=0.2, generator=torch.Generator().manual_seed(0))
    prompts = [[{"role": "user", "content": q}] for q in ("Where did Lin go?", "Bo?", "Where did Mei go with Tom?")]
    sampler = BuiltinSampler(policy, tokenizer)
    rollout = sampler.generate(encode_prompts(tokenizer, prompts), SamplingConfig(max_new_tokens=9), seeds=[1, 2, 3])
    return tokenizer, policy, reward_model, prompts, rollout


def test_reward_model_scores_are_read_at_each_replys_last_token_in_any_chunking(parts):
    """The score of a rollout row is the reward model's score of that row alone (its last real token: the turn end
    when the reply finished), whatever else shares its forward pass."""
    tokenizer, policy, reward_model, prompts, rollout = parts
    with torch.no_grad():
        whole = reward_model_scores(reward_model, rollout, batch_size=3)
        torch.testing.assert_close(reward_model_scores(reward_model, rollout, batch_size=1), whole, atol=1e-5,
                                   rtol=0)
        for row in range(3):
            ids = rollout.sequences[row][rollout.attention_mask[row].bool()].tolist()
            alone = sequence_scores(reward_model, *left_pad([ids], tokenizer.pad_token_id))
            torch.testing.assert_close(alone[0], whole[row], atol=1e-5, rtol=0)


def test_without_a_critic_values_are_zero_and_logprobs_match_the_sampler(parts):
    tokenizer, policy, reward_model, prompts, rollout = parts
    scores = reward_model_scores(reward_model, rollout, 3)
    chunks = make_experience(RLModels(policy, policy, reward_model, None), rollout, scores, micro_batch=2,
                             temperature=1.0)
    assert [c.sequences.shape[0] for c in chunks] == [2, 1]
    assert torch.equal(cat_field(chunks, "old_values"), torch.zeros_like(cat_field(chunks, "old_logprobs")))
    mask = cat_field(chunks, "response_mask").bool()
    torch.testing.assert_close(cat_field(chunks, "old_logprobs")[mask], rollout.logprobs[mask], atol=2e-5, rtol=0)
    assert torch.equal(cat_field(chunks, "scores"), scores)


def test_step_statistics_match_their_definitions(parts):
    tokenizer, policy, reward_model, prompts, rollout = parts
    chunks = make_experience(RLModels(policy, policy, reward_model, None), rollout,
                             reward_model_scores(reward_model, rollout, 3), micro_batch=3, temperature=1.0)
    raw = cat_field(chunks, "scores")
    mask = cat_field(chunks, "response_mask")
    kl = torch.full_like(mask, 0.25) * mask
    stats = rollout_stats(chunks, raw, raw * 2, kl, kl_coef=0.1)
    lengths = mask.sum(1)
    logprobs = cat_field(chunks, "old_logprobs")
    assert float(stats["response/length"]) == pytest.approx(float(lengths.mean()))
    assert float(stats["kl/per_token"]) == pytest.approx(0.25)
    assert float(stats["kl/per_sequence"]) == pytest.approx(float(0.25 * lengths.mean()))
    assert float(stats["policy/perplexity"]) == pytest.approx(math.exp(-float((logprobs * mask).sum() / mask.sum())))
    assert float(stats["reward/normalized_mean"]) == pytest.approx(2 * float(raw.mean()))
    assert float(stats["response/truncated_share"]) == pytest.approx(float((~rollout.finished).float().mean()))
    assert float(stats["rollout/logprob_abs_diff"]) < 1e-5


def test_collapse_checks_fire_on_each_signal_and_on_nan():
    class Limits:
        collapse_kl, collapse_perplexity, collapse_length_share, collapse_reward_sigmas = 0.5, 1.1, 0.8, 6.0

    first = {"reward/raw_mean": 0.0, "reward/raw_std": 1.0}
    calm = {"kl/per_token": 0.1, "policy/perplexity": 3.0, "response/truncated_share": 0.1, "reward/raw_p95": 1.0}
    assert collapse_signals(calm, Limits, first) == []
    for key, value in (("kl/per_token", 0.9), ("policy/perplexity", 1.01), ("response/truncated_share", 0.95),
                       ("reward/raw_p95", 7.0)):
        assert len(collapse_signals({**calm, key: value}, Limits, first)) == 1, key
        assert len(collapse_signals({**calm, key: float("nan")}, Limits, first)) == 1, key
    # a sharpened reference starts at a distance: the KL counts from the first step's
    sharpened = {**first, "kl/per_token": 0.4}
    assert collapse_signals({**calm, "kl/per_token": 0.85}, Limits, sharpened) == []
    assert collapse_signals({**calm, "kl/per_token": 0.95}, Limits, sharpened) == [
        "KL per token 0.950 > the first step's 0.400 + 0.5"]
    assert len(collapse_signals({**calm, "kl/per_token": 0.9}, Limits, {**first, "kl/per_token": float("nan")})) == 1


def test_batch_geometry():
    class Cfg:
        rollout_batch, group_size, mini_batch, batch_size, ppo_epochs, max_steps = 32, 1, 16, 4, 2, 10

    plan = plan_batches(Cfg, world_size=2)
    assert (plan.rollout_per_process, plan.mini_per_process, plan.micro_per_mini, plan.updates_per_step) == \
        (16, 8, 2, 4)
    assert "rollout batch 32 prompts = 2 process(es) × 16" in plan.describe(Cfg)
    class Three(Cfg):
        rollout_batch = 48

    with pytest.raises(ConfigError, match=r"--mini-batch \(16\) must be a multiple of --batch-size \(4\) × 3"):
        plan_batches(Three, world_size=3)
    with pytest.raises(ConfigError, match=r"--rollout-batch \(32\) must be a multiple of the 3 process"):
        plan_batches(Cfg, world_size=3)


def test_group_geometry_keeps_groups_whole():
    """Groups of k replies stay in one process and one mini-batch; a micro-batch holds whole groups or a group
    spans a whole number of micro-batches (which the later epochs then shuffle as one block)."""
    class Groups:
        rollout_batch, group_size, mini_batch, batch_size, ppo_epochs, max_steps = 8, 4, 16, 2, 1, 10

    plan = plan_batches(Groups, world_size=2)
    assert (plan.rollout_per_process, plan.mini_per_process, plan.micro_per_mini, plan.group_span,
            plan.updates_per_step) == (4, 8, 4, 2, 2)
    assert "8 prompts = 2 process(es) × 4 × 4 replies = 32 sequences" in plan.describe(Groups)
    for changes, message in (({"mini_batch": 4}, "per process must hold whole groups"),
                             ({"rollout_batch": 12, "mini_batch": 24, "batch_size": 3}, "one must divide the other"),
                             ({"mini_batch": 12}, "multiple of --mini-batch")):
        with pytest.raises(ConfigError, match=message):
            plan_batches(type("Bad", (Groups,), changes), world_size=2)


def test_reward_time_counts_every_scoring_and_no_sampling(parts, monkeypatch):
    """``GroupRollout.reward_s`` is the time spent in the reward sources: the first draw's, each dynamic-sampling
    refill's and ReMax's greedy replies', none of the sampler's (a fake clock that only the two advance)."""
    import types

    from moss_rlhf import rollout as rollout_module
    from moss_rlhf.data.formats import PromptRecord
    from moss_rlhf.rollout import sample_groups

    tokenizer, policy, _, prompts, _ = parts
    now = [0.0]
    monkeypatch.setattr(rollout_module, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    sampler = BuiltinSampler(policy, tokenizer)
    generate = sampler.generate

    def slow_generate(*args, **kwargs):
        now[0] += 100.0
        return generate(*args, **kwargs)

    def score(rollout, records):  # every group's rewards equal: each try refills both groups
        now[0] += 1.0
        return torch.zeros(len(records)), {}

    sampler.generate = slow_generate
    grouped = sample_groups(sampler, tokenizer, [PromptRecord(p) for p in prompts], [0, 1], [0, 1],
                            SamplingConfig(max_new_tokens=3), score, group_size=2, seed=0, max_prompt_len=32,
                            dynamic_tries=2, greedy_baseline=True)
    assert grouped.reward_s == 4.0  # the first draw, two refills, the greedy baseline
    assert now[0] == 404.0  # ... and four generations, none of them counted


def _refill_sizes(model_dir: str, out: str) -> None:
    import json

    import torch.distributed as dist

    from moss_rlhf import distributed
    from moss_rlhf.data.formats import PromptRecord
    from moss_rlhf.rollout import sample_groups

    d = distributed.init("cpu")
    tokenizer = load_tokenizer(model_dir)
    sampler = BuiltinSampler(load_causal_lm(model_dir), tokenizer)
    prompts = [PromptRecord([{"role": "user", "content": f"Where did {name} go?"}]) for name in ("Lin", "Bo", "Mei")]
    sizes: list[int] = []

    def score(rollout, records):  # process 0: every group's rewards equal (all refilled); process 1: none
        sizes.append(len(records))
        return (torch.zeros(len(records)) if d.rank == 0 else torch.arange(len(records)).float()), {}

    grouped = sample_groups(sampler, tokenizer, prompts, [0, 1], [2 * d.rank, 2 * d.rank + 1],
                            SamplingConfig(max_new_tokens=3), score, group_size=2, seed=0, max_prompt_len=32,
                            dynamic_tries=2, lockstep=True)
    everyone: list = [None, None]
    dist.all_gather_object(everyone, (sizes, grouped.sampled_groups, len(grouped.records)))
    if d.is_main:
        with open(out, "w") as fh:
            json.dump(everyone, fh)


@pytest.mark.slow
def test_dynamic_sampling_refills_in_lockstep_for_a_sharded_reward_model(tmp_path, tiny_model_dir):
    """A sharded reward model's forward is a collective: with ``lockstep`` the process with nothing to refill
    scores as many dummy groups as the other refills, and drops them (its own groups and counts are unchanged)."""
    import json

    from tests.conftest import run_in_processes

    run_in_processes(_refill_sizes, str(tiny_model_dir), str(tmp_path / "sizes.json"))
    (sizes_0, sampled_0, kept_0), (sizes_1, sampled_1, kept_1) = json.loads((tmp_path / "sizes.json").read_text())
    assert sizes_0 == sizes_1 == [4, 4, 4]  # the first draw, then two refills of both groups, on both processes
    assert (sampled_0, sampled_1) == (6, 2)  # process 1 refilled nothing: its dummies are not counted
    assert kept_0 == kept_1 == 4
