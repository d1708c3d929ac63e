"""Sampling with a KV cache: greedy decoding equals the no-cache argmax continuation, left padding does not change
a prompt's continuation, rows stop at the end token, and filters behave."""

from __future__ import annotations

import torch

from moss_rlhf.data.collate import left_pad
from moss_rlhf.generation import SamplingConfig, filter_logits, generate, stop_token_ids
from moss_rlhf.models import load_causal_lm
from moss_rlhf.tokenizer import load_tokenizer


def _naive_greedy(model, ids: list[int], n: int) -> list[int]:
    out = list(ids)
    for _ in range(n):
        logits = model(input_ids=torch.tensor([out])).logits[0, -1]
        out.append(int(logits.argmax()))
    return out[len(ids):]


def test_cached_greedy_matches_full_recompute_with_left_padding(tiny_model_dir):
    model = load_causal_lm(str(tiny_model_dir)).eval()
    tokenizer = load_tokenizer(str(tiny_model_dir))
    prompts = [tokenizer("Lin went to the park", add_special_tokens=False)["input_ids"],
               tokenizer("Bo", add_special_tokens=False)["input_ids"]]
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    cfg = SamplingConfig(max_new_tokens=8, temperature=0)
    rollout = generate(model, ids, mask, cfg, stop_ids=[], pad_id=tokenizer.pad_token_id)
    for row, prompt in enumerate(prompts):
        assert rollout.response_ids[row].tolist() == _naive_greedy(model, prompt, 8)
    assert rollout.response_mask.sum().item() == 16


def test_rows_stop_at_the_stop_token_and_pad_after(tiny_model_dir):
    model = load_causal_lm(str(tiny_model_dir)).eval()
    tokenizer = load_tokenizer(str(tiny_model_dir))
    ids, mask = left_pad([tokenizer("Lin", add_special_tokens=False)["input_ids"]] * 4, tokenizer.pad_token_id)
    first = generate(model, ids, mask, SamplingConfig(max_new_tokens=6, temperature=0), [], tokenizer.pad_token_id)
    stop = int(first.response_ids[0, 2])  # pretend the third greedy token is the end token
    rollout = generate(model, ids, mask, SamplingConfig(max_new_tokens=6, temperature=0), [stop],
                       tokenizer.pad_token_id)
    assert rollout.finished.all()
    first_stop = rollout.response_ids[0].tolist().index(stop)
    assert rollout.response_mask[0].tolist() == [1] * (first_stop + 1) + [0] * (rollout.response_ids.shape[1] - first_stop - 1)
    assert stop_token_ids(tokenizer) == [tokenizer.eos_token_id]


def test_sampling_is_reproducible_with_a_generator(tiny_model_dir):
    model = load_causal_lm(str(tiny_model_dir)).eval()
    tokenizer = load_tokenizer(str(tiny_model_dir))
    ids, mask = left_pad([[5, 6, 7]] * 3, tokenizer.pad_token_id)
    cfg = SamplingConfig(max_new_tokens=6, temperature=1.0, top_p=0.9, top_k=50)
    a = generate(model, ids, mask, cfg, [], tokenizer.pad_token_id, torch.Generator().manual_seed(1))
    b = generate(model, ids, mask, cfg, [], tokenizer.pad_token_id, torch.Generator().manual_seed(1))
    assert torch.equal(a.response_ids, b.response_ids)


def test_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    top2 = filter_logits(logits, SamplingConfig(top_k=2))
    assert torch.isinf(top2[0, 2:]).all() and torch.isfinite(top2[0, :2]).all()
    probs = logits.softmax(-1)[0]  # ≈ [0.64, 0.24, 0.09, 0.03]
    nucleus = filter_logits(logits, SamplingConfig(top_p=0.8))
    assert torch.isfinite(nucleus[0, :2]).all() and torch.isinf(nucleus[0, 2:]).all() and probs[0] < 0.8
    penalised = filter_logits(logits, SamplingConfig(repetition_penalty=2.0), seen=torch.tensor([[0]]))
    assert penalised[0, 0] == 1.5 and penalised[0, 1] == 2.0
