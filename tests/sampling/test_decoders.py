"""The Llama-family decoder against the generic transformers forward it replaces: the same logits at every step
(teacher-forced through the same tokens, with left padding), for each architecture it claims, under LoRA, with
grouped-query attention, and for groups of equal prompts that share one prompt pass; the same greedy replies; the
step compiled (--compile) too; the generic decoder wherever it cannot reproduce the model."""

from __future__ import annotations

import pytest
import torch
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from moss_rlhf.models import position_ids_of
from moss_rlhf.sampling import SamplingConfig
from moss_rlhf.sampling.builtin import BuiltinSampler
from moss_rlhf.sampling.decoders import GenericDecoder, LlamaFamilyDecoder, decoder_for

SHAPE = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
             max_position_embeddings=128)


def build(kind: str, **overrides):
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**{**SHAPE, "num_key_value_heads": 4, **overrides}))
    elif kind == "llama-gqa-tied":
        model = LlamaForCausalLM(LlamaConfig(**{**SHAPE, "num_key_value_heads": 2, "tie_word_embeddings": True,
                                                **overrides}))
    elif kind == "qwen2":  # biases on q, k and v
        model = Qwen2ForCausalLM(Qwen2Config(**{**SHAPE, "num_key_value_heads": 2, **overrides}))
    elif kind == "qwen3":  # per-head norms on q and k
        model = Qwen3ForCausalLM(Qwen3Config(**{**SHAPE, "num_key_value_heads": 2, "head_dim": 16, **overrides}))
    else:
        model = MistralForCausalLM(MistralConfig(**{**SHAPE, "num_key_value_heads": 2, "sliding_window": None,
                                                    **overrides}))
    for p in model.parameters():  # a random init's tiny weights make every logit alike; spread them out
        torch.nn.init.normal_(p, std=0.3)
    return model.eval()


def teacher_forced_logits(decoder, prompts: torch.Tensor, mask: torch.Tensor, forced: torch.Tensor) -> list:
    positions = position_ids_of(mask)
    with torch.no_grad():
        out = [decoder.start(prompts, mask, positions, forced.shape[1])]
        next_position = positions[:, -1:] + 1
        for t in range(forced.shape[1] - 1):
            out.append(decoder.step(forced[:, t], next_position))
            next_position = next_position + 1
    return out


def left_padded(batch: int = 5, width: int = 9, vocab: int = 97) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (batch, width), generator=g)
    mask = torch.ones(batch, width, dtype=torch.long)
    for row in range(batch):
        mask[row, :row] = 0  # row r has r positions of padding
        ids[row, :row] = 0
    return ids, mask


@pytest.mark.parametrize("kind", ["llama", "llama-gqa-tied", "qwen2", "qwen3", "mistral"])
def test_every_step_matches_the_generic_forward(kind):
    model = build(kind)
    assert isinstance(decoder_for(model, 64), LlamaFamilyDecoder)
    prompts, mask = left_padded()
    steps = 12
    forced = torch.randint(3, 97, (prompts.shape[0], steps), generator=torch.Generator().manual_seed(2))
    lean = teacher_forced_logits(LlamaFamilyDecoder(model), prompts, mask, forced)
    generic = teacher_forced_logits(GenericDecoder(model), prompts, mask, forced)
    assert len(lean) == steps
    for t, (a, b) in enumerate(zip(lean, generic)):
        assert a.dtype == torch.float32 and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"step {t}")


@pytest.mark.parametrize("kind", ["llama-gqa-tied", "qwen3"])
def test_bfloat16_steps_match_the_generic_forward(kind):
    """The sampler's bf16 copy of an fp32 policy (RL's bf16 rollouts): the norms are the modules' own and the
    softmax runs in float32, so the steps stay within bf16 rounding of the generic forward's."""
    model = build(kind).to(torch.bfloat16)
    prompts, mask = left_padded()
    forced = torch.randint(3, 97, (prompts.shape[0], 6), generator=torch.Generator().manual_seed(2))
    lean = teacher_forced_logits(LlamaFamilyDecoder(model), prompts, mask, forced)
    generic = teacher_forced_logits(GenericDecoder(model), prompts, mask, forced)
    for t, (a, b) in enumerate(zip(lean, generic)):
        assert a.dtype == torch.float32
        scale = b.abs().max()
        assert (a - b).abs().max() <= 0.05 * scale, f"step {t}: {(a - b).abs().max()} against {scale}"


def test_a_group_of_equal_prompts_shares_one_prompt_pass():
    """Rows A A A B C C (groups of replies, as RL samples them): one prompt pass of three rows, then every row's
    steps — each its own tokens — as the generic decoder computes them for all six rows."""
    model = build("llama-gqa-tied")
    ids, mask = left_padded(batch=3)
    rows = torch.tensor([0, 0, 0, 1, 2, 2])
    prompts, prompt_mask = ids[rows], mask[rows]
    forced = torch.randint(3, 97, (6, 6), generator=torch.Generator().manual_seed(3))
    batches = []
    hook = model.register_forward_pre_hook(lambda _, args, kwargs: batches.append(kwargs["input_ids"].shape),
                                           with_kwargs=True)
    lean = teacher_forced_logits(LlamaFamilyDecoder(model), prompts, prompt_mask, forced)
    hook.remove()
    assert batches == [torch.Size([3, ids.shape[1]])]  # the prompt pass; the steps run the layers themselves
    generic = teacher_forced_logits(GenericDecoder(model), prompts, prompt_mask, forced)
    for t, (a, b) in enumerate(zip(lean, generic)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"step {t}")


def test_lora_layers_act_in_the_lean_decoder():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj",
                                                                                        "down_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # LoRA starts as the identity; make it change the model
            torch.nn.init.normal_(p, std=0.5)
    model.eval()
    assert isinstance(decoder_for(model, 64), LlamaFamilyDecoder)
    prompts, mask = left_padded()
    forced = torch.randint(3, 97, (prompts.shape[0], 6), generator=torch.Generator().manual_seed(3))
    lean = teacher_forced_logits(LlamaFamilyDecoder(model), prompts, mask, forced)
    generic = teacher_forced_logits(GenericDecoder(model), prompts, mask, forced)
    with model.disable_adapter():
        plain = teacher_forced_logits(GenericDecoder(model), prompts, mask, forced)
    assert (lean[-1] - plain[-1]).abs().max() > 1e-2  # the adapters do change the logits
    for a, b in zip(lean, generic):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_greedy_replies_are_the_generic_decoders(monkeypatch):
    model = build("llama")
    prompts, mask = left_padded()
    prompt_lists = [row[m.bool()].tolist() for row, m in zip(prompts, mask)]
    sampler = BuiltinSampler(model, stop_ids=[5, 6, 7], pad_id=0)
    lean = sampler.generate(prompt_lists, SamplingConfig(max_new_tokens=20, temperature=0))
    monkeypatch.setattr("moss_rlhf.sampling.decoders.decoder_for",
                        lambda model, longest, compiled=False: GenericDecoder(model))
    generic = sampler.generate(prompt_lists, SamplingConfig(max_new_tokens=20, temperature=0))
    assert torch.equal(lean.response_ids, generic.response_ids)
    assert torch.equal(lean.finished, generic.finished)
    torch.testing.assert_close(lean.logprobs, generic.logprobs, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_the_compiled_step_matches_the_generic_forward_and_compiles_once():
    """--compile: the step through torch.compile attends over the whole buffer with the positions not generated yet
    masked (static shapes); its logits are the generic forward's, and a second generation of another batch size and
    prompt width reuses the compiled step (dynamic shapes, the position a tensor)."""
    from torch._dynamo.utils import counters

    model = build("qwen3")  # grouped-query attention and per-head norms
    graphs = []
    for batch, width in ((5, 9), (3, 6)):
        prompts, mask = left_padded(batch, width)
        forced = torch.randint(3, 97, (batch, 8), generator=torch.Generator().manual_seed(2))
        before = counters["stats"]["unique_graphs"]
        compiled = teacher_forced_logits(LlamaFamilyDecoder(model, compiled=True), prompts, mask, forced)
        graphs.append(counters["stats"]["unique_graphs"] - before)
        generic = teacher_forced_logits(GenericDecoder(model), prompts, mask, forced)
        for t, (a, b) in enumerate(zip(compiled, generic)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"step {t}")
    assert graphs[0] >= 1 and graphs[1] == 0


def test_models_it_cannot_reproduce_get_the_generic_decoder():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    assert type(decoder_for(gpt2, 32)) is GenericDecoder
    windowed = build("mistral", sliding_window=16)
    assert type(decoder_for(windowed, 32)) is GenericDecoder  # its window would cut the reply's attention
    assert isinstance(decoder_for(windowed, 16), LlamaFamilyDecoder)  # a reply inside the window attends to all
