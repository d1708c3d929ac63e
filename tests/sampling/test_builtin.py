"""The built-in sampler: greedy decoding equals the no-cache argmax continuation and left padding does not change a
prompt's continuation; rows stop at a stop token; a reply depends only on its prompt and its seed (not on the batch
around it); the recorded log-probs are those of the distribution sampled from (temperature included); the
repetition penalty never counts padding, even where padding shares its id with the end token; NaN logits raise;
the draw is the first token whose cumulative probability exceeds the row's uniform times the total, with the sampled
distribution's frequencies, and a token of probability 0 is never drawn, even at the ends of [0, 1)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from moss_rlhf.config import NonFiniteError
from moss_rlhf.models import load_causal_lm
from moss_rlhf.rollout import response_logprobs
from moss_rlhf.sampling import SamplingConfig, prompt_seeds
from moss_rlhf.sampling.builtin import BuiltinSampler, filter_logits, invert_cdf
from moss_rlhf.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_causal_lm(str(tiny_model_dir)).eval(), load_tokenizer(str(tiny_model_dir))


def _naive_greedy(model, ids: list[int], n: int) -> list[int]:
    out = list(ids)
    for _ in range(n):
        logits = model(input_ids=torch.tensor([out])).logits[0, -1]
        out.append(int(logits.argmax()))
    return out[len(ids):]


def test_cached_greedy_matches_full_recompute_with_left_padding(tiny):
    model, tokenizer = tiny
    prompts = [tokenizer("Lin went to the park", add_special_tokens=False)["input_ids"],
               tokenizer("Bo", add_special_tokens=False)["input_ids"]]
    sampler = BuiltinSampler(model, stop_ids=[], pad_id=tokenizer.pad_token_id)
    rollout = sampler.generate(prompts, SamplingConfig(max_new_tokens=8, temperature=0))
    assert rollout.prompt_mask[1].tolist().count(0) > 0  # the short prompt is left-padded
    for row, prompt in enumerate(prompts):
        assert rollout.response_ids[row].tolist() == _naive_greedy(model, prompt, 8)
    assert rollout.response_mask.sum().item() == 16


def test_rows_stop_at_the_stop_token_and_pad_after(tiny):
    model, tokenizer = tiny
    prompts = [tokenizer("Lin", add_special_tokens=False)["input_ids"]] * 4
    greedy = SamplingConfig(max_new_tokens=6, temperature=0)
    first = BuiltinSampler(model, stop_ids=[], pad_id=tokenizer.pad_token_id).generate(prompts, greedy)
    stop = int(first.response_ids[0, 2])  # pretend the third greedy token is the end token
    rollout = BuiltinSampler(model, stop_ids=[stop], pad_id=tokenizer.pad_token_id).generate(prompts, greedy)
    assert rollout.finished.all()
    first_stop = rollout.response_ids[0].tolist().index(stop)
    width = rollout.response_ids.shape[1]
    assert rollout.response_mask[0].tolist() == [1] * (first_stop + 1) + [0] * (width - first_stop - 1)
    assert (rollout.response_ids[0, first_stop + 1:] == tokenizer.pad_token_id).all()
    assert (rollout.logprobs[0, first_stop + 1:] == 0).all()


def test_a_reply_depends_on_its_prompt_and_seed_only(tiny):
    """Per-prompt seeds: the same prompt and seed give the same reply alone or in a batch of other, longer prompts
    (hence with left padding), so resumed and multi-process runs sample what a single run does."""
    model, tokenizer = tiny
    sampler = BuiltinSampler(model, tokenizer)
    cfg = SamplingConfig(max_new_tokens=10, temperature=1.0)
    target = tokenizer("Mei saw", add_special_tokens=False)["input_ids"]
    others = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("Tom went to the market with", "Sara")]
    alone = sampler.generate([target], cfg, seeds=[1234])
    crowd = sampler.generate([others[0], target, others[1]], cfg, seeds=[7, 1234, 9])
    n = int(alone.response_mask.sum())
    assert crowd.response_ids[1, :n].tolist() == alone.response_ids[0, :n].tolist()
    assert int(crowd.response_mask[1].sum()) == n
    different = sampler.generate([target] * 4, cfg, seeds=prompt_seeds(0, range(4)))
    assert len({tuple(r) for r in different.response_ids.tolist()}) > 1  # distinct seeds, distinct draws


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_recorded_logprobs_are_the_sampling_distributions(tiny, temperature):
    """log softmax(logits / T) of each sampled token, as a full forward at the same temperature scores it."""
    model, tokenizer = tiny
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("Lin went", "Bo said thank you", "猫")]
    rollout = BuiltinSampler(model, tokenizer).generate(prompts, SamplingConfig(12, temperature), seeds=[1, 2, 3])
    full, _ = response_logprobs(model, rollout.sequences, rollout.attention_mask, rollout.position_ids,
                                rollout.response_ids.shape[1], temperature)
    mask = rollout.response_mask.bool()
    torch.testing.assert_close(rollout.logprobs[mask], full.detach()[mask], atol=2e-5, rtol=0)
    if temperature != 1.0:  # and they are not the temperature-1 log-probs
        at_one, _ = response_logprobs(model, rollout.sequences, rollout.attention_mask, rollout.position_ids,
                                      rollout.response_ids.shape[1], 1.0)
        assert (rollout.logprobs[mask] - at_one.detach()[mask]).abs().max() > 1e-2


class EndFavouringModel(torch.nn.Module):
    """Fixed logits at every position: token ``end`` is the most likely (2.0), token ``runner_up`` next (1.9)."""

    def __init__(self, vocab: int, end: int, runner_up: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.logits = torch.zeros(vocab)
        self.logits[end], self.logits[runner_up] = 2.0, 1.9

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False, past_key_values=None):
        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1), past_key_values=None)


def test_repetition_penalty_never_counts_padding():
    """Where padding shares its id with the end token (tokenizers whose pad is their eos), a left-padded prompt
    must not have its end token penalised as if it had been seen."""
    end, runner_up = 3, 5
    sampler = BuiltinSampler(EndFavouringModel(16, end, runner_up), stop_ids=[end], pad_id=end)
    cfg = SamplingConfig(max_new_tokens=4, temperature=0, repetition_penalty=1.3)
    rollout = sampler.generate([[7, 8, 9, 10], [7]], cfg)  # the second prompt is left-padded with 3 pads
    assert rollout.response_ids[:, 0].tolist() == [end, end]
    seen = filter_logits(torch.tensor([[2.0, -1.0, 0.5]]), cfg, torch.tensor([[True, True, False]]))
    torch.testing.assert_close(seen, torch.tensor([[2.0 / 1.3, -1.3, 0.5]]))
    # a token really generated is penalised: a repeat of the runner-up loses to a fresh token
    again = BuiltinSampler(EndFavouringModel(16, runner_up, 6), stop_ids=[], pad_id=end).generate([[7]], cfg)
    assert again.response_ids[0].tolist()[:2] == [runner_up, 6]


@pytest.mark.parametrize("cfg", [SamplingConfig(4), SamplingConfig(4, temperature=0), SamplingConfig(4, top_k=3),
                                 SamplingConfig(4, top_p=0.5)], ids=["sampled", "greedy", "top-k", "top-p"])
def test_nan_logits_raise(cfg):
    model = EndFavouringModel(8, 1, 2)
    model.logits[4] = float("nan")  # one NaN among the vocabulary, the likeliest tokens finite
    with pytest.raises(NonFiniteError, match="NaN"):
        BuiltinSampler(model, stop_ids=[1], pad_id=0).generate([[5, 6]], cfg)


@pytest.mark.parametrize("vocab", [2048, 197, 7])
def test_a_draw_is_where_the_cumulative_probability_crosses_the_uniform(vocab):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(16, vocab, generator=g) * 3
    logits[2:, 1::3] = float("-inf")  # filtered tokens (top-k, top-p): probability 0
    logits[0, :-1] = float("-inf")  # all the mass on the last token
    logits[1, 1:] = float("-inf")  # ... on the first
    probs = logits.log_softmax(-1).exp()
    reference_cdf = probs.double().cumsum(-1)
    for seed in range(50):
        uniforms = torch.rand(16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        expected = torch.searchsorted(reference_cdf, uniforms[:, None] * reference_cdf[:, -1:], right=True)[:, 0]
        assert torch.equal(invert_cdf(probs, uniforms), expected)
    extremes = torch.tensor([0.0, 1 - 2 ** -53], dtype=torch.float64).repeat(8)  # the ends of [0, 1)
    drawn = invert_cdf(probs, extremes)
    assert (probs.gather(1, drawn[:, None]) > 0).all() and drawn[0] == vocab - 1 and drawn[1] == 0
    # the frequencies of many draws from one row are its probabilities
    row = probs[5:6].expand(20000, -1)
    counts = torch.bincount(invert_cdf(row, torch.rand(20000, generator=g, dtype=torch.float64)), minlength=vocab)
    assert (counts[1::3] == 0).all() and (counts > 0).sum() > 1
    likely = probs[5] > 0.02
    torch.testing.assert_close(counts[likely] / 20000, probs[5][likely], atol=0.012, rtol=0)


def test_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    top2 = filter_logits(logits, SamplingConfig(top_k=2))
    assert torch.isinf(top2[0, 2:]).all() and torch.isfinite(top2[0, :2]).all()
    probs = logits.softmax(-1)[0]  # ≈ [0.64, 0.24, 0.09, 0.03]
    nucleus = filter_logits(logits, SamplingConfig(top_p=0.8))
    assert torch.isfinite(nucleus[0, :2]).all() and torch.isinf(nucleus[0, 2:]).all() and probs[0] < 0.8
    hot = filter_logits(logits, SamplingConfig(temperature=2.0))
    torch.testing.assert_close(hot, logits / 2)


def test_a_bf16_sampler_samples_from_a_bf16_copy_that_follows_the_policy(tiny_model_dir):
    """``dtype=torch.bfloat16`` (RL's rollouts under --precision bf16): the sampler keeps a bf16 copy of the fp32
    policy's weights (its rotary frequencies stay fp32) and samples exactly what the policy cast to bf16 samples;
    after the policy changes, ``sync_weights`` brings the copy along."""
    import copy

    model, tokenizer = load_causal_lm(str(tiny_model_dir)).eval(), load_tokenizer(str(tiny_model_dir))
    prompts = [tokenizer("Lin went to the park", add_special_tokens=False)["input_ids"],
               tokenizer("Bo", add_special_tokens=False)["input_ids"]]
    sampling, seeds = SamplingConfig(max_new_tokens=8, temperature=1.0), [3, 4]

    def cast(m):
        m = copy.deepcopy(m)
        for p in m.parameters():
            p.data = p.data.to(torch.bfloat16)
        return BuiltinSampler(m, stop_ids=[], pad_id=tokenizer.pad_token_id).generate(prompts, sampling, seeds)

    sampler = BuiltinSampler(model, stop_ids=[], pad_id=tokenizer.pad_token_id, dtype=torch.bfloat16)
    assert sampler.model is not model and {p.dtype for p in sampler.model.parameters()} == {torch.bfloat16}
    assert {b.dtype for b in sampler.model.buffers() if b.is_floating_point()} <= {torch.float32}
    before = sampler.generate(prompts, sampling, seeds)
    expected = cast(model)
    assert torch.equal(before.response_ids, expected.response_ids)
    assert torch.equal(before.logprobs, expected.logprobs)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    assert torch.equal(sampler.generate(prompts, sampling, seeds).logprobs, before.logprobs)  # a copy: not synced
    sampler.sync_weights(model)
    after, expected = sampler.generate(prompts, sampling, seeds), cast(model)
    assert torch.equal(after.response_ids, expected.response_ids) and torch.equal(after.logprobs, expected.logprobs)
    assert not torch.equal(after.logprobs, before.logprobs)
    assert next(model.parameters()).dtype == torch.float32  # the policy itself is untouched
