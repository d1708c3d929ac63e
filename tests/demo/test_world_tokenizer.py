"""The project's tokenizer, trained on the demo world, round-trips its Chinese and mixed text exactly, and compresses
the world's text (the merges learned real words)."""

from __future__ import annotations

from moss_rlhf.demo.world import build_world
from moss_rlhf.tokenizer import train_tokenizer


def test_chinese_round_trips_through_a_tokenizer_trained_on_the_world():
    world = build_world(seed=0, size="quick")
    tokenizer = train_tokenizer(world.pretrain_texts, vocab_size=2048)
    chinese = [t for t in world.pretrain_texts if any("\u4e00" <= ch <= "\u9fff" for ch in t)]
    assert len(chinese) > 20
    for text in chinese[:200] + [r["messages"][-1]["content"] for r in world.sft_clean[:200]]:
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    sample = "\n".join(world.pretrain_texts[:200])
    n_tokens = len(tokenizer(sample, add_special_tokens=False)["input_ids"])
    assert n_tokens < len(sample.encode("utf-8")) / 2.5
