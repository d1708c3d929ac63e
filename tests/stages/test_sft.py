"""SFT: loss only on assistant tokens (the label mask); packing never splits an example and gives exactly the padded
loss, gradient and run; compiled blocks give the eager run; training lowers the loss; LoRA trains adapters only and
saves a plain model."""

from __future__ import annotations

import pytest
import torch

from moss_rlhf.data.collate import IGNORE, chat_example, conversation_data
from moss_rlhf.data.formats import load_conversations
from moss_rlhf.models import load_causal_lm
from moss_rlhf.runs import read_metrics
from moss_rlhf.stages import sft
from moss_rlhf.stages.sft import SFTConfig
from moss_rlhf.tokenizer import load_tokenizer
from moss_rlhf.training import target_loss
from tests.conftest import run_in_processes


def test_labels_cover_assistant_turns_only(tokenizer_dir):
    tokenizer = load_tokenizer(str(tokenizer_dir))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where did Lin go?"},
                {"role": "assistant", "content": "Lin went to the park."}, {"role": "user", "content": "And Bo?"},
                {"role": "assistant", "content": "Bo went to the market."}]
    ex = chat_example(tokenizer, messages, max_len=512)
    assert len(ex.input_ids) == len(ex.labels)
    supervised = [i for i, label in enumerate(ex.labels) if label != IGNORE]
    assert all(ex.labels[i] == ex.input_ids[i] for i in supervised)
    text = tokenizer.decode([ex.input_ids[i] for i in supervised])
    assert text == "Lin went to the park.<|end|>Bo went to the market.<|end|>"
    unsupervised = tokenizer.decode([t for t, label in zip(ex.input_ids, ex.labels) if label == IGNORE])
    assert "Where did Lin go?" in unsupervised and "Be brief." in unsupervised and "park" not in unsupervised


def test_packed_batch_gives_the_padded_loss_and_gradient(tiny_model_dir, tokenizer_dir, conversations_file):
    """No attention crosses an example boundary: packing changes the layout, not the numbers."""
    tokenizer = load_tokenizer(str(tokenizer_dir))
    turns = load_conversations(str(conversations_file))
    # 1 to 4 exchanges each: mixed lengths, as in real chat data, so padding wastes positions
    conversations = [sum(turns[4 * i:4 * i + i % 4 + 1], []) for i in range(12)]
    results = {}
    for pack in (True, False):
        model = load_causal_lm(str(tiny_model_dir))
        batch = conversation_data(tokenizer, conversations, max_len=64, pack=pack, seq_len=128).batch(list(range(12)))
        n_targets = int(batch.pop("n_targets"))
        loss = target_loss(model, batch)
        loss.backward()
        results[pack] = (n_targets, batch["input_ids"].numel(), loss.item(),
                         [p.grad.clone() for p in model.parameters()])
    (n_packed, size_packed, loss_packed, grads_packed), (n_padded, size_padded, loss_padded, grads_padded) = (
        results[True], results[False])
    assert n_packed == n_padded
    assert size_packed < 0.8 * size_padded  # the point of packing
    assert loss_packed == pytest.approx(loss_padded, rel=1e-5)
    for g_packed, g_padded in zip(grads_packed, grads_padded):
        # fp32 sums in another order: a few elements near zero differ by ~1e-6 of gradients of size ~1e-2
        torch.testing.assert_close(g_packed, g_padded, rtol=1e-4, atol=1e-5)


def test_packed_and_padded_runs_follow_the_same_curve(tmp_path, tiny_model_dir, conversations_file):
    curves = {}
    for pack in (True, False):
        cfg = SFTConfig(out=str(tmp_path / str(pack)), model=str(tiny_model_dir), data=[str(conversations_file)],
                        max_steps=4, batch_size=8, seq_len=128, max_len=64, pack=pack, lr=3e-3, warmup_steps=1,
                        log_every=1, eval_every=4, save_every=0, progress=False, device="cpu")
        result = sft.run(cfg)
        curves[pack] = [r["train/loss"] for r in read_metrics(cfg.out) if "train/loss" in r] + [result.eval_loss]
    assert curves[True] == pytest.approx(curves[False], rel=1e-4)


@pytest.mark.slow
def test_compiled_blocks_follow_the_eager_curve(tmp_path, tiny_model_dir, conversations_file, monkeypatch):
    """--compile (every stage's blocks through torch.compile, ``training.Trainee``): packed rows of varying lengths
    give the eager run's losses to float rounding."""
    curves, blocks = {}, []
    compile_block = torch.nn.Module.compile
    for compiled in (False, True):
        if compiled:  # count what is compiled: equal curves alone would pass with nothing compiled
            monkeypatch.setattr(torch.nn.Module, "compile",
                                lambda self, **kw: blocks.append(type(self).__name__) or compile_block(self, **kw))
        cfg = SFTConfig(out=str(tmp_path / str(compiled)), model=str(tiny_model_dir), data=[str(conversations_file)],
                        max_steps=3, batch_size=8, seq_len=128, max_len=64, pack=True, lr=3e-3, warmup_steps=1,
                        log_every=1, eval_every=3, save_every=0, progress=False, device="cpu", compile=compiled)
        result = sft.run(cfg)
        curves[compiled] = [r["train/loss"] for r in read_metrics(cfg.out) if "train/loss" in r] + [result.eval_loss]
    assert curves[True] == pytest.approx(curves[False], rel=1e-4)
    assert blocks == ["LlamaDecoderLayer"] * load_causal_lm(str(tiny_model_dir)).config.num_hidden_layers


@pytest.mark.parametrize("pack", [True, False])
def test_sft_lowers_the_loss(tmp_path, tiny_model_dir, conversations_file, pack):
    cfg = SFTConfig(out=str(tmp_path / "sft"), model=str(tiny_model_dir), data=[str(conversations_file)],
                    max_steps=25, batch_size=8, seq_len=64, max_len=64, pack=pack, lr=3e-3, warmup_steps=2,
                    eval_every=25, log_every=1, save_every=0, progress=False, device="cpu")
    result = sft.run(cfg)
    first = read_metrics(cfg.out)[0]["train/loss"]
    assert result.train_loss < 0.6 * first
    assert (tmp_path / "sft" / "model" / "model.safetensors").exists()


@pytest.mark.parametrize("pack", [True, False])
def test_sft_gradient_accumulation_is_exact(tmp_path, tiny_model_dir, conversations_file, pack):
    """Micro-batches hold different numbers of target tokens: the loss must be normalised by the global count."""
    runs = {}
    for name, batch, accum in (("8x1", 8, 1), ("2x4", 2, 4)):
        cfg = SFTConfig(out=str(tmp_path / name), model=str(tiny_model_dir), data=[str(conversations_file)],
                        max_steps=2, batch_size=batch, grad_accum=accum, max_len=64, pack=pack, log_every=1,
                        eval_every=0, save_every=0, progress=False, device="cpu")
        sft.run(cfg)
        runs[name] = [r["train/loss"] for r in read_metrics(cfg.out)]
    assert runs["8x1"] == pytest.approx(runs["2x4"], abs=1e-5)


@pytest.mark.slow
def test_two_processes_match_one_process_with_packing(tmp_path, tiny_model_dir, conversations_file):
    """Each process packs its own share of the batch; the loss is normalised by the global target count, so the
    curve is the 1-process one."""
    runs = {}
    for name, batch in (("single", 8), ("double", 4)):
        cfg = SFTConfig(out=str(tmp_path / name), model=str(tiny_model_dir), data=[str(conversations_file)],
                        max_steps=3, batch_size=batch, seq_len=128, max_len=64, lr=3e-3, warmup_steps=1, log_every=1,
                        eval_every=3, save_every=0, progress=False, device="cpu")
        if name == "single":
            sft.run(cfg)
        else:
            run_in_processes(sft.run, cfg)
        runs[name] = [(r.get("train/loss"), r.get("eval/loss")) for r in read_metrics(cfg.out)]
    assert len(runs["single"]) == 3
    for (loss_1, eval_1), (loss_2, eval_2) in zip(runs["single"], runs["double"], strict=True):
        assert loss_2 == pytest.approx(loss_1, abs=1e-5)
        assert (eval_1 is None and eval_2 is None) or eval_2 == pytest.approx(eval_1, abs=1e-5)


def test_lora_trains_adapters_and_exports_a_plain_model(tmp_path, tiny_model_dir, conversations_file):
    from transformers import AutoModelForCausalLM

    cfg = SFTConfig(out=str(tmp_path / "lora"), model=str(tiny_model_dir), data=[str(conversations_file)],
                    max_steps=3, batch_size=4, seq_len=64, max_len=64, lora_r=4, eval_every=0, save_every=0,
                    progress=False, device="cpu")
    sft.run(cfg)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "lora" / "model")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = [n for (n, a), (_, b) in zip(merged.named_parameters(), base.named_parameters()) if not torch.equal(a, b)]
    assert changed and all("proj" in n for n in changed)  # only the adapted linear layers moved


def test_skipping_nonfinite_steps_stops_after_the_allowed_number(tmp_path, tiny_model_dir, conversations_file):
    """--on-nonfinite skip: a step whose gradient norm is NaN/Inf is not applied and is counted; more than
    --max-skipped-steps of them stop the run (an lr of 1000 makes every step after the first non-finite)."""
    from moss_rlhf.config import NonFiniteError

    cfg = SFTConfig(out=str(tmp_path / "sft"), model=str(tiny_model_dir), data=[str(conversations_file)], lr=1e3,
                    warmup_steps=0, max_steps=20, batch_size=8, max_len=64, seq_len=64, on_nonfinite="skip",
                    max_skipped_steps=3, eval_every=0, save_every=0, log_every=1, progress=False, device="cpu")
    with pytest.raises(NonFiniteError, match="step skipped|nothing of this step"):
        sft.run(cfg)
    rows = read_metrics(cfg.out)
    assert max(r["train/skipped_steps"] for r in rows) == 3  # three skipped and logged, the fourth stopped
    assert not (tmp_path / "sft" / "model").exists()
