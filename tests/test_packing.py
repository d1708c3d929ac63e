"""Padding-free forwards: packed rows keep each sequence whole, with positions restarting at 0; log-probs,
entropies, values and sequence scores from packed rows equal those of the padded forward (left-padded prompts,
right-padded replies of different lengths), gradients included, with the logits whole or block by block; the row
cap bounds the width."""

from __future__ import annotations

import pytest
import torch

from moss_rlhf import losses
from moss_rlhf.models import load_causal_lm, load_scorer, position_ids_of, sequence_scores
from moss_rlhf.packing import pack_sequences, packed_logprobs, packed_sequence_scores, packed_values
from moss_rlhf.rollout import critic_values, response_logprobs
from moss_rlhf.sampling import SamplingConfig, encode_prompts
from moss_rlhf.sampling.builtin import BuiltinSampler
from moss_rlhf.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def parts(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    policy = load_causal_lm(str(tiny_model_dir)).eval()
    scorer = load_scorer(str(tiny_model_dir), tokenizer).eval()
    torch.nn.init.normal_(scorer.score.weight, std=0.3, generator=torch.Generator().manual_seed(0))
    questions = ["Where did Lin go?", "Bo?", "Where did Mei go with Tom on the long day?", "Hi", "Cat?"]
    sampler = BuiltinSampler(policy, tokenizer, stop_ids=list(range(0, 4000, 9)), pad_id=tokenizer.pad_token_id)
    rollout = sampler.generate(encode_prompts(tokenizer, [[{"role": "user", "content": q}] for q in questions]),
                               SamplingConfig(max_new_tokens=7), seeds=list(range(5)))
    assert (rollout.prompt_mask == 0).any() and rollout.response_mask.sum(1).min() < 7  # padding on both sides
    return tokenizer, policy, scorer, rollout


def test_rows_hold_each_sequence_whole_without_padding(parts):
    _, _, _, rollout = parts
    width = rollout.response_ids.shape[1]
    packed = pack_sequences(rollout.sequences, rollout.attention_mask, width)
    real = [row[keep.bool()].tolist() for row, keep in zip(rollout.sequences, rollout.attention_mask)]
    flat, positions = packed.input_ids.flatten().tolist(), packed.position_ids.flatten().tolist()
    assert packed.n_tokens < rollout.sequences.numel()
    assert sum(map(len, real)) <= packed.n_tokens
    for i, tokens in enumerate(real):
        end = int(packed.last_index[i])
        start = end - len(tokens) + 1
        assert flat[start:end + 1] == tokens and positions[start:end + 1] == list(range(len(tokens)))
    n_responses = int(rollout.response_mask.sum())
    assert len(packed.predict_index) == len(packed.targets) == n_responses
    assert [flat[i + 1] for i in packed.predict_index.tolist()] == packed.targets.tolist()
    assert packed.input_ids.shape[1] == max(map(len, real))  # by default no wider than the longest sequence
    wide = pack_sequences(rollout.sequences, rollout.attention_mask, width, max_row=1000)
    assert wide.input_ids.shape[0] < packed.input_ids.shape[0] and wide.input_ids.shape[1] <= 1000


@pytest.mark.parametrize("logits_at_once", ["all", "blocks"])
def test_packed_forwards_equal_the_padded_ones_gradients_included(parts, monkeypatch, logits_at_once):
    _, policy, scorer, rollout = parts
    calls = []
    if logits_at_once == "blocks":  # the log-probs block by block (losses.linear_logprobs), a few rows at a time
        monkeypatch.setattr(losses, "HEAD_BLOCK_ELEMENTS", 3 * policy.config.vocab_size)
        blockwise = losses.linear_logprobs
        monkeypatch.setattr(losses, "linear_logprobs", lambda *a: calls.append(len(a[0])) or blockwise(*a))
    seq, mask = rollout.sequences, rollout.attention_mask
    width, counted = rollout.response_ids.shape[1], rollout.response_mask.bool()
    packed = pack_sequences(seq, mask, width)
    for temperature in (1.0, 0.7):
        lp, entropy = packed_logprobs(policy, packed, temperature, with_entropy=True, entropy_grad=True)
        ref_lp, ref_entropy = response_logprobs(policy, seq, mask, position_ids_of(mask), width, temperature,
                                                with_entropy=True, entropy_grad=True)
        torch.testing.assert_close(lp[counted], ref_lp[counted], atol=1e-5, rtol=0)
        torch.testing.assert_close(entropy[counted], ref_entropy[counted], atol=1e-5, rtol=0)
        assert (lp[~counted] == 0).all() and (entropy[~counted] == 0).all()
        grads = []
        for value in ((lp + entropy)[counted].sum(), (ref_lp + ref_entropy)[counted].sum()):
            policy.zero_grad()
            value.backward()
            grads.append([p.grad.clone() for p in policy.parameters()])
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert len(calls) == (2 if logits_at_once == "blocks" else 0) and all(n > 3 for n in calls)  # several blocks
    policy.zero_grad()
    with torch.no_grad():
        values = packed_values(scorer, packed)
        torch.testing.assert_close(values[counted], critic_values(scorer, seq, mask, position_ids_of(mask),
                                                                  width)[counted], atol=1e-5, rtol=0)
        torch.testing.assert_close(packed_sequence_scores(scorer, packed), sequence_scores(scorer, seq, mask),
                                   atol=1e-5, rtol=0)
