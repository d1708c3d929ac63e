"""SFT: loss only on assistant tokens (the label mask), packing never splits an example, training lowers the loss,
LoRA trains adapters only and saves a plain model."""

from __future__ import annotations

import pytest
import torch

from moss_rlhf.data.collate import IGNORE, Example, chat_example, pack_examples
from moss_rlhf.runs import read_metrics
from moss_rlhf.stages import sft
from moss_rlhf.stages.sft import SFTConfig
from moss_rlhf.tokenizer import load_tokenizer


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


def test_packing_keeps_examples_whole_and_pads_without_loss():
    examples = [Example([1, 2, 3], [IGNORE, 2, 3]), Example([4, 5], [IGNORE, 5]), Example([6, 7, 8, 9], [6, 7, 8, 9])]
    ids, labels = pack_examples(examples, seq_len=5, pad_id=0)
    assert ids.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    assert labels.tolist() == [[IGNORE, 2, 3, IGNORE, 5], [6, 7, 8, 9, IGNORE]]


@pytest.mark.parametrize("pack", [True, False])
def test_sft_lowers_the_loss(tmp_path, tiny_model_dir, conversations_file, pack):
    cfg = SFTConfig(out=str(tmp_path / "sft"), model=str(tiny_model_dir), data=[str(conversations_file)],
                    max_steps=25, batch_size=8, seq_len=64, max_len=64, pack=pack, lr=3e-3, warmup_steps=2,
                    eval_every=25, log_every=1, save_every=0, progress=False, device="cpu")
    result = sft.run(cfg)
    first = read_metrics(cfg.out)[0]["train/loss"]
    assert result.train_loss < 0.6 * first
    assert (tmp_path / "sft" / "model" / "model.safetensors").exists()


def test_sft_gradient_accumulation_with_padding_is_exact(tmp_path, tiny_model_dir, conversations_file):
    """Padded batches have different numbers of target tokens: the loss must be normalised by the global count."""
    runs = {}
    for name, batch, accum in (("8x1", 8, 1), ("2x4", 2, 4)):
        cfg = SFTConfig(out=str(tmp_path / name), model=str(tiny_model_dir), data=[str(conversations_file)],
                        max_steps=2, batch_size=batch, grad_accum=accum, max_len=64, pack=False, log_every=1,
                        eval_every=0, save_every=0, progress=False, device="cpu")
        sft.run(cfg)
        runs[name] = [r["train/loss"] for r in read_metrics(cfg.out)]
    assert runs["8x1"] == pytest.approx(runs["2x4"], abs=1e-5)


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
