"""PPO-max stage: the first update's probability ratio is exactly 1 (padding included); PPO raises a programmatic
reward and the KL penalty keeps the policy nearer the reference; a stopped run resumes with identical metrics;
impossible batch geometry is refused with a clear error; presets set their switches and explicit flags win; the
reward-model path (critic from the RM, LoRA policy) writes a loadable model, best/ and validation samples; two
processes with gloo give the same run as one process."""

from __future__ import annotations

import functools
import json
import shutil

import pytest
import torch

from moss_rlhf.cli import build_parser, main
from moss_rlhf.config import ConfigError, from_args
from moss_rlhf.data.collate import left_pad
from moss_rlhf.generation import SamplingConfig, generate
from moss_rlhf.rollout import make_experience, policy_logprobs
from moss_rlhf.runs import read_metrics
from moss_rlhf.stages import ppo
from moss_rlhf.stages.ppo import PPOConfig, plan_batches, resolve_preset
from tests.conftest import run_in_processes

TEXTS = [f"the {a} {b} is {c} and the {b} likes {d} number {n}."
         for n, (a, b, c, d) in enumerate([("red", "cat", "small", "fish"), ("big", "dog", "happy", "bones"),
                                           ("old", "bird", "green", "seeds"), ("new", "fox", "quick", "hens")] * 6)]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine, two spinning OpenMP threads made these runs ~8× slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A randomly initialised tiny Llama with a ~300-token byte-level tokenizer, and prompt files."""
    from moss_rlhf.models import build_causal_lm
    from moss_rlhf.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("ppo_tiny")
    tokenizer = train_tokenizer(TEXTS, vocab_size=300)
    model = build_causal_lm("tiny", tokenizer, seed=0)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    prompts = [{"prompt": " ".join(t.split()[: 2 + i % 6])} for i, t in enumerate(TEXTS)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    (root / "eval.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts[:8]))
    sft = [{"prompt": p["prompt"], "completion": t} for p, t in zip(prompts, TEXTS)]
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    return root


def config(tiny, out, **overrides) -> PPOConfig:
    values = dict(out=str(out), policy=str(tiny / "model"), reward_model=str(tiny / "model"),
                  prompts=[str(tiny / "prompts.jsonl")], eval_prompts=[str(tiny / "eval.jsonl")], eval_size=8,
                  rollout_batch=16, mini_batch=8, batch_size=4, ppo_epochs=2, max_new_tokens=12, max_steps=4,
                  lr=1e-3, critic_lr=1e-3, eval_every=0, save_every=0, progress=False, device="cpu", seed=0)
    values.update(overrides)
    return PPOConfig(**values)


def even_token_share(rollout) -> torch.Tensor:
    """Reward for tests: the share of response tokens with an even id (≈ 0.5 for a random policy)."""
    mask = rollout.response_mask.float()
    return ((rollout.response_ids % 2 == 0).float() * mask).sum(1) / mask.sum(1).clamp(min=1)


def test_first_update_ratio_is_exactly_one_with_padding(tiny):
    from moss_rlhf.models import load_causal_lm, load_scorer
    from moss_rlhf.tokenizer import encode_chat, load_tokenizer

    torch.manual_seed(0)
    tokenizer = load_tokenizer(str(tiny / "model"))
    policy, critic = load_causal_lm(str(tiny / "model")), load_scorer(str(tiny / "model"), tokenizer)
    prompts = [encode_chat(tokenizer, [{"role": "user", "content": t[: 5 + 9 * i]}], True)
               for i, t in enumerate(TEXTS[:6])]
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    assert (mask == 0).any()  # prompts of different lengths: left padding
    # many stop tokens, so responses end at different lengths: right padding inside the response block
    rollout = generate(policy, ids, mask, SamplingConfig(max_new_tokens=10), stop_ids=list(range(0, 300, 7)),
                       pad_id=tokenizer.pad_token_id, generator=torch.Generator().manual_seed(1))
    lengths = rollout.response_mask.sum(1)
    assert lengths.min() < lengths.max()
    chunks = make_experience(policy, load_causal_lm(str(tiny / "model")), critic, None, rollout,
                             micro_batch=3, reward_fn=even_token_share)
    policy.train()
    for chunk in chunks:
        with torch.enable_grad():
            logprobs, _ = policy_logprobs(policy, chunk.sequences, chunk.attention_mask, chunk.position_ids,
                                          chunk.response_width, with_entropy=True)
        assert torch.equal(logprobs.detach(), chunk.old_logprobs)
        ratio = torch.exp(logprobs.detach() - chunk.old_logprobs)
        assert torch.equal(ratio[chunk.response_mask.bool()], torch.ones(int(chunk.response_mask.sum())))
        # the policy starts as the reference (scored in larger chunks, so equal up to rounding)
        assert torch.allclose(chunk.ref_logprobs, chunk.old_logprobs, atol=1e-5)


def test_loop_first_ratio_is_one_and_checks_batches(tiny, tmp_path, capsys):
    metrics = ppo.run(config(tiny, tmp_path / "run", max_steps=2), reward_fn=even_token_share)
    rows = read_metrics(tmp_path / "run")
    assert [r["policy/first_ratio_mean"] for r in rows] == [1.0, 1.0]
    assert abs(rows[0]["kl/per_token"]) < 1e-6  # policy == reference before any update
    assert metrics["policy/approx_kl"] > 0  # later mini-batches did move
    printed = capsys.readouterr().out
    assert "rollout batch 16 = 1 process(es) × 16" in printed and "4 updates per step" in printed


@pytest.mark.slow
def test_ppo_raises_reward_and_kl_penalty_holds_policy_near_reference(tiny, tmp_path):
    common = dict(max_steps=25, ppo_epochs=2, lr=3e-3, rollout_batch=16, mini_batch=8)
    free = ppo.run(config(tiny, tmp_path / "free", kl_coef=0.0, **common), reward_fn=even_token_share)
    held = ppo.run(config(tiny, tmp_path / "held", kl_coef=1.0, **common), reward_fn=even_token_share)
    rows = read_metrics(tmp_path / "free")
    start = sum(r["reward/raw_mean"] for r in rows[:3]) / 3
    end = sum(r["reward/raw_mean"] for r in rows[-3:]) / 3
    assert end > start + 0.15, (start, end)
    held_rows = read_metrics(tmp_path / "held")
    kl_free = sum(r["kl/per_token"] for r in rows[-5:]) / 5
    kl_held = sum(r["kl/per_token"] for r in held_rows[-5:]) / 5
    assert kl_held < 0.5 * kl_free, (kl_held, kl_free)
    assert free["reward/raw_mean"] > 0.5 and held["kl/coef"] == 1.0


def test_stopped_run_resumes_with_identical_metrics(tiny, tmp_path):
    out = tmp_path / "run"
    ppo.run(config(tiny, out, max_steps=4, save_every=2, keep_checkpoints=5, eval_every=2, ptx_coef=0.5,
                   ptx_data=[str(tiny / "sft.jsonl")], critic_warmup_steps=1, adaptive_kl=True, kl_coef=0.1),
            reward_fn=even_token_share)
    uninterrupted = read_metrics(out)
    shutil.rmtree(out / "checkpoints" / "step-00000004")  # as if killed after the step-2 checkpoint
    ppo.run(config(tiny, out, max_steps=4, save_every=2, keep_checkpoints=5, eval_every=2, ptx_coef=0.5,
                   ptx_data=[str(tiny / "sft.jsonl")], critic_warmup_steps=1, adaptive_kl=True, kl_coef=0.1,
                   resume=True), reward_fn=even_token_share)
    resumed = read_metrics(out)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]

    def steady(row):
        return {k: v for k, v in row.items() if not k.startswith("time/")}

    assert [steady(r) for r in resumed[2:]] == [steady(r) for r in uninterrupted[2:]]
    assert uninterrupted[0]["policy/trained"] == 0.0 and uninterrupted[1]["policy/trained"] == 1.0
    assert "policy/ptx_loss" in uninterrupted[1] and uninterrupted[2]["kl/coef"] != 0.1


def test_impossible_batch_geometry_is_refused(tmp_path, capsys):
    with pytest.raises(ConfigError, match="rollout-batch .* multiple of --mini-batch"):
        from_args(PPOConfig, build_parser().parse_args(["ppo", "--rollout-batch", "10", "--mini-batch", "4"]))
    with pytest.raises(ConfigError, match=r"--mini-batch \(8\) must be a multiple of --batch-size \(4\) × 3"):
        plan_batches(PPOConfig(rollout_batch=24, mini_batch=8, batch_size=4), world_size=3)
    assert main(["ppo", "--out", str(tmp_path / "x"), "--rollout-batch", "10", "--mini-batch", "4"]) == 2
    assert "error:" in capsys.readouterr().err
    plan = plan_batches(PPOConfig(rollout_batch=32, mini_batch=16, batch_size=4, ppo_epochs=2), world_size=2)
    assert (plan.rollout_per_process, plan.micro_per_mini, plan.updates_per_step) == (16, 2, 4)


def test_explained_variance_and_whitening_match_their_definitions():
    g = torch.Generator().manual_seed(8)
    returns = torch.randn(3, 5, generator=g, dtype=torch.float64)
    values = returns + 0.3 * torch.randn(3, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2, [1] * 4 + [0]])
    r, v = returns[mask.bool()], values[mask.bool()]
    expected = 1 - (r - v).var(unbiased=False) / r.var(unbiased=False)
    assert ppo._global_explained_variance(values, returns, mask).item() == pytest.approx(expected.item())
    assert ppo._global_explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert torch.isnan(ppo._global_explained_variance(values, torch.ones(3, 5), mask))
    whitened = ppo._global_whiten(returns, mask)
    torch.testing.assert_close(whitened[mask.bool()], (r - r.mean()) / r.std())
    assert (whitened[~mask.bool()] == 0).all()


def test_presets_set_their_switches_and_explicit_flags_win():
    best = resolve_preset(PPOConfig())
    assert best.preset == "ppo_max"
    assert (best.reward_norm, best.whiten_advantages, best.critic_from_reward) == (True, True, True)
    assert best.kl_coef > 0 and best.value_clip > 0 and best.reward_clip > 0 and best.max_grad_norm > 0
    plain = resolve_preset(PPOConfig(preset="vanilla"))
    assert (plain.reward_norm, plain.whiten_advantages, plain.critic_from_reward) == (False, False, False)
    assert plain.kl_coef == 0 and plain.value_clip == 0 and plain.reward_clip == 0 and plain.max_grad_norm == 0
    args = build_parser().parse_args(["ppo", "--preset", "vanilla", "--kl-coef", "0.2", "--reward-norm", "true"])
    mixed = resolve_preset(from_args(PPOConfig, args))
    assert (mixed.kl_coef, mixed.reward_norm, mixed.whiten_advantages) == (0.2, True, False)


def test_reward_model_path_with_lora_policy_saves_everything(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    metrics = ppo.run(config(tiny, out, max_steps=2, eval_every=1, lora_r=4, rollout_batch=8, mini_batch=8))
    assert metrics["kl/per_token"] >= 0 and "val/reward" in metrics
    assert AutoModelForCausalLM.from_pretrained(out / "model") is not None
    assert (out / "best" / "model.safetensors").exists() and (out / "curves.png").exists()
    samples = [json.loads(line) for line in (out / "samples" / "step-000002.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and {"prompt", "response", "reward"} <= set(samples[0])


@pytest.mark.slow
def test_two_processes_match_one_process(tiny, tmp_path):
    """The same global rollout batch on 1 or 2 processes gives the same run: reward and advantage statistics are
    reduced over processes (global whitening, synced running moments), losses are normalised by the global token
    count, gradients are averaged by DDP, logged statistics are global. Greedy sampling (top-k 1) makes the rollouts
    independent of each process's random stream; one mini-batch per step makes the update independent of how the
    rollout is split into mini-batches (which does depend on the number of processes)."""
    common = dict(max_steps=3, top_k=1, rollout_batch=16, mini_batch=16, batch_size=4, ppo_epochs=1,
                  critic_warmup_steps=1, eval_every=3)
    ppo.run(config(tiny, tmp_path / "single", **common), reward_fn=even_token_share)
    run_in_processes(functools.partial(ppo.run, reward_fn=even_token_share), config(tiny, tmp_path / "double",
                                                                                     **common))
    single, double = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "double")
    assert [r["step"] for r in single] == [r["step"] for r in double] == [1, 2, 3]
    for a, b in zip(single, double):
        keys = {k for k in a if not k.startswith("time/") and isinstance(a[k], float)}
        assert keys <= set(b)
        bad = [(key, a[key], b[key]) for key in sorted(keys) if b[key] != pytest.approx(a[key], rel=1e-3, abs=1e-4)]
        assert not bad, (a["step"], bad)
    assert single[-1]["kl/per_token"] > 0.01  # the policy did move away from the reference ...
    from safetensors.torch import load_file

    one, two = (load_file(str(tmp_path / name / "model" / "model.safetensors")) for name in ("single", "double"))
    for key in one:  # ... and identically on both setups
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=key)
