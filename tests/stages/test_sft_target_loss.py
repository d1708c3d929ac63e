"""The speed paths of the LM loops compute what the plain paths compute: SFT's target-only output projection gives
the full-logits loss and gradients (padded and packed batches, with and without LoRA), and the fused AdamW that
``build_optimizer`` picks on CPU makes the same update as the per-tensor loop."""

from __future__ import annotations

import copy

import pytest
import torch

from moss_rlhf.config import TrainConfig
from moss_rlhf.data.formats import load_conversations
from moss_rlhf.models import LoraOptions, apply_lora, load_causal_lm
from moss_rlhf.stages.pretrain import causal_loss
from moss_rlhf.stages.sft import SFTConfig, _plain_output_head, sft_data, target_loss
from moss_rlhf.tokenizer import load_tokenizer
from moss_rlhf.training import build_optimizer


@pytest.mark.parametrize("pack,lora_r", [(False, 0), (True, 0), (False, 4)])
def test_target_only_projection_matches_full_logits(tiny_model_dir, tokenizer_dir, conversations_file, pack,
                                                     lora_r):
    tokenizer = load_tokenizer(str(tokenizer_dir))
    full = apply_lora(load_causal_lm(str(tiny_model_dir)), LoraOptions(lora_r, 16))
    fast = copy.deepcopy(full)
    assert _plain_output_head(fast) is not None  # else target_loss would silently take the full path
    conversations = load_conversations(str(conversations_file))[:40]
    data = sft_data(tokenizer, conversations, SFTConfig(pack=pack, seq_len=96, max_len=64))
    batch = data.batch(list(range(6)))
    n_targets = int(batch.pop("n_targets"))
    assert n_targets < batch["labels"][:, 1:].numel()  # prompts or padding are skipped, so the paths differ

    expected, got = causal_loss(full, batch), target_loss(fast, batch)
    expected.backward()
    got.backward()
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    for (name, p_full), p_fast in zip(full.named_parameters(), fast.parameters()):
        assert (p_full.grad is None) == (p_fast.grad is None), name
        if p_full.grad is not None:
            torch.testing.assert_close(p_fast.grad, p_full.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_models_with_scaled_logits_take_the_full_path(tiny_model_dir):
    model = load_causal_lm(str(tiny_model_dir))
    model.config.logit_scale = 0.5
    assert _plain_output_head(model) is None


def test_cpu_optimizer_is_fused_and_matches_the_loop():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4))
    reference = copy.deepcopy(model)
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1)
    fused = build_optimizer(model, cfg)
    assert fused.defaults["fused"]
    groups = [{"params": [p for p in reference.parameters() if p.ndim >= 2], "weight_decay": 0.1},
              {"params": [p for p in reference.parameters() if p.ndim < 2], "weight_decay": 0.0}]
    loop = torch.optim.AdamW(groups, lr=1e-2, betas=(cfg.beta1, cfg.beta2), eps=1e-8, foreach=False)
    x = torch.randn(64, 16)
    for _ in range(5):
        for net, opt in ((model, fused), (reference, loop)):
            opt.zero_grad()
            net(x).pow(2).mean().backward()
            opt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
