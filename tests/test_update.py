"""The update phase against a plain reference: the policy loss of every aggregation mode, with the KL in the loss
(k3) or not, an asymmetric clip and an entropy bonus, has the gradient of the same loss written out here over one
padded batch — whether the rows come in one micro-batch or several (gradient accumulation equals one big batch);
later epochs shuffle whole groups."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

from moss_rlhf.losses import AGGREGATIONS
from moss_rlhf.models import load_causal_lm, position_ids_of
from moss_rlhf.rollout import RLModels, make_experience, response_logprobs
from moss_rlhf.sampling import SamplingConfig, encode_prompts
from moss_rlhf.sampling.builtin import BuiltinSampler
from moss_rlhf.tokenizer import load_tokenizer
from moss_rlhf.training import Trainee
from moss_rlhf.update import critic_thread, epoch_order, policy_step


@pytest.fixture(scope="module")
def setting(tiny_model_dir):
    torch.manual_seed(0)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    policy = load_causal_lm(str(tiny_model_dir)).eval()
    reference = load_causal_lm(str(tiny_model_dir)).eval().requires_grad_(False)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.02 * torch.randn_like(p))  # a reference the policy differs from
    questions = ["Where did Lin go?", "Bo?", "Where did Mei go with Tom today?", "Hi", "What is the cat like?", "Ok"]
    sampler = BuiltinSampler(policy, tokenizer, stop_ids=list(range(0, 4000, 11)), pad_id=tokenizer.pad_token_id)
    rollout = sampler.generate(encode_prompts(tokenizer, [[{"role": "user", "content": q}] for q in questions]),
                               SamplingConfig(max_new_tokens=8), seeds=list(range(6)))
    assert rollout.response_mask.sum(1).min() < rollout.response_mask.sum(1).max()  # replies of several lengths
    return policy, reference, rollout


def _reference_loss(policy, rollout, old, ref, advantages, cfg, kl_coef):
    """The policy loss over the whole rollout as one padded batch, aggregated with plain loops."""
    mask = rollout.response_mask.float()
    width = mask.shape[1]
    logprobs, entropy = response_logprobs(policy, rollout.sequences, rollout.attention_mask,
                                          position_ids_of(rollout.attention_mask), width, with_entropy=True,
                                          entropy_grad=True)
    ratio = torch.exp(logprobs - old)
    per_token = torch.maximum(-advantages * ratio,
                              -advantages * torch.clamp(ratio, 1 - cfg.clip_eps, 1 + cfg.clip_eps_high))
    if cfg.kl_placement == "loss":
        log_r = logprobs - ref
        per_token = per_token + kl_coef * (torch.exp(-log_r) - 1 + log_r)
    per_token = per_token - cfg.entropy_coef * entropy
    rows = [(per_token[b] * mask[b]).sum() for b in range(len(mask))]
    lengths = mask.sum(1)
    if cfg.loss_agg == "token_mean":
        return sum(rows) / lengths.sum()
    if cfg.loss_agg == "seq_mean_token_mean":
        return sum(r / n for r, n in zip(rows, lengths)) / len(rows)
    return sum(rows) / (len(rows) * cfg.max_new_tokens)


@pytest.mark.parametrize("mode, kl_placement, micro_batch",
                         [(mode, "loss", 2) for mode in AGGREGATIONS] + [("token_mean", "reward", 6)])
def test_policy_gradient_matches_the_padded_reference(setting, mode, kl_placement, micro_batch):
    policy, reference, rollout = setting
    cfg = SimpleNamespace(temperature=1.0, clip_eps=0.2, clip_eps_high=0.28, kl_placement=kl_placement,
                          kl_estimator="k3", kl_clamp=0.0, entropy_coef=0.01, loss_agg=mode, max_new_tokens=8)
    chunks = make_experience(RLModels(policy, reference, None, None), rollout, torch.zeros(6), micro_batch, 1.0)
    g = torch.Generator().manual_seed(1)
    for chunk in chunks:
        chunk.advantages = torch.randn(chunk.response_mask.shape, generator=g) * chunk.response_mask
        chunk.loss_mask = chunk.response_mask
    # the policy moves away from where the experience was made, so that clipping is active for some tokens
    saved = [p.detach().clone() for p in policy.parameters()]
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    try:
        trainee = Trainee(policy, policy, None, None, 0.0)
        mask = torch.cat([c.loss_mask for c in chunks])
        n_tokens, n_sequences = float(mask.sum()), float(len(mask))
        denominator = {"token_mean": n_tokens, "seq_mean_token_mean": n_sequences,
                       "seq_mean_token_sum_norm": n_sequences * 8}[mode]
        policy.zero_grad()
        stats = policy_step(cfg, trainee, chunks, denominator, n_tokens, 1, kl_coef=0.3)
        ours = [p.grad.clone() for p in policy.parameters()]
        policy.zero_grad()
        cat = lambda name: torch.cat([getattr(c, name) for c in chunks])  # noqa: E731
        expected = _reference_loss(policy, rollout, cat("old_logprobs"), cat("ref_logprobs"), cat("advantages"),
                                   cfg, 0.3)
        expected.backward()
        assert stats["policy/loss"] == pytest.approx(float(expected.detach()), rel=1e-4, abs=1e-6)
        assert 0 < stats["policy/clipfrac"] < 1
        for mine, theirs in zip(ours, (p.grad for p in policy.parameters())):
            torch.testing.assert_close(mine, theirs, rtol=1e-3, atol=1e-6)
    finally:
        with torch.no_grad():
            for p, value in zip(policy.parameters(), saved):
                p.copy_(value)
        policy.zero_grad()


def test_later_epochs_shuffle_whole_groups():
    assert epoch_order(8, 2, seed=0, step=3, epoch=0) == list(range(8))
    order = epoch_order(8, 2, seed=0, step=3, epoch=1)
    assert sorted(order) == list(range(8)) and order != list(range(8))
    assert all(order[i] % 2 == 0 and order[i + 1] == order[i] + 1 for i in range(0, 8, 2))  # blocks of two kept
    assert epoch_order(8, 2, seed=0, step=3, epoch=1) == order  # a function of (seed, step, epoch) alone


def test_a_steps_first_update_needs_no_stored_policy_logprobs(setting):
    """In a step's first update the policy is the one that sampled, so its detached log-probs are the ratio's
    denominator: skipping the policy's scoring forward (``score_policy=False``, the sampler's log-probs kept for
    statistics) gives bitwise the same gradient, and the first-ratio diagnostic still compares with what was
    stored (1 up to the sampler's rounding)."""
    policy, reference, rollout = setting
    cfg = SimpleNamespace(temperature=1.0, clip_eps=0.2, clip_eps_high=0.2, kl_placement="loss", kl_estimator="k3",
                          kl_clamp=0.0, entropy_coef=0.0, loss_agg="token_mean", max_new_tokens=8)
    grads, ratios = [], []
    for score_policy in (True, False):
        chunks = make_experience(RLModels(policy, reference, None, None), rollout, torch.zeros(6), 3, 1.0,
                                 score_policy=score_policy)
        g = torch.Generator().manual_seed(1)
        for chunk in chunks:
            chunk.advantages = torch.randn(chunk.response_mask.shape, generator=g) * chunk.response_mask
            chunk.loss_mask = chunk.response_mask
        n_tokens = float(sum(c.loss_mask.sum() for c in chunks))
        policy.zero_grad()
        stats = policy_step(cfg, Trainee(policy, policy, None, None, 0.0), chunks, n_tokens, n_tokens, 1, 0.3,
                            first_update=True)
        grads.append([p.grad.clone() for p in policy.parameters()])
        ratios.append(stats["policy/first_ratio_mean"])
    policy.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    assert ratios[0] == pytest.approx(1.0, abs=1e-12) and ratios[1] == pytest.approx(1.0, abs=1e-4)


def test_the_critic_thread_splits_the_threads_and_keeps_the_callers_autocast():
    """The critic's worker thread and the caller share torch's intra-op threads (1 + 1 of 2, 1 + 2 of 3) and get
    them back afterwards; autocast is per thread, so the worker enters the caller's (a bf16 run's critic computes
    in bf16 as it does in turn); an exception on the worker reaches the caller. Without the thread the step runs
    at once, on the caller's."""
    before = torch.get_num_threads()
    try:
        for threads, caller, worker in ((2, 1, 1), (3, 1, 2)):
            torch.set_num_threads(threads)
            with torch.autocast("cpu", dtype=torch.bfloat16), critic_thread(True) as beside:
                seen = beside(lambda: (torch.get_num_threads(), torch.is_autocast_enabled("cpu"),
                                       (torch.ones(2, 2) @ torch.ones(2, 2)).dtype)).result()
                assert seen == (worker, True, torch.bfloat16) and torch.get_num_threads() == caller
                with pytest.raises(ZeroDivisionError):
                    beside(lambda: 1 / 0).result()
            assert torch.get_num_threads() == threads
        with critic_thread(False) as at_once:
            assert at_once(threading.get_ident).result() == threading.get_ident()
    finally:
        torch.set_num_threads(before)
