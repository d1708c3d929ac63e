"""Models: importing the package changes no global state of transformers; a load or save silences transformers'
progress bars for its own duration only; dropout can be switched off everywhere it hides; model paths are checked
with one clear line; a saved model is written atomically and loads in plain transformers; compiled blocks
(--compile) give the eager forward and backward."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from moss_rlhf.config import ConfigError
from moss_rlhf.models import (check_model_path, compile_layers, disable_dropout, load_causal_lm, quiet_transformers,
                              save_model)


def test_importing_the_package_leaves_transformers_logging_alone():
    code = ("import transformers.utils.logging as log; import moss_rlhf.models, moss_rlhf.stages.rl, "
            "moss_rlhf.cli; print(log.is_progress_bar_enabled(), log.get_verbosity())")
    before = subprocess.run([sys.executable, "-c", code.replace("import moss_rlhf.models, moss_rlhf.stages.rl, "
                                                                "moss_rlhf.cli; ", "")],
                            capture_output=True, text=True, check=True).stdout
    after = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert after == before and after.startswith("True")


def test_quiet_transformers_restores_the_callers_settings():
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    verbosity = hf_logging.get_verbosity()
    with quiet_transformers(notices=False):
        assert not hf_logging.is_progress_bar_enabled() and hf_logging.get_verbosity() == hf_logging.ERROR
    assert hf_logging.is_progress_bar_enabled() and hf_logging.get_verbosity() == verbosity


def test_disable_dropout_makes_training_mode_deterministic(tiny_model_dir):
    model = load_causal_lm(str(tiny_model_dir), attention_dropout=0.5).train()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)  # dropout is active
    disable_dropout(model)
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    assert model.config.attention_dropout == 0.0


@pytest.mark.slow
def test_compiled_blocks_give_the_eager_loss_and_gradients(tiny_model_dir):
    """--compile compiles each block in place: the same module (its state dict's keys, what saving, LoRA and DDP
    see), the eager loss and gradients, and sequences of another length reuse the compilation (dynamic shapes)."""
    from torch._dynamo.utils import counters

    eager, compiled = load_causal_lm(str(tiny_model_dir)), load_causal_lm(str(tiny_model_dir))
    keys = list(compiled.state_dict())
    compile_layers(compiled)
    assert list(compiled.state_dict()) == keys
    assert all(block._compiled_call_impl is not None for block in compiled.model.layers)
    assert torch._dynamo.config.recompile_limit >= 32  # room for every variant of a run's block (PPO-max: 7)
    graphs = []
    for length in (12, 20):
        ids = torch.randint(3, compiled.config.vocab_size, (3, length), generator=torch.Generator().manual_seed(0))
        losses = []
        before = counters["stats"]["unique_graphs"]
        for model in (eager, compiled):
            model.zero_grad()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            losses.append(loss.detach())
        graphs.append(counters["stats"]["unique_graphs"] - before)
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
        for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert graphs[1] == 0  # (the first length may reuse a graph an earlier test of the process compiled)
    with pytest.raises(ConfigError, match="--compile: Linear keeps no list of transformer blocks"):
        compile_layers(torch.nn.Linear(2, 2))


def test_model_paths_are_checked_with_one_line(tmp_path):
    with pytest.raises(ConfigError, match="--policy: .* does not exist"):
        check_model_path(str(tmp_path / "nope"), "--policy")
    with pytest.raises(ConfigError, match="holds no config.json"):
        check_model_path(str(tmp_path), "--policy")
    check_model_path("org/some-model", "--policy")  # a hub id passes (loaded through the same code)


def test_save_is_atomic_and_loads_in_plain_transformers(tmp_path, tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    model = load_causal_lm(str(tiny_model_dir))
    save_model(model, None, tmp_path / "model")
    first = (tmp_path / "model" / "model.safetensors").read_bytes()
    with torch.no_grad():
        model.lm_head.weight.mul_(2)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", crash)
    with pytest.raises(OSError):
        save_model(model, None, tmp_path / "model")
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == first  # the old model is intact
    assert not list(tmp_path.glob(".model*"))  # and no temporary directory is left behind
    monkeypatch.undo()
    save_model(model, None, tmp_path / "model")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)


def test_sequences_beyond_learned_positions_are_refused_before_training(tmp_path, tiny_model_dir):
    """GPT-2 has a table of 64 learned positions here: a 65-token --max-len would stop the first batch with an
    IndexError, so train_lm refuses it at the start with the figures; a rotary model (Llama) is not held to its
    max_position_embeddings (it reads any length), and a sequence that fits passes."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from moss_rlhf.models import check_positions
    from moss_rlhf.stages.reward import RewardConfig

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=64, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(IndexError):  # what a run met before the check
        gpt2(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ConfigError, match=r"--max-len 65: the model \(gpt2\) has learned positions for 64 tokens"):
        check_positions(gpt2, 65, "--max-len")
    check_positions(gpt2, 64, "--max-len")
    check_positions(load_causal_lm(str(tiny_model_dir)), 4096, "--seq-len")  # rotary: 512 positions, any length
    # train_lm applies it to --max-len where a stage has one (packed examples restart their positions)
    from moss_rlhf import distributed
    from moss_rlhf.runs import RunDir
    from moss_rlhf.training import train_lm

    cfg = RewardConfig(data=["x.jsonl"], out=str(tmp_path / "run"), max_len=65)
    with pytest.raises(ConfigError, match="--max-len 65"):
        train_lm(cfg, gpt2, None, None, None, RunDir(cfg.out, cfg), distributed.init("cpu"))
