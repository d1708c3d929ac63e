"""The shared training parts: SFT's target-only output projection gives the full-logits loss and gradients (padded and
packed batches, with and without LoRA); the fused AdamW that ``build_optimizer`` picks on CPU makes the same update
as the per-tensor loop; the schedule is warm-up then cosine; gradient clipping reports the norm before clipping;
the PPO-ptx LM term is coef × the mean token loss, read from batches that are a pure function of the update; the
loop refuses a data set smaller than one global batch."""

from __future__ import annotations

import copy

import pytest
import torch

import math

from moss_rlhf import distributed
from moss_rlhf.config import ConfigError, TrainConfig
from moss_rlhf.data.collate import conversation_data
from moss_rlhf.data.formats import load_conversations
from moss_rlhf.models import LoraOptions, apply_lora, load_causal_lm
from moss_rlhf.tokenizer import load_tokenizer
from moss_rlhf.training import (Trainee, build_optimizer, build_schedule, causal_loss, clip_gradients, lm_backward,
                                lm_batches, plain_output_head, target_loss)


@pytest.mark.parametrize("pack,lora_r", [(False, 0), (True, 0), (False, 4)])
def test_target_only_projection_matches_full_logits(tiny_model_dir, tokenizer_dir, conversations_file, pack,
                                                     lora_r):
    tokenizer = load_tokenizer(str(tokenizer_dir))
    full = apply_lora(load_causal_lm(str(tiny_model_dir)), LoraOptions(lora_r, 16))
    fast = copy.deepcopy(full)
    assert plain_output_head(fast) is not None  # else target_loss would silently take the full path
    conversations = load_conversations(str(conversations_file))[:40]
    data = conversation_data(tokenizer, conversations, max_len=64, pack=pack, seq_len=96)
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
    assert plain_output_head(model) is None


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


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    cfg = TrainConfig(lr=2.0, warmup_steps=4, max_steps=14, min_lr_ratio=0.1)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    schedule = build_schedule(optimizer, cfg)
    seen = []
    for _ in range(cfg.max_steps + 2):
        seen.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()

    def reference(step: int) -> float:
        if step < 4:
            return 2.0 * (step + 1) / 4
        progress = min(1.0, (step - 4) / 10)
        return 2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    assert seen == pytest.approx([reference(s) for s in range(len(seen))])
    assert seen[3] == pytest.approx(2.0) and seen[14] == seen[15] == pytest.approx(0.2)


def test_clipping_reports_the_norm_before_clipping_and_trainee_steps():
    model = torch.nn.Linear(3, 1, bias=False)
    model.weight.grad = torch.tensor([[3.0, 0.0, 4.0]])
    assert clip_gradients(model, 0.0) == pytest.approx(5.0)  # 0: measure only
    assert model.weight.grad.norm().item() == pytest.approx(5.0)
    assert clip_gradients(model, 1.0) == pytest.approx(5.0)
    assert model.weight.grad.norm().item() == pytest.approx(1.0, rel=1e-4)
    trainee = Trainee.create(model, TrainConfig(lr=0.1, weight_decay=0.0, warmup_steps=0), distributed.init("cpu"),
                             max_grad_norm=1.0)
    before = model.weight.detach().clone()
    model.weight.grad = torch.tensor([[30.0, 0.0, 40.0]])
    assert trainee.step() == pytest.approx(50.0)
    assert model.weight.grad is None and not torch.equal(model.weight, before)


def test_ptx_term_is_coef_times_the_mean_token_loss(tiny_model_dir, conversations_file):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_causal_lm(str(tiny_model_dir))
    dist = distributed.init("cpu")
    batches = lm_batches(tokenizer, [str(conversations_file)], 64, 4, dist, seed=3)
    assert all(torch.equal(batches(7)[k], batches(7)[k]) for k in batches(7))  # a pure function of the update
    assert not torch.equal(batches(7)["input_ids"], batches(8)["input_ids"])
    batch = batches(0)
    trainee = Trainee.create(model, TrainConfig(), dist)
    loss = lm_backward(trainee, batch, coef=0.5, world_size=1)
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    reference = copy.deepcopy(batch)
    n = reference.pop("n_targets")
    expected = causal_loss(model, reference) / n
    (0.5 * expected).backward()
    assert loss == pytest.approx(expected.item(), rel=1e-5)
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-7)


def test_a_data_set_smaller_than_one_global_batch_is_a_clear_error(tmp_path, tiny_model_dir, conversations_file):
    from moss_rlhf.runs import RunDir
    from moss_rlhf.training import train_lm

    tokenizer = load_tokenizer(str(tiny_model_dir))
    data = conversation_data(tokenizer, load_conversations(str(conversations_file))[:5], max_len=64)
    cfg = TrainConfig(out=str(tmp_path / "run"), batch_size=4, grad_accum=2, progress=False)
    with pytest.raises(ConfigError, match="5 training examples are fewer than one global batch"):
        train_lm(cfg, load_causal_lm(str(tiny_model_dir)), tokenizer, data, target_loss,
                 RunDir(cfg.out, cfg), distributed.init("cpu"))


def test_activation_checkpointing_recomputes_the_same_gradients(tmp_path, tiny_model_dir, conversations_file,
                                                                 monkeypatch):
    """--activation-checkpointing trades memory for a second forward in backward: the same losses and weights."""
    import transformers.modeling_utils
    from safetensors.torch import load_file

    calls, checkpoint = [], transformers.modeling_utils.checkpoint
    monkeypatch.setattr(transformers.modeling_utils, "checkpoint",
                        lambda *args, **kwargs: calls.append(1) or checkpoint(*args, **kwargs))

    from moss_rlhf.runs import read_metrics
    from moss_rlhf.stages import sft
    from moss_rlhf.stages.sft import SFTConfig

    runs = {}
    for checkpointing in (False, True):
        out = tmp_path / str(checkpointing)
        sft.run(SFTConfig(out=str(out), model=str(tiny_model_dir), data=[str(conversations_file)], max_steps=3,
                          batch_size=4, seq_len=64, max_len=64, lr=3e-3, warmup_steps=1, log_every=1, eval_every=0,
                          save_every=0, progress=False, device="cpu", activation_checkpointing=checkpointing))
        runs[checkpointing] = ([r["train/loss"] for r in read_metrics(out)],
                               load_file(out / "model" / "model.safetensors"))
        assert bool(calls) == checkpointing  # each block's forward went through torch.utils.checkpoint
    assert runs[True][0] == pytest.approx(runs[False][0], abs=1e-6)
    for key, value in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][key], value, rtol=1e-5, atol=1e-6, msg=key)
