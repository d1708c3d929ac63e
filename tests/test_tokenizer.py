"""The byte-level BPE tokenizer: any UTF-8 text round-trips exactly; special tokens and the chat template; saved in
Hugging Face format."""

from __future__ import annotations

import pytest

from moss_rlhf.tokenizer import CHAT_TEMPLATE, encode_chat, load_tokenizer, render_chat, train_tokenizer

TEXTS = ["The red apple is sweet. = 红苹果很甜。", "Lin lives in Stone Bay.", "猫很小。狗很大。", "Hello, world!"] * 30


@pytest.mark.parametrize("text", [
    "你好，世界！这是一个测试。", "The cat is small. 猫很小。", "emoji 😀 and ümlauts, tabs\tand\nnewlines  double  spaces",
    "Ελληνικά, русский, العربية, हिन्दी", "   leading and trailing   ", "",
])
def test_any_utf8_text_round_trips_exactly(text):
    tokenizer = train_tokenizer(TEXTS, vocab_size=400)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_special_tokens_and_chat_template_survive_save_and_load(tmp_path):
    tokenizer = train_tokenizer(TEXTS, vocab_size=400)
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.chat_template == CHAT_TEMPLATE
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == ("<|bos|>", "<|end|>", "<|pad|>")
    messages = [{"role": "user", "content": "猫很小吗?"}, {"role": "assistant", "content": "是的。"}]
    assert render_chat(loaded, messages) == "<|bos|><|user|>猫很小吗?<|end|><|assistant|>是的。<|end|>"
    prompt = encode_chat(loaded, messages[:1], add_generation_prompt=True)
    assert loaded.convert_ids_to_tokens(prompt[-1]) == "<|assistant|>"
    # special tokens are single ids and never merge with text
    assert len(loaded("<|user|>", add_special_tokens=False)["input_ids"]) == 1


def test_cli_trains_on_files(tmp_path):
    from moss_rlhf.cli import main

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(TEXTS), encoding="utf-8")
    assert main(["tokenizer", "--corpus", str(corpus), "--out", str(tmp_path / "tok"), "--vocab-size", "300"]) == 0
    tokenizer = load_tokenizer(str(tmp_path / "tok"))
    assert len(tokenizer) <= 300
    assert tokenizer.decode(tokenizer("红苹果很甜", add_special_tokens=False)["input_ids"]) == "红苹果很甜"
