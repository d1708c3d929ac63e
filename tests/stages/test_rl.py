"""PPO-max stage: the first update's probability ratio is exactly 1 (padding included, and with a model whose
config has dropout); log-probs are scored at the sampling temperature; filtered sampling is refused unless the bias
is accepted; PPO raises a programmatic reward and the KL penalty keeps the policy nearer the reference; an update
runs without a critic; a stopped run resumes with identical metrics; impossible batch geometry is refused with a
clear error; presets set their switches and explicit flags win; the reward-model path (critic from the RM, LoRA
policy) writes a trained model, best/ chosen by the caller's validation scorer and validation samples; two
processes with gloo give the same run as one process, and so do the critic stepping beside the policy and a
group's prompt shared by its replies in every forward."""

from __future__ import annotations

import functools
import json
import math
import shutil

import pytest
import torch
import yaml

from moss_rlhf import distributed
from moss_rlhf.cli import build_parser, main
from moss_rlhf.config import ConfigError, from_args
from moss_rlhf.models import position_ids_of
from moss_rlhf.packing import packed_logprobs
from moss_rlhf.rollout import RLModels, make_experience, plan_batches, response_logprobs
from moss_rlhf.runs import read_metrics
from moss_rlhf.sampling import SamplingConfig
from moss_rlhf.sampling.builtin import BuiltinSampler
from moss_rlhf.stages import rl
from moss_rlhf.stages.rl import RLConfig, resolve_preset
from tests.conftest import assert_weights_close, run_in_processes

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
    # a reward model whose head is not zero, so that its rewards differ between replies
    from moss_rlhf.models import load_scorer, save_model

    scorer = load_scorer(str(root / "model"), tokenizer)
    torch.nn.init.normal_(scorer.score.weight, std=0.5, generator=torch.Generator().manual_seed(0))
    save_model(scorer, tokenizer, root / "reward")
    return root


def config(tiny, out, **overrides) -> RLConfig:
    values = dict(out=str(out), policy=str(tiny / "model"), reward_model=str(tiny / "model"),
                  prompts=[str(tiny / "prompts.jsonl")], eval_prompts=[str(tiny / "eval.jsonl")], eval_size=8,
                  rollout_batch=16, mini_batch=8, batch_size=4, ppo_epochs=2, max_new_tokens=12, max_steps=4,
                  lr=1e-3, critic_lr=1e-3, eval_every=0, save_every=0, progress=False, device="cpu", seed=0)
    values.update(overrides)
    return RLConfig(**values)


def even_token_share(rollout) -> torch.Tensor:
    """Reward for tests: the share of response tokens with an even id (≈ 0.5 for a random policy)."""
    mask = rollout.response_mask.float()
    return ((rollout.response_ids % 2 == 0).float() * mask).sum(1) / mask.sum(1).clamp(min=1)


def _rollout(tiny, temperature: float = 1.0, stop_every: int = 7):
    from moss_rlhf.models import load_causal_lm, load_scorer
    from moss_rlhf.tokenizer import encode_chat, load_tokenizer

    tokenizer = load_tokenizer(str(tiny / "model"))
    policy, critic = load_causal_lm(str(tiny / "model")), load_scorer(str(tiny / "model"), tokenizer)
    prompts = [encode_chat(tokenizer, [{"role": "user", "content": t[: 5 + 9 * i]}], True)
               for i, t in enumerate(TEXTS[:6])]
    # many stop tokens, so responses end at different lengths: right padding inside the response block
    sampler = BuiltinSampler(policy, stop_ids=list(range(0, 300, stop_every)), pad_id=tokenizer.pad_token_id)
    rollout = sampler.generate(prompts, SamplingConfig(max_new_tokens=10, temperature=temperature),
                               seeds=list(range(6)))
    models = RLModels(policy, load_causal_lm(str(tiny / "model")), None, critic)
    return models, rollout


def test_first_update_ratio_is_exactly_one_with_padding(tiny):
    models, rollout = _rollout(tiny)
    assert (rollout.prompt_mask == 0).any()  # prompts of different lengths: left padding
    lengths = rollout.response_mask.sum(1)
    assert lengths.min() < lengths.max()
    chunks = make_experience(models, rollout, even_token_share(rollout), micro_batch=3, temperature=1.0)
    for chunk in chunks:
        with torch.enable_grad():
            logprobs, _ = packed_logprobs(models.policy, chunk.packed, with_entropy=True)
        assert torch.equal(logprobs.detach(), chunk.old_logprobs)
        padded, _ = response_logprobs(models.policy, chunk.sequences, chunk.attention_mask,
                                      position_ids_of(chunk.attention_mask), chunk.response_width)
        counted = chunk.response_mask.bool()  # packing changes no result, and leaves 0 after each reply's end
        torch.testing.assert_close(padded[counted], chunk.old_logprobs[counted], atol=1e-5, rtol=0)
        assert (chunk.old_logprobs[~counted] == 0).all()
        ratio = torch.exp(logprobs.detach() - chunk.old_logprobs)
        assert torch.equal(ratio[chunk.response_mask.bool()], torch.ones(int(chunk.response_mask.sum())))
        # the policy starts as the reference (scored in larger chunks, so equal up to rounding)
        assert torch.allclose(chunk.ref_logprobs, chunk.old_logprobs, atol=1e-5)


def test_logprobs_are_scored_at_the_sampling_temperature(tiny):
    """At T = 0.5 the old and reference log-probs are those of softmax(logits / 0.5), the distribution the tokens
    were drawn from: they match the sampler's own to rounding, while the temperature-1 log-probs are far off."""
    models, rollout = _rollout(tiny, temperature=0.5)
    chunks = make_experience(models, rollout, even_token_share(rollout), micro_batch=3, temperature=0.5)
    for chunk in chunks:
        mask = chunk.response_mask.bool()
        torch.testing.assert_close(chunk.old_logprobs[mask], chunk.sample_logprobs[mask], atol=2e-5, rtol=0)
        torch.testing.assert_close(chunk.ref_logprobs[mask], chunk.sample_logprobs[mask], atol=2e-5, rtol=0)
        at_one, _ = packed_logprobs(models.policy, chunk.packed, 1.0)
        assert (at_one[mask] - chunk.sample_logprobs[mask]).abs().max() > 0.05


def test_reference_temperature_sharpens_only_the_reference(tiny, tmp_path):
    """--reference-temperature τ: the reference's log-probs are those of softmax(logits_ref / τ) (a plain padded
    forward in the test, divided by τ), the policy's stay at the sampling temperature; the KL then starts above 0
    though the policy is the reference. Refused where there is no KL to take."""
    models, rollout = _rollout(tiny)
    chunks = make_experience(models, rollout, even_token_share(rollout), micro_batch=3, temperature=1.0,
                             reference_temperature=0.5)
    width = rollout.response_ids.shape[1]
    logits = models.reference(input_ids=rollout.sequences, attention_mask=rollout.attention_mask,
                              position_ids=position_ids_of(rollout.attention_mask)).logits[:, -(width + 1):-1]
    expected = torch.log_softmax(logits / 0.5, -1).gather(-1, rollout.response_ids[..., None]).squeeze(-1)
    ref = torch.cat([c.ref_logprobs for c in chunks])
    old = torch.cat([c.old_logprobs for c in chunks])
    mask = rollout.response_mask.bool()
    torch.testing.assert_close(ref[mask], expected[mask], atol=2e-5, rtol=0)
    torch.testing.assert_close(old[mask], rollout.logprobs[mask], atol=2e-5, rtol=0)  # still at T = 1
    assert (ref[mask] - old[mask]).abs().max() > 0.05
    with pytest.raises(ConfigError, match="--kl-coef 0"):
        resolve_preset(config(tiny, tmp_path / "x", reference_temperature=0.5, kl_coef=0.0)).check()
    with pytest.raises(ConfigError, match="--reference-temperature must be above 0"):
        from_args(RLConfig, build_parser().parse_args(["ppo", "--prompts", "p", "--reference-temperature", "0"]))


def test_bf16_rollouts_come_from_a_copy_that_follows_the_policy(tiny, tmp_path):
    """--precision bf16: the builtin sampler generates from a bf16 copy of the fp32 policy, synced after every
    update; the trainer's (autocast) log-probs of its samples differ from the sampler's only by bf16 rounding
    (~1e-3; a copy left stale after the first update was off by 0.28)."""
    rl.run(config(tiny, tmp_path / "bf16", precision="bf16", max_steps=3), reward_fn=even_token_share)
    rows = read_metrics(tmp_path / "bf16")
    assert rows[-1]["kl/per_token"] > 0.01  # the policy moved
    for row in rows:
        assert 0 < row["rollout/logprob_abs_diff"] < 0.01, row["step"]


def test_filtered_sampling_is_refused_unless_the_bias_is_accepted(tiny, tmp_path):
    for flag in ({"top_k": 5}, {"top_p": 0.9}, {"repetition_penalty": 1.2}):
        with pytest.raises(ConfigError, match="accept-sampling-bias"):
            config(tiny, tmp_path / "x", **flag)
        config(tiny, tmp_path / "x", accept_sampling_bias=True, **flag)  # accepted explicitly
    with pytest.raises(ConfigError, match="--temperature must be above 0"):
        from_args(RLConfig, build_parser().parse_args(["ppo", "--prompts", "p", "--temperature", "0"]))


def test_dropout_is_off_so_the_first_ratio_is_exactly_one(tiny, tmp_path):
    """A policy whose config asks for dropout: sampling, old log-probs and the update must all see the same
    function, or the ratio at the first update is not 1 and the KL to the (identical) reference is not 0."""
    from moss_rlhf.models import load_causal_lm

    dropped = load_causal_lm(str(tiny / "model"), attention_dropout=0.3)
    assert dropped.config.attention_dropout == 0.3
    dropped.save_pretrained(tmp_path / "dropout")
    shutil.copy(tiny / "model" / "tokenizer.json", tmp_path / "dropout")
    shutil.copy(tiny / "model" / "tokenizer_config.json", tmp_path / "dropout")
    policy = str(tmp_path / "dropout")
    rl.run(config(tiny, tmp_path / "run", policy=policy, reward_model=policy, max_steps=1, ppo_epochs=1),
            reward_fn=even_token_share)
    row = read_metrics(tmp_path / "run")[0]
    # the reference is scored in other (packed) chunks than the policy: equal up to rounding
    assert row["policy/first_ratio_mean"] == 1.0 and abs(row["kl/per_token"]) < 1e-6


def test_an_update_runs_without_a_critic(tiny, tmp_path):
    metrics = rl.run(config(tiny, tmp_path / "run", max_steps=3, use_critic=False, lr=3e-3),
                      reward_fn=even_token_share)
    rows = read_metrics(tmp_path / "run")
    assert not any(k.startswith("critic/") for r in rows for k in r)
    assert [r["policy/first_ratio_mean"] for r in rows] == [1.0, 1.0, 1.0]
    assert metrics["policy/approx_kl"] > 0 and rows[-1]["kl/per_token"] != 0  # the policy moved
    assert not any(p.name.startswith("critic") for p in (tmp_path / "run" / "checkpoints").glob("*/*"))


def test_loop_first_ratio_is_one_and_checks_batches(tiny, tmp_path, capsys):
    metrics = rl.run(config(tiny, tmp_path / "run", max_steps=2), reward_fn=even_token_share)
    rows = read_metrics(tmp_path / "run")
    assert [r["policy/first_ratio_mean"] for r in rows] == [1.0, 1.0]
    assert abs(rows[0]["kl/per_token"]) < 1e-6  # policy == reference before any update
    assert rows[0]["rollout/logprob_abs_diff"] < 1e-5  # the trainer scores what the sampler sampled
    assert metrics["policy/approx_kl"] > 0  # later mini-batches did move
    printed = capsys.readouterr().out
    assert "rollout batch 16 prompts = 1 process(es) × 16" in printed and "4 updates per step" in printed
    for row in rows:  # the step's phases add up to it: sampling, rewards, scoring, update
        phases = [row[f"time/{name}_s"] for name in ("generate", "reward", "score", "update")]
        assert min(phases) >= 0 and sum(phases) == pytest.approx(row["time/step_s"], rel=1e-9)


@pytest.mark.slow
def test_ppo_raises_reward_and_kl_penalty_holds_policy_near_reference(tiny, tmp_path):
    common = dict(max_steps=25, ppo_epochs=2, lr=3e-3, rollout_batch=16, mini_batch=8)
    free = rl.run(config(tiny, tmp_path / "free", kl_coef=0.0, **common), reward_fn=even_token_share)
    held = rl.run(config(tiny, tmp_path / "held", kl_coef=1.0, **common), reward_fn=even_token_share)
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
    rl.run(config(tiny, out, max_steps=4, save_every=2, keep_checkpoints=5, eval_every=2, ptx_coef=0.5,
                   ptx_data=[str(tiny / "sft.jsonl")], critic_warmup_steps=1, adaptive_kl=True, kl_coef=0.1),
            reward_fn=even_token_share)
    uninterrupted = read_metrics(out)
    shutil.rmtree(out / "checkpoints" / "step-00000004")  # as if killed after the step-2 checkpoint
    rl.run(config(tiny, out, max_steps=4, save_every=2, keep_checkpoints=5, eval_every=2, ptx_coef=0.5,
                   ptx_data=[str(tiny / "sft.jsonl")], critic_warmup_steps=1, adaptive_kl=True, kl_coef=0.1,
                   resume=True), reward_fn=even_token_share)
    resumed = read_metrics(out)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]

    assert [steady(r) for r in resumed[2:]] == [steady(r) for r in uninterrupted[2:]]
    assert uninterrupted[0]["policy/trained"] == 0.0 and uninterrupted[1]["policy/trained"] == 1.0
    assert "policy/ptx_loss" in uninterrupted[1] and uninterrupted[2]["kl/coef"] != 0.1


def test_the_critic_stepping_beside_the_policy_gives_the_same_run(tiny, tmp_path, capsys):
    """--overlap-critic (one process on a CPU, two threads): the critic's steps run on a thread of their own beside
    the policy's; every logged statistic and the final policy equal those of the run that takes them in turn (to
    float rounding: each side computes with one thread instead of two). With one thread there is nothing to
    share and the steps run in turn."""
    from safetensors.torch import load_file

    torch.set_num_threads(2)
    for overlap in (False, True):
        rl.run(config(tiny, tmp_path / str(overlap), overlap_critic=overlap, max_steps=3), reward_fn=even_token_share)
        assert ("beside the policy's on a thread of their own" in capsys.readouterr().out) is overlap
    in_turn, beside = read_metrics(tmp_path / "False"), read_metrics(tmp_path / "True")
    # both models moved (later steps' values and value losses depend on the critic's earlier steps)
    assert beside[-1]["kl/per_token"] > 0.01 and all(row["critic/grad_norm"] > 0 for row in beside)
    for a, b in zip(in_turn, beside):
        keys = sorted(k for k in a if not k.startswith(("time/", "memory/")) and isinstance(a[k], float))
        bad = [(key, a[key], b[key]) for key in keys if b[key] != pytest.approx(a[key], rel=1e-3, abs=1e-4)]
        assert not bad, (a["step"], bad)
    one, two = (load_file(tmp_path / name / "model" / "model.safetensors") for name in ("False", "True"))
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=key)
    torch.set_num_threads(1)
    rl.run(config(tiny, tmp_path / "one", max_steps=1), reward_fn=even_token_share)
    assert "beside the policy's" not in capsys.readouterr().out


def test_impossible_batch_geometry_is_refused(tmp_path, capsys):
    with pytest.raises(ConfigError, match="rollout-batch .* multiple of --mini-batch"):
        from_args(RLConfig, build_parser().parse_args(["ppo", "--prompts", "p.jsonl", "--rollout-batch", "10",
                                                        "--mini-batch", "4"]))
    with pytest.raises(ConfigError, match=r"--mini-batch \(8\) must be a multiple of --batch-size \(4\) × 3"):
        plan_batches(resolve_preset(RLConfig(prompts=["p"], rollout_batch=24, mini_batch=8, batch_size=4)),
                     world_size=3)
    assert main(["ppo", "--out", str(tmp_path / "x"), "--prompts", "p.jsonl", "--rollout-batch", "10",
                 "--mini-batch", "4"]) == 2
    assert "error:" in capsys.readouterr().err
    plan = plan_batches(resolve_preset(RLConfig(prompts=["p"], rollout_batch=32, mini_batch=16, batch_size=4,
                                                 ppo_epochs=2)), world_size=2)
    assert (plan.rollout_per_process, plan.micro_per_mini, plan.updates_per_step) == (16, 2, 4)


def test_explained_variance_and_whitening_match_their_definitions():
    g = torch.Generator().manual_seed(8)
    returns = torch.randn(3, 5, generator=g, dtype=torch.float64)
    values = returns + 0.3 * torch.randn(3, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2, [1] * 4 + [0]])
    r, v = returns[mask.bool()], values[mask.bool()]
    expected = 1 - (r - v).var(unbiased=False) / r.var(unbiased=False)
    assert distributed.global_explained_variance(values, returns, mask).item() == pytest.approx(expected.item())
    assert distributed.global_explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert torch.isnan(distributed.global_explained_variance(values, torch.ones(3, 5), mask))
    whitened = distributed.global_whiten(returns, mask)
    torch.testing.assert_close(whitened[mask.bool()], (r - r.mean()) / r.std())
    assert (whitened[~mask.bool()] == 0).all()


def test_presets_set_their_switches_and_explicit_flags_win():
    best = resolve_preset(RLConfig(prompts=["p"]))
    assert best.preset == "ppo_max"
    assert (best.reward_norm, best.whiten_advantages, best.critic_from_reward) == (True, True, True)
    assert best.kl_coef > 0 and best.value_clip > 0 and best.reward_clip > 0 and best.max_grad_norm > 0
    plain = resolve_preset(RLConfig(prompts=["p"], preset="vanilla"))
    assert (plain.reward_norm, plain.whiten_advantages, plain.critic_from_reward) == (False, False, False)
    assert plain.kl_coef == 0 and plain.value_clip == 0 and plain.reward_clip == 0 and plain.max_grad_norm == 0
    args = build_parser().parse_args(["ppo", "--prompts", "p.jsonl", "--preset", "vanilla", "--kl-coef", "0.2",
                                      "--reward-norm", "true"])
    mixed = resolve_preset(from_args(RLConfig, args))
    assert (mixed.kl_coef, mixed.reward_norm, mixed.whiten_advantages) == (0.2, True, False)


def test_reward_model_path_with_lora_policy_saves_everything(tiny, tmp_path):
    """A reward model (critic initialised from it), a LoRA policy, and a caller's validation scorer that picks best/:
    the saved model is the trained policy with its adapters merged, best/ is the validated step that scored best."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    length = lambda conversations, replies: [float(len(r)) for r in replies]
    metrics = rl.run(config(tiny, out, max_steps=2, eval_every=1, lora_r=4, rollout_batch=8, mini_batch=8, lr=1e-2,
                             reward_model=str(tiny / "reward")), scorers={"length": length})
    assert metrics["kl/per_token"] > 0 and "val/reward" in metrics and "val/length" in metrics
    rows = read_metrics(out)
    best = json.loads((out / "best.json").read_text())
    assert best["val/length"] == max(r["val/length"] for r in rows)
    before, after = (load_file(str(path / "model.safetensors")) for path in (tiny / "model", out / "model"))
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all("lora" not in k for k in after)  # merged adapters changed the weights
    assert (out / "best" / "model.safetensors").exists() and (out / "curves.png").exists()
    samples = [json.loads(line) for line in (out / "samples" / "step-000002.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and {"prompt", "response", "reward", "length"} <= set(samples[0])
    assert [s["length"] for s in samples] == [float(len(s["response"])) for s in samples]
    with pytest.raises(ConfigError, match="no validation scorer"):
        rl.run(config(tiny, tmp_path / "other", best_metric="gold", max_steps=1))


@pytest.mark.slow
def test_two_processes_match_one_process(tiny, tmp_path):
    """The same global rollout batch on 1 or 2 processes gives the same run: reward and advantage statistics are
    reduced over processes (global whitening, synced running moments), losses are normalised by the global token
    count, gradients are averaged by DDP, logged statistics are global. Per-prompt seeds (from each prompt's place in
    the data stream) make the sampled rollouts the same on either setup; one mini-batch per step makes the update
    independent of how the rollout is split into mini-batches (which does depend on the number of processes)."""
    common = dict(max_steps=3, rollout_batch=16, mini_batch=16, batch_size=4, ppo_epochs=1,
                  critic_warmup_steps=1, eval_every=3)
    single = one_and_two_processes(config(tiny, tmp_path / "single", **common),
                                   config(tiny, tmp_path / "double", **common), even_token_share)
    assert single[-1]["kl/per_token"] > 0.01  # the policy did move away from the reference, identically on both


def one_and_two_processes(single_cfg: RLConfig, double_cfg: RLConfig, reward_fn) -> list[dict]:
    """Run ``single_cfg`` on one process and ``double_cfg`` on two; assert every logged statistic and the final
    weights agree (to rounding with DDP; under FSDP see ``assert_weights_close``); return the single run's
    metrics."""
    from safetensors.torch import load_file

    rl.run(single_cfg, reward_fn=reward_fn)
    run_in_processes(functools.partial(rl.run, reward_fn=reward_fn), double_cfg)
    single, double = read_metrics(single_cfg.out), read_metrics(double_cfg.out)
    assert [r["step"] for r in single] == [r["step"] for r in double] == [1, 2, 3]
    for a, b in zip(single, double):
        keys = {k for k in a if not k.startswith(("time/", "memory/")) and isinstance(a[k], float)}
        assert keys <= set(b)
        bad = [(key, a[key], b[key]) for key in sorted(keys) if b[key] != pytest.approx(a[key], rel=1e-3, abs=1e-4)]
        assert not bad, (a["step"], bad)
    one, two = (load_file(f"{cfg.out}/model/model.safetensors") for cfg in (single_cfg, double_cfg))
    if double_cfg.parallel == "fsdp":
        assert_weights_close(one, two)
    for key in one if double_cfg.parallel == "ddp" else ():
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=key)
    return single


def nan_on_step_two(rollout):
    """A reward function that breaks once: NaN for every reply of the second rollout."""
    nan_on_step_two.calls += 1
    scores = even_token_share(rollout)
    return torch.full_like(scores, float("nan")) if nan_on_step_two.calls == 2 else scores


def test_a_nan_reward_stops_the_run_or_is_skipped(tiny, tmp_path):
    from safetensors.torch import load_file

    from moss_rlhf.config import NonFiniteError

    nan_on_step_two.calls = 0
    with pytest.raises(NonFiniteError, match=r"rl: step 2: 16 rewards are NaN or infinite"):
        rl.run(config(tiny, tmp_path / "stop", max_steps=3), reward_fn=nan_on_step_two)
    assert not (tmp_path / "stop" / "model").exists()
    nan_on_step_two.calls = 0
    metrics = rl.run(config(tiny, tmp_path / "skip", max_steps=3, on_nonfinite="skip"), reward_fn=nan_on_step_two)
    rows = read_metrics(tmp_path / "skip")
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[1] == {"step": 2, "rl/skipped_steps": 1.0}
    assert all(math.isfinite(v) for v in metrics.values())  # the last step's metrics are finite: the NaN never got in
    weights = load_file(str(tmp_path / "skip" / "model" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


def even_majority(rollout) -> torch.Tensor:
    """A 0/1 reward (the reply's first token is even, so p ≈ 1/2): many groups of equal rewards, for dynamic
    sampling to refill."""
    return (rollout.response_ids[:, 0] % 2 == 0).float()


def grpo_config(tiny, out, **overrides) -> RLConfig:
    values = dict(preset="grpo", rollout_batch=8, group_size=2, mini_batch=8, batch_size=4, dynamic_sampling=True,
                  dynamic_sampling_tries=2, kl_coef=0.1, max_steps=4)
    return config(tiny, out, **{**values, **overrides})


def steady(row):
    return {k: v for k, v in row.items() if not k.startswith("time/")}


def test_grpo_with_dynamic_sampling_resumes_exactly(tiny, tmp_path):
    """Groups, refills of equal-reward groups, the KL in the loss and the shuffled group-whole mini-batches all come
    back identically after a kill: every draw is a function of the step and the prompt's stream position."""
    out = tmp_path / "run"
    rl.run(grpo_config(tiny, out, save_every=2, keep_checkpoints=5, eval_every=2), reward_fn=even_majority)
    uninterrupted = read_metrics(out)
    shutil.rmtree(out / "checkpoints" / "step-00000004")  # as if killed after the step-2 checkpoint
    rl.run(grpo_config(tiny, out, save_every=2, keep_checkpoints=5, eval_every=2, resume=True),
           reward_fn=even_majority)
    resumed = read_metrics(out)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [steady(r) for r in resumed[2:]] == [steady(r) for r in uninterrupted[2:]]
    assert max(r["dynamic/sampled_per_kept_group"] for r in uninterrupted) > 1  # refills happened
    assert all(r["kl/coef"] == 0.1 and "advantage/std" in r and "groups/equal_reward_share" in r
               for r in uninterrupted)


def test_shared_prompts_give_the_same_run(tiny, tmp_path):
    """--share-prompts (on by default): every forward over a rollout — the reward model's, the reference's, the
    policy's in the update — runs a group's prompt once; the run is the one that packs each reply with its own copy
    (to float rounding), with fewer positions through the decoder."""
    runs = {}
    for share in (False, True):
        out = tmp_path / str(share)
        rl.run(grpo_config(tiny, out, reward_model=str(tiny / "reward"), group_size=4, mini_batch=16,
                           ppo_epochs=2, max_steps=3, share_prompts=share))
        runs[share] = read_metrics(out)
    for a, b in zip(runs[False], runs[True]):
        assert b["update/forward_tokens"] < a["update/forward_tokens"]
        keys = sorted(k for k in a if isinstance(a[k], float)
                      and not k.startswith(("time/", "memory/", "update/forward")))
        bad = [(key, a[key], b[key]) for key in keys if b[key] != pytest.approx(a[key], rel=1e-3, abs=1e-4)]
        assert not bad, (a["step"], bad)
    assert runs[True][-1]["policy/approx_kl"] > 0 and runs[True][-1]["reward/reward_model"] != 0


@pytest.mark.slow
def test_compiled_models_give_the_eager_run(tiny, tmp_path, monkeypatch):
    """--compile: the policy's, the reference's and the reward model's blocks and the sampler's decode step run
    through torch.compile; the run is the eager one to float rounding (the same replies, rewards, losses) and the
    saved policy is a plain model."""
    from moss_rlhf.models import load_causal_lm
    from moss_rlhf.sampling import decoders

    runs, blocks, steps = {}, [], []
    for compiled in (False, True):
        if compiled:  # count what is compiled: equal runs alone would pass with nothing compiled
            compile_block, compiled_decode = torch.nn.Module.compile, decoders._compiled_decode
            monkeypatch.setattr(torch.nn.Module, "compile",
                                lambda self, **kw: blocks.append(type(self).__name__) or compile_block(self, **kw))
            monkeypatch.setattr(decoders, "_compiled_decode", lambda: steps.append(1) or compiled_decode())
        out = tmp_path / str(compiled)
        rl.run(grpo_config(tiny, out, reward_model=str(tiny / "reward"), group_size=4, mini_batch=16, max_steps=2,
                           compile=compiled))
        runs[compiled] = read_metrics(out)
    layers = load_causal_lm(str(tiny / "model")).config.num_hidden_layers
    assert blocks == ["LlamaDecoderLayer"] * 3 * layers  # the policy's, the reference's, the reward model's
    assert steps  # the sampler decoded through the compiled step
    for a, b in zip(runs[False], runs[True]):
        keys = sorted(k for k in a if isinstance(a[k], float) and not k.startswith(("time/", "memory/")))
        bad = [(key, a[key], b[key]) for key in keys if b[key] != pytest.approx(a[key], rel=1e-3, abs=1e-4)]
        assert not bad, (a["step"], bad)
        assert b["response/length"] == a["response/length"]
    eager, compiled = (load_causal_lm(str(tmp_path / str(c) / "model")) for c in (False, True))
    assert eager.state_dict().keys() == compiled.state_dict().keys()


def test_remax_and_reinforce_pp_run_without_a_critic_or_reward_model(tiny, tmp_path):
    """ReMax samples a greedy reply per prompt as its baseline; REINFORCE++ whitens reward-to-go; neither loads a
    critic, and with only a Python reward the reward model is not loaded either."""
    for preset in ("remax", "reinforce_pp", "reinforce_pp_baseline"):
        extra = dict(preset="reinforce_pp", advantage="reinforce_pp_baseline", group_size=2) \
            if preset == "reinforce_pp_baseline" else dict(preset=preset)
        metrics = rl.run(config(tiny, tmp_path / preset, max_steps=2, reward_model="/nonexistent", **extra),
                         reward_fn=even_token_share)
        assert math.isfinite(metrics["policy/loss"]) and "critic/value_loss" not in metrics, preset
        assert metrics["kl/per_token"] > 0, preset
        saved = yaml.safe_load((tmp_path / preset / "config.yaml").read_text())
        assert saved["advantage"] == extra.get("advantage", preset) and saved["use_critic"] is False, preset


@pytest.mark.slow
def test_grpo_two_processes_match_one_process(tiny, tmp_path):
    """GRPO with its groups split over two processes (each group whole in one), the KL in the loss, a per-sequence
    loss mean and dynamic sampling: the same run as on one process — group baselines, refills and the global
    sequence count of the loss do not depend on the split."""
    common = dict(max_steps=3, rollout_batch=8, group_size=4, mini_batch=32, ppo_epochs=2, eval_every=3)
    single = one_and_two_processes(grpo_config(tiny, tmp_path / "single", **common),
                                   grpo_config(tiny, tmp_path / "double", **common), even_majority)
    assert max(r["dynamic/sampled_per_kept_group"] for r in single) > 1  # refills happened
    assert single[-1]["policy/approx_kl"] > 0 and single[-1]["kl/per_token"] > 0  # the policy moved


VERIFIABLE = '''
def letter_share(prompts, responses, extras):
    """The share of a reply's characters that are the prompt record's "letter"."""
    assert len(prompts) == len(responses) == len(extras)
    return [sum(ch == x["letter"] for ch in r) / max(1, len(r)) for r, x in zip(responses, extras)]
'''


@pytest.mark.slow
def test_grpo_from_the_command_line_raises_a_verifiable_reward(tiny, tmp_path, monkeypatch, capsys):
    """RL from a verifiable reward without a reward model: `moss-rlhf rl --preset grpo --reward-fn module:fn`, the
    function reading each prompt record's extra field; the reward rises."""
    (tmp_path / "letter_reward.py").write_text(VERIFIABLE)
    monkeypatch.syspath_prepend(str(tmp_path))
    records = [{"prompt": " ".join(t.split()[:3]), "letter": "e"} for t in TEXTS]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    args = ["rl", "--preset", "grpo", "--out", str(tmp_path / "run"), "--policy", str(tiny / "model"),
            "--prompts", str(tmp_path / "prompts.jsonl"), "--eval-size", "4", "--rollout-batch", "4",
            "--group-size", "4", "--mini-batch", "16", "--batch-size", "8", "--max-new-tokens", "12",
            "--max-steps", "30", "--lr", "3e-3", "--kl-coef", "0.0", "--eval-every", "0", "--save-every", "0",
            "--no-progress", "--reward-fn", "letter_reward:letter_share"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "reward = 1 × letter_reward:letter_share" in out and "no critic" in out
    rows = read_metrics(tmp_path / "run")
    start = sum(r["reward/raw_mean"] for r in rows[:5]) / 5
    end = sum(r["reward/raw_mean"] for r in rows[-5:]) / 5
    assert end > start + 0.1, (start, end)
    assert rows[-1]["reward/letter_reward:letter_share"] == pytest.approx(rows[-1]["reward/raw_mean"])
    assert main(args[:-1] + ["no_such_module:fn", "--out", str(tmp_path / "bad")]) == 2
    assert "--reward-fn" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["ppo_max", "grpo", "grpo_lora"])
def test_fsdp_on_two_processes_matches_one_process(tiny, tmp_path, recipe):
    """--parallel fsdp: policy, critic, reference and reward model sharded over two processes, sampling from the
    sampler's whole copy of the policy (refreshed after every update): the same run as one process holding
    everything. PPO-max: a critic from the sharded reward model; GRPO: groups, the KL in the loss, dynamic sampling;
    with LoRA: adapters and frozen base weights sharded together, the reference the policy without its adapters,
    the final model merged from the gathered shards."""
    if recipe == "ppo_max":
        common = dict(max_steps=3, rollout_batch=16, mini_batch=16, batch_size=4, ppo_epochs=1, eval_every=3,
                      critic_warmup_steps=1, reward_model=str(tiny / "reward"), reward_model_weight=1.0)
        make, reward_fn = config, even_token_share
    else:
        common = dict(max_steps=3, rollout_batch=8, group_size=4, mini_batch=32, ppo_epochs=2, eval_every=3)
        make, reward_fn = grpo_config, even_majority
    if recipe == "grpo_lora":
        common.update(lora_r=4)
    single = one_and_two_processes(make(tiny, tmp_path / "single", **common),
                                   make(tiny, tmp_path / "fsdp", parallel="fsdp", **common), reward_fn)
    assert single[-1]["kl/per_token"] > 0  # the policy moved, identically on both
    assert (tmp_path / "fsdp" / "best" / "model.safetensors").exists()  # gathered for the best validation too
    sharded = read_metrics(tmp_path / "fsdp")[0]
    memory = [k for k in single[0] if k.startswith("memory/")]
    # policy, critic (+ optimizers), reference (with LoRA: the policy itself), reward model
    assert len(memory) == {"ppo_max": 6, "grpo": 3, "grpo_lora": 2}[recipe]
    for key in memory:  # each process holds half of every model and optimizer state
        assert sharded[key] == pytest.approx(single[0][key] / 2, rel=0.02), key


@pytest.mark.slow
def test_fsdp_ppo_max_resumes_exactly_from_sharded_checkpoints(tiny, tmp_path):
    """Policy and critic with their optimizers in sharded checkpoints (torch.distributed.checkpoint), the running
    reward moments and the KL controller in state.pt: a run killed after its step-2 checkpoint and resumed on two
    processes repeats the uninterrupted run."""
    out = tmp_path / "run"
    common = dict(parallel="fsdp", save_every=2, keep_checkpoints=5, eval_every=2, reward_model=str(tiny / "reward"),
                  reward_model_weight=1.0)
    train = functools.partial(rl.run, reward_fn=even_token_share)
    run_in_processes(train, config(tiny, out, **common))
    uninterrupted = read_metrics(out)
    assert (out / "checkpoints" / "step-00000002" / "sharded").is_dir()
    shutil.rmtree(out / "checkpoints" / "step-00000004")  # as if killed after the step-2 checkpoint
    run_in_processes(train, config(tiny, out, resume=True, **common))
    resumed = read_metrics(out)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [steady(r) for r in resumed[2:]] == [steady(r) for r in uninterrupted[2:]]
    assert uninterrupted[-1]["critic/value_loss"] > 0 and uninterrupted[-1]["kl/per_token"] > 0


def test_validation_scorers_from_the_command_line_pick_best_and_never_train(tiny, tmp_path, monkeypatch, capsys):
    """`moss-rlhf rl --val-scorer NAME=SPEC`: a Python function and a reward-model directory score each validation's
    replies as val/NAME (the saved samples carry each reply's scores); the first picks best/; neither enters the
    training reward; a name that validation already uses is refused before anything loads."""
    from moss_rlhf.scoring import text_scorer

    (tmp_path / "val_scorers.py").write_text("def chars(prompts, responses):\n"
                                             "    return [float(len(r)) for r in responses]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["rl", "--out", str(tmp_path / "run"), "--policy", str(tiny / "model"), "--reward-model",
            str(tiny / "reward"), "--prompts", str(tiny / "prompts.jsonl"), "--eval-prompts", str(tiny / "eval.jsonl"),
            "--eval-size", "8", "--rollout-batch", "8", "--mini-batch", "8", "--batch-size", "4", "--max-new-tokens",
            "12", "--max-steps", "3", "--lr", "1e-2", "--eval-every", "1", "--save-every", "0", "--no-progress",
            "--device", "cpu", "--val-scorer", "chars=val_scorers:chars", "--val-scorer", f"rm={tiny / 'reward'}"]
    assert main(args) == 0
    assert "reward = 1 × the reward model;" in capsys.readouterr().out
    rows = [r for r in read_metrics(tmp_path / "run") if "val/chars" in r]
    assert len(rows) == 3
    assert all("reward/chars" not in row and "reward/rm" not in row for row in rows)
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples" / "step-000003.jsonl").read_text()
               .splitlines()]
    assert [s["chars"] for s in samples] == [float(len(s["response"])) for s in samples]
    rm = text_scorer(str(tiny / "reward"), torch.device("cpu"))([[{"role": "user", "content": s["prompt"]}]
                                                                 for s in samples], [s["response"] for s in samples])
    assert [s["rm"] for s in samples] == pytest.approx(rm, abs=1e-5)
    assert rows[-1]["val/rm"] == pytest.approx(sum(rm) / len(rm), abs=1e-5)
    assert json.loads((tmp_path / "run" / "best.json").read_text())["val/chars"] == max(r["val/chars"] for r in rows)
    assert main(args[:-2] + ["--val-scorer", str(tiny / "reward"), "--out", str(tmp_path / "bad")]) == 2
    assert "val/reward is validation's own metric" in capsys.readouterr().err
