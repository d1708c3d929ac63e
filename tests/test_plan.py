"""``moss-rlhf plan``: parameter counts from config.json alone (the meta device), and memory per process that
halves under FSDP on two processes — against the models' own counts and the memory the loops measure."""

from __future__ import annotations

import pytest
import torch

from moss_rlhf.config import ConfigError
from moss_rlhf.plan import PlanConfig, parameter_counts, plan


def test_parameter_counts_come_from_the_config_alone(tiny_model_dir):
    from moss_rlhf.models import load_causal_lm

    model = load_causal_lm(str(tiny_model_dir))
    n, block, trained = parameter_counts(str(tiny_model_dir))
    assert n == trained == sum(p.numel() for p in model.parameters())
    assert block == sum(p.numel() for p in model.model.layers[0].parameters())
    assert parameter_counts("tiny", vocab_size=4000)[0] > n  # a preset, with its own vocabulary


def test_lora_trains_only_the_adapters(tiny_model_dir):
    """The adapters counted as the stages add them (every linear layer): r × (fan-in + fan-out) each; the base
    frozen, so a LoRA model's gradients and AdamW state are the adapters' alone."""
    from moss_rlhf.models import load_causal_lm

    model = load_causal_lm(str(tiny_model_dir))
    linears = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in name]
    adapters = sum(4 * (m.in_features + m.out_features) for m in linears)
    n, _, trained = parameter_counts(str(tiny_model_dir), lora_r=4)
    assert (n, trained) == (sum(p.numel() for p in model.parameters()) + adapters, adapters)
    (policy,), _ = plan(PlanConfig(model=str(tiny_model_dir), lora_r=4))
    assert (policy.weights, policy.gradients, policy.optimizer) == (4 * n, 4 * adapters, 8 * adapters)


def test_fsdp_shares_every_model_over_the_processes(tiny_model_dir):
    path = str(tiny_model_dir)
    whole, _ = plan(PlanConfig(model=path, critic=path, reference=path, reward_model=path, processes=2))
    halves, transient = plan(PlanConfig(model=path, critic=path, reference=path, reward_model=path, processes=2,
                                        parallel="fsdp", rl=True))
    n = whole[0].parameters
    policy = whole[0]
    assert (policy.weights, policy.gradients, policy.optimizer) == (4 * n, 4 * n, 8 * n)  # fp32 + AdamW's moments
    reference = next(r for r in whole if r.role == "reference")
    assert (reference.gradients, reference.optimizer) == (0, 0)  # frozen: weights only
    for a, b in zip(whole, halves, strict=True):
        assert (b.weights, b.gradients, b.optimizer) == (a.weights / 2, a.gradients / 2, a.optimizer / 2)
    assert transient > 4 * n  # the sampler's whole copy of the policy, and the gathered blocks
    offloaded, _ = plan(PlanConfig(model=path, processes=2, parallel="fsdp", cpu_offload=True))
    assert offloaded[0].weights == 0 and offloaded[0].host == 16 * n / 2
    (one_device,), transient = plan(PlanConfig(model=path, parallel="fsdp", cpu_offload=True))  # FSDP on one GPU
    assert one_device.weights == 0 and one_device.host == 16 * n and transient > 0  # a block at a time on the GPU


def test_plan_options_are_checked(capsys, tiny_model_dir):
    from moss_rlhf.cli import main

    with pytest.raises(ConfigError, match="--cpu-offload needs"):
        PlanConfig(model="tiny", cpu_offload=True)
    assert main(["plan", "--model", "/nonexistent/model"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["plan", "--model", str(tiny_model_dir), "--processes", "8", "--parallel", "fsdp"]) == 0
    out = capsys.readouterr().out
    assert "fsdp over 8 process(es)" in out and "model" in out and "AdamW" in out
