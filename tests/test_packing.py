"""Padding-free forwards: packed rows keep each sequence whole, with positions restarting at 0; log-probs,
entropies, values and sequence scores from packed rows equal those of the padded forward (left-padded prompts,
right-padded replies of different lengths), gradients included, with the logits whole or block by block; the row
cap bounds the width. With shared prompts a group's prompt is packed once, each reply sees it and itself only (the
mask against a hand-written one), replies keep their positions, and every forward still equals the padded one
(SDPA's boolean mask and eager attention's additive one); attention that takes no mask is refused by name."""

from __future__ import annotations

import pytest
import torch

from moss_rlhf import losses
from moss_rlhf.models import load_causal_lm, load_scorer, position_ids_of, sequence_scores
from moss_rlhf.packing import (pack_sequences, packed_logprobs, packed_sequence_scores, packed_values,
                                prompt_sharing, prompt_sharing_pays, shared_prompt_mask, takes_attention_masks)
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
    packed = pack_sequences(rollout.sequences, rollout.attention_mask, rollout.response_ids.shape[1])
    assert_forwards_equal_the_padded_ones(policy, scorer, rollout, packed, temperatures=(1.0, 0.7))
    assert len(calls) == (2 if logits_at_once == "blocks" else 0) and all(n > 3 for n in calls)  # several blocks


def assert_forwards_equal_the_padded_ones(policy, scorer, rollout, packed, temperatures):
    """Log-probs and entropies (0 after each reply's end) and their gradients in every parameter, critic values and
    sequence scores from ``packed`` equal those of the padded forward of ``rollout``."""
    seq, mask = rollout.sequences, rollout.attention_mask
    width, counted = rollout.response_ids.shape[1], rollout.response_mask.bool()
    for temperature in temperatures:
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
    policy.zero_grad()
    with torch.no_grad():
        values = packed_values(scorer, packed)
        torch.testing.assert_close(values[counted], critic_values(scorer, seq, mask, position_ids_of(mask),
                                                                  width)[counted], atol=1e-5, rtol=0)
        torch.testing.assert_close(packed_sequence_scores(scorer, packed), sequence_scores(scorer, seq, mask),
                                   atol=1e-5, rtol=0)


def test_the_shared_prompt_mask_lets_each_reply_see_its_prompt_and_itself_only():
    # one row: unit 0 = prompt (2 tokens) + replies of 2 and 1 tokens; unit 1 = a lone sequence of 2; 1 end pad
    unit = torch.tensor([[0, 0, 0, 0, 0, 1, 1, -1]])
    branch = torch.tensor([[0, 0, 1, 1, 2, 0, 0, 0]])
    expected = torch.zeros(8, 8, dtype=torch.bool)
    for query, keys in {0: [0], 1: [0, 1], 2: [0, 1, 2], 3: [0, 1, 2, 3], 4: [0, 1, 4], 5: [5], 6: [5, 6],
                        7: [7]}.items():
        expected[query, keys] = True
    assert torch.equal(shared_prompt_mask(unit, branch)[0, 0], expected)


def test_a_prompt_is_shared_where_that_is_less_work():
    """Sharing saves the prompt copies' linear work (~24·d² FLOPs a position and layer) and costs the unit's larger
    attention square (4·d a query-key pair): the benchmark's short prompts with 32-token replies at d 128 share, a
    long prompt with short replies shares, long reasoning replies to a short prompt do not, nor does a lone reply."""
    assert prompt_sharing_pays(13, [32] * 4, 128)
    assert 6 * 128 * 3 * 13 > (13 + 128) ** 2 - 4 * (13 + 32) ** 2  # the rule, by hand
    assert prompt_sharing_pays(2000, [200] * 8, 896)
    assert not prompt_sharing_pays(200, [2000] * 8, 896)
    assert not prompt_sharing_pays(13, [32], 128) and not prompt_sharing_pays(13, [32] * 4, 0)
    g = torch.Generator().manual_seed(0)
    prompt, replies = torch.randint(5, 99, (1, 4), generator=g), torch.randint(5, 99, (3, 40), generator=g)
    sequences = torch.cat([prompt.repeat(3, 1), replies], 1)
    mask = torch.ones_like(sequences)
    assert pack_sequences(sequences, mask, 40, share_prompts=8).attention_mask is None  # 6·8·2·4 < 124² − 3·44²
    assert pack_sequences(sequences, mask, 40, share_prompts=4096).attention_mask is not None


@pytest.fixture(scope="module")
def grouped(parts):
    """Three prompts with three replies each (a group's rows consecutive, as RL samples them), then a prompt alone."""
    tokenizer, policy, _, _ = parts
    questions = ["Where did Lin go?", "Bo?", "Where did Mei go with Tom on the long day?"]
    prompts = encode_prompts(tokenizer, [[{"role": "user", "content": q}] for q in questions + ["Hi"]])
    rows = [p for p in prompts[:3] for _ in range(3)] + prompts[3:]
    sampler = BuiltinSampler(policy, tokenizer, stop_ids=list(range(0, 4000, 9)), pad_id=tokenizer.pad_token_id)
    rollout = sampler.generate(rows, SamplingConfig(max_new_tokens=7), seeds=list(range(len(rows))))
    lengths = rollout.response_mask.sum(1)
    assert lengths.min() < lengths.max() and (lengths[:9].view(3, 3).min(1).values
                                               < lengths[:9].view(3, 3).max(1).values).any()
    return rollout


def test_shared_prompts_run_once_per_group_and_point_at_every_reply(grouped):
    rollout = grouped
    width = rollout.response_ids.shape[1]
    packed = pack_sequences(rollout.sequences, rollout.attention_mask, width, share_prompts=128)
    alone = pack_sequences(rollout.sequences, rollout.attention_mask, width)
    prompt_lengths = rollout.prompt_mask.sum(1)
    # every group's prompt once: its two other copies are gone (end padding aside)
    real = int(rollout.attention_mask.sum()) - 2 * int(prompt_lengths[:9:3].sum())
    assert real <= packed.n_tokens < alone.n_tokens and packed.input_ids.shape[0] < alone.input_ids.shape[0]
    assert len(packed.predict_index) == len(packed.targets) == int(rollout.response_mask.sum())
    flat, positions = packed.input_ids.flatten(), packed.position_ids.flatten()
    for i in range(len(rollout.sequences)):
        reply = rollout.response_ids[i][rollout.response_mask[i].bool()]
        end = int(packed.last_index[i])
        assert torch.equal(flat[end - len(reply) + 1:end + 1], reply)
        # the reply continues its prompt's positions, as it would alone
        assert positions[end - len(reply) + 1:end + 1].tolist() == list(range(int(prompt_lengths[i]),
                                                                              int(prompt_lengths[i]) + len(reply)))
    # each target is predicted by the prompt's last token (a reply's first) or by the reply's previous token
    for j, (where, predictor) in enumerate(zip(packed.scatter_index.tolist(), flat[packed.predict_index].tolist())):
        i, t = divmod(where, width)
        assert int(packed.targets[j]) == int(rollout.response_ids[i, t])
        prompt = rollout.prompt_ids[i][rollout.prompt_mask[i].bool()]
        assert predictor == int(prompt[-1] if t == 0 else rollout.response_ids[i, t - 1])


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_prompt_forwards_equal_the_padded_ones_gradients_included(parts, grouped, tiny_model_dir, attention):
    _, _, scorer, _ = parts
    policy = load_causal_lm(str(tiny_model_dir), attn_implementation=attention).eval()
    packed = pack_sequences(grouped.sequences, grouped.attention_mask, grouped.response_ids.shape[1],
                            share_prompts=prompt_sharing([policy, scorer]))
    assert packed.attention_mask is not None and packed.input_ids.shape[0] < len(grouped.sequences)
    assert_forwards_equal_the_padded_ones(policy, scorer, grouped, packed, temperatures=(0.7,))


def test_attention_without_masks_is_refused_clearly(parts, grouped):
    _, policy, _, _ = parts
    packed = pack_sequences(grouped.sequences, grouped.attention_mask, grouped.response_ids.shape[1],
                            share_prompts=policy.config.hidden_size)
    policy.config._attn_implementation = "flash_attention_2"
    try:
        assert not takes_attention_masks([policy]) and prompt_sharing([policy]) == 0
        with pytest.raises(ValueError, match="shared prompts need attention that takes a mask"):
            packed_logprobs(policy, packed)
    finally:
        policy.config._attn_implementation = "sdpa"
    assert takes_attention_masks([policy]) and prompt_sharing([policy]) == policy.config.hidden_size == 128
