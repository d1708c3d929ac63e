"""Attention by the packed layout against SDPA under the packed rows' full mask: the same outputs at every real
position and the same gradients in query, key and value (grouped-query heads, shared prompts, lone sequences, an
empty reply, rows' end padding); whole models of every family it is installed on give the padded forward's
log-probs, entropies, gradients, values and scores through it; it is installed only where it is exact."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification,
                          MistralConfig, MistralForCausalLM, MistralForSequenceClassification, Qwen2Config,
                          Qwen2ForCausalLM, Qwen2ForSequenceClassification, Qwen3Config, Qwen3ForCausalLM,
                          Qwen3ForSequenceClassification)

from moss_rlhf import packed_attention
from moss_rlhf.packing import SHARE_ALWAYS, pack_sequences, prompt_sharing
from tests.test_packing import assert_forwards_equal_the_padded_ones


def rollout_like(seed: int = 0, vocab: int = 97):
    """Left-padded prompts and right-padded replies as a sampler lays them out: a group of three replies to one
    prompt (one of them empty), a group of two, and a prompt alone."""
    g = torch.Generator().manual_seed(seed)
    prompts = [4, 4, 4, 6, 6, 3]
    replies = [5, 0, 3, 2, 6, 4]
    prompt_ids = [torch.randint(3, vocab, (n,), generator=g) for n in (4, 6, 3)]
    rows_prompt = [prompt_ids[0]] * 3 + [prompt_ids[1]] * 2 + [prompt_ids[2]]
    width_p, width_r = max(prompts), max(replies)
    sequences = torch.zeros(len(prompts), width_p + width_r, dtype=torch.long)
    mask = torch.zeros_like(sequences)
    for i, (p, n) in enumerate(zip(rows_prompt, replies)):
        sequences[i, width_p - len(p):width_p] = p
        sequences[i, width_p:width_p + n] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, width_p - len(p):width_p + n] = 1
    return types.SimpleNamespace(sequences=sequences, attention_mask=mask, response_ids=sequences[:, width_p:],
                                 response_mask=mask[:, width_p:])


def test_layout_attention_equals_sdpa_under_the_rows_mask_values_and_gradients():
    rollout = rollout_like()
    packed = pack_sequences(rollout.sequences, rollout.attention_mask, rollout.response_ids.shape[1],
                            share_prompts=SHARE_ALWAYS)
    assert packed.attention_mask is not None  # prompts were shared: the rows' mask is the reference
    layout = packed.layout
    assert layout.branch_query is not None and len(layout.branch_query) == 4  # five replies, one of them empty
    rows, width = packed.input_ids.shape
    heads, kv_heads, dim = 4, 2, 8
    g = torch.Generator().manual_seed(3)
    q = torch.randn(rows, heads, width, dim, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(rows, kv_heads, width, dim, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(rows, kv_heads, width, dim, generator=g, dtype=torch.float64, requires_grad=True)
    real = torch.zeros(rows * width, dtype=torch.bool)
    real[layout.destination] = True
    # every real position once: the first group's prompt once instead of three times, the second's once of two
    assert int(real.sum()) == int(rollout.attention_mask.sum()) - 2 * 4 - 6
    weights = torch.randn(rows * width, heads, dim, generator=g, dtype=torch.float64)

    def reference():
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                             attn_mask=packed.attention_mask, scale=0.3)
        return out.transpose(1, 2).reshape(rows * width, heads, dim)

    def ours():
        out, _ = packed_attention.packed_attention(None, q, k, v, None, scaling=0.3, packed_layout=layout)
        assert out.shape == (rows, width, heads, dim)
        return out.reshape(rows * width, heads, dim)

    results = []
    for fn in (ours, reference):
        out = fn()
        (out[real] * weights[real]).sum().backward()
        results.append((out[real].detach(), q.grad.clone(), k.grad.clone(), v.grad.clone()))
        q.grad = k.grad = v.grad = None
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert (ours()[~real] == 0).all()  # rows' end padding attends to nothing


SHAPE = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=96, max_position_embeddings=128, pad_token_id=0)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, Qwen3ForSequenceClassification, {"head_dim": 16}),
    "mistral": (MistralConfig, MistralForCausalLM, MistralForSequenceClassification, {"sliding_window": None}),
}


def build(kind: str, scorer: bool = False, **overrides):
    config_class, lm_class, scorer_class, extra = FAMILIES[kind]
    torch.manual_seed(0)
    config = config_class(**{**SHAPE, **extra, "num_labels": 1, "attn_implementation": "sdpa", **overrides})
    model = (scorer_class if scorer else lm_class)(config)
    for p in model.parameters():  # spread a random init's tiny weights, so that attention matters
        torch.nn.init.normal_(p, std=0.3)
    return model.eval()


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_models_attending_by_the_layout_give_the_padded_forwards(kind, monkeypatch):
    policy, scorer = build(kind), build(kind, scorer=True)
    assert packed_attention.install(policy) and packed_attention.install(scorer)
    assert prompt_sharing([policy, scorer]) == SHARE_ALWAYS
    calls = []  # the layout's attention runs (two SDPA calls a layer: trunks and replies)
    counting = types.SimpleNamespace(scaled_dot_product_attention=lambda *a, **k: calls.append(1) or
                                     F.scaled_dot_product_attention(*a, **k))
    monkeypatch.setattr(packed_attention, "F", counting)
    rollout = rollout_like()
    packed = pack_sequences(rollout.sequences, rollout.attention_mask, rollout.response_ids.shape[1],
                            share_prompts=prompt_sharing([policy, scorer]))
    # the padded reference forwards run transformers' own SDPA function: only the packed ones are counted
    assert_forwards_equal_the_padded_ones(policy, scorer, rollout, packed, temperatures=(0.7,))
    assert len(calls) == 3 * 2 * 2  # three packed forwards (log-probs, values, scores) × 2 layers × 2 calls
    monkeypatch.setattr(packed_attention, "F", F)
    seq, mask = rollout.sequences, rollout.attention_mask
    with torch.no_grad():
        # without a layout the installed model is transformers' SDPA model (sampling's prompt pass, evaluation)
        reference = build(kind)
        torch.testing.assert_close(policy(seq, attention_mask=mask).logits, reference(seq, attention_mask=mask).logits,
                                   atol=1e-6, rtol=0)


def test_installed_only_where_exact():
    assert not packed_attention.install(build("llama", attn_implementation="eager"))
    assert not packed_attention.install(build("mistral", sliding_window=16))  # a window the layout would ignore
    assert not packed_attention.install(build("qwen2", use_sliding_window=True, sliding_window=16,
                                              layer_types=["sliding_attention"] * 2))
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=1, n_head=2, attn_implementation="sdpa"))
    assert not packed_attention.install(gpt2)
    model = build("qwen3")
    assert packed_attention.install(model) and packed_attention.installed(model)
    assert packed_attention.install(model)  # twice: still once


@pytest.mark.parametrize("lora_r", [0, 4])
def test_the_rl_stage_models_attend_by_the_layout(tiny_model_dir, tmp_path, lora_r):
    """The models RL loads (policy — under LoRA too —, reference, critic) attend by the layout, so every forward over
    a rollout shares its groups' prompts; a saved policy does not name the implementation and loads as SDPA."""
    from moss_rlhf.models import LoraOptions, load_causal_lm, save_model
    from moss_rlhf.rollout import load_rl_models
    from moss_rlhf.tokenizer import load_tokenizer

    path, tokenizer = str(tiny_model_dir), load_tokenizer(str(tiny_model_dir))
    models = load_rl_models(path, path, None, path, tokenizer, LoraOptions(r=lora_r), torch.device("cpu"))
    assert all(packed_attention.installed(m) for m in models.all()) and len(models.all()) == 3 - bool(lora_r)
    assert prompt_sharing(models.all()) == SHARE_ALWAYS
    save_model(models.policy, tokenizer, tmp_path / "policy")
    assert packed_attention.NAME not in (tmp_path / "policy" / "config.json").read_text()
    assert load_causal_lm(str(tmp_path / "policy")).config._attn_implementation == "sdpa"
