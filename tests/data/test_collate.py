"""Token batches: packing keeps examples whole and restarts positions; packed rows are never wider than needed;
text packing drops only the tail; left padding for prompts; a reply for a reward model ends at its turn end; the
batch order gives every process and every accumulation layout the same examples per step, and is a pure function
of (seed, step)."""

from __future__ import annotations

import pytest
import torch

from moss_rlhf.config import ConfigError, UserError
from moss_rlhf.data.collate import (IGNORE, BatchOrder, Example, conversation_data, left_pad, mismatched_partners,
                                    pack_examples, pack_texts, pad_examples, reply_example)
from moss_rlhf.tokenizer import load_tokenizer


def test_packing_keeps_examples_whole_restarts_positions_and_pads_without_loss():
    examples = [Example([1, 2, 3], [IGNORE, 2, 3]), Example([4, 5], [IGNORE, 5]), Example([6, 7, 8, 9], [6, 7, 8, 9])]
    batch = pack_examples(examples, seq_len=5, pad_id=0)
    # first-fit decreasing: the 4-token example opens row 0, the 3-token one row 1, the 2-token one joins it
    assert batch["input_ids"].tolist() == [[6, 7, 8, 9, 0], [1, 2, 3, 4, 5]]
    assert batch["labels"].tolist() == [[6, 7, 8, 9, IGNORE], [IGNORE, 2, 3, IGNORE, 5]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    assert "attention_mask" not in batch  # a mask would make transformers ignore the packed-sequence positions


@pytest.mark.parametrize("lengths", [[3] * 20, [1, 9, 2, 8, 3, 7, 4, 6, 5], [12, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]])
def test_packing_uses_few_positions_and_every_token_once(lengths):
    examples = [Example(list(range(100 * i, 100 * i + n)), list(range(100 * i, 100 * i + n)))
                for i, n in enumerate(lengths)]
    batch = pack_examples(examples, seq_len=16, pad_id=-1)
    ids = batch["input_ids"]
    assert ids.shape[1] <= 16
    real = sorted(t for t in ids.flatten().tolist() if t != -1)
    assert real == sorted(t for e in examples for t in e.input_ids)
    fewest = -(-sum(lengths) // 16) * 16
    assert ids.numel() <= 1.05 * max(fewest, max(lengths) * -(-sum(lengths) // max(lengths)))
    for row_ids, row_positions in zip(ids.tolist(), batch["position_ids"].tolist()):
        for t, position in zip(row_ids, row_positions):  # each example's positions start at 0
            if t != -1:
                assert position == t % 100


def test_pad_and_left_pad():
    padded = pad_examples([Example([5, 6, 7], [IGNORE, 6, 7]), Example([8], [8])], pad_id=0)
    assert padded["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert padded["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    ids, mask = left_pad([[1, 2, 3], [4], []], pad_id=9)
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4], [9, 9, 9]] and mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]


def test_text_packing_cuts_the_stream_into_rows(tokenizer_dir):
    tokenizer = load_tokenizer(str(tokenizer_dir))
    texts = ["Lin went to the park.", "猫很小。", "Bo said thank you."]
    rows = pack_texts(tokenizer, texts, seq_len=8)
    stream = []
    for t in texts:
        stream += [tokenizer.bos_token_id] + tokenizer(t, add_special_tokens=False)["input_ids"] + [
            tokenizer.eos_token_id]
    assert rows.flatten().tolist() == stream[: len(rows) * 8] and len(stream) - rows.numel() < 8
    with pytest.raises(UserError, match="fewer than one sequence of 4096"):
        pack_texts(tokenizer, texts, seq_len=4096)


def test_conversations_are_packed_as_the_chat_template_renders_them(tokenizer_dir):
    from moss_rlhf.tokenizer import encode_chat

    tokenizer = load_tokenizer(str(tokenizer_dir))
    chat = [{"role": "user", "content": "Where did Lin go?"}, {"role": "assistant", "content": "Lin went to the park."}]
    rows = pack_texts(tokenizer, ["猫很小。", chat, "Bo said thank you."], seq_len=4)
    rendered = encode_chat(tokenizer, chat)  # <|bos|><|user|>…<|end|><|assistant|>…<|end|>: bos and eos included
    assert rendered[0] == tokenizer.bos_token_id and rendered[-1] == tokenizer.eos_token_id
    stream = ([tokenizer.bos_token_id] + tokenizer("猫很小。", add_special_tokens=False)["input_ids"]
              + [tokenizer.eos_token_id] + rendered + [tokenizer.bos_token_id]
              + tokenizer("Bo said thank you.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
    assert rows.flatten().tolist() == stream[: rows.numel()] and len(stream) - rows.numel() < 4


def test_reply_example_ends_at_the_turn_end_and_keeps_its_end_when_cut(tokenizer_dir):
    tokenizer = load_tokenizer(str(tokenizer_dir))
    prompt = [{"role": "user", "content": "Where did Lin go? " * 20}]
    full = reply_example(tokenizer, prompt, "Lin went to the park.", max_len=1 << 20)
    assert full.input_ids[-1] == tokenizer.eos_token_id
    cut = reply_example(tokenizer, prompt, "Lin went to the park.", max_len=24)
    assert cut.input_ids == full.input_ids[-24:] and len(cut.labels) == 24
    assert tokenizer.decode([t for t in cut.labels if t != IGNORE]) == "Lin went to the park.<|end|>"


def test_reply_example_labels_only_the_final_reply_of_a_multi_turn_prompt(tokenizer_dir):
    """The earlier assistant turns of the prompt are context, not the reply a reward model's LM term or DPO's
    log-prob counts."""
    tokenizer = load_tokenizer(str(tokenizer_dir))
    prompt = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."},
              {"role": "user", "content": "Where did Lin go?"}]
    example = reply_example(tokenizer, prompt, "Lin went to the park.", max_len=1 << 20)
    assert tokenizer.decode([t for t in example.labels if t != IGNORE]) == "Lin went to the park.<|end|>"
    single = reply_example(tokenizer, prompt[2:], "Lin went to the park.", max_len=1 << 20)
    assert sum(t != IGNORE for t in example.labels) == sum(t != IGNORE for t in single.labels)


def test_conversation_data_counts_assistant_tokens(tokenizer_dir, conversations_file):
    from moss_rlhf.data.formats import load_conversations

    tokenizer = load_tokenizer(str(tokenizer_dir))
    conversations = load_conversations(str(conversations_file))[:10]
    no_reply = [{"role": "user", "content": "hello"}]
    data = conversation_data(tokenizer, conversations + [no_reply], max_len=64, pack=True, seq_len=64)
    assert len(data) == 10  # a conversation without a reply carries nothing to learn
    batch = data.batch(list(range(10)))
    assert int(batch["n_targets"]) == int((batch["labels"][:, 1:] != IGNORE).sum()) > 10


def test_batch_order_is_the_same_for_any_layout_and_resumable():
    """8 × 1, 2 × 4 accumulation and 2 processes × 4 read the same examples in each optimizer step, and a new
    BatchOrder (as after a resume) continues the same stream."""
    one = BatchOrder(50, batch_size=8, grad_accum=1, world_size=1, seed=3)
    accumulated = BatchOrder(50, batch_size=2, grad_accum=4, world_size=1, seed=3)
    two = BatchOrder(50, batch_size=4, grad_accum=1, world_size=2, seed=3)
    for step in range(12):  # crosses several epochs
        expected = sorted(one.indices(step, 0, 0))
        assert sorted(i for j in range(4) for i in accumulated.indices(step, j, 0)) == expected
        assert sorted(two.indices(step, 0, 0) + two.indices(step, 0, 1)) == expected
        assert two.positions(step, 0, 1) == range(step * 8 + 4, step * 8 + 8)
    assert BatchOrder(50, 8, 1, 1, 3).indices(9, 0, 0) == one.indices(9, 0, 0)
    epoch = [i for step in range(7) for i in one.indices(step, 0, 0)][:50]
    assert sorted(epoch) == list(range(50))  # an epoch is a permutation
    assert BatchOrder(50, 8, 1, 1, 4).indices(0, 0, 0) != one.indices(0, 0, 0)


def test_packed_rows_have_no_attention_mask_but_padded_rows_do(tokenizer_dir, conversations_file):
    from moss_rlhf.data.formats import load_conversations

    tokenizer = load_tokenizer(str(tokenizer_dir))
    conversations = load_conversations(str(conversations_file))[:6]
    packed = conversation_data(tokenizer, conversations, 64, pack=True, seq_len=128).batch(list(range(6)))
    padded = conversation_data(tokenizer, conversations, 64, pack=False).batch(list(range(6)))
    assert "attention_mask" not in packed and "attention_mask" in padded
    assert int(packed["n_targets"]) == int(padded["n_targets"])
    assert packed["input_ids"].numel() <= padded["input_ids"].numel()
    assert torch.equal(packed["input_ids"][packed["labels"] != IGNORE].sort().values,
                       padded["input_ids"][padded["labels"] != IGNORE].sort().values)


def test_mismatched_partners_pair_each_prompt_with_another_prompts_reply():
    prompts = [[{"role": "user", "content": f"q{i // 2}"}] for i in range(10)]  # two records per prompt
    partner = mismatched_partners(prompts, seed=3)
    assert all(prompts[j] != prompts[i] for i, j in enumerate(partner))
    assert partner == mismatched_partners(prompts, seed=3)
    with pytest.raises(ConfigError, match="two different prompts"):
        mismatched_partners(prompts[:2], seed=0)
