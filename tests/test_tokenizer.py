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


@pytest.fixture(scope="module")
def base_tokenizer(tmp_path_factory):
    """A GPT-2-like tokenizer: byte-level BPE, one special token (its eos), no pad token, no chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path_factory.mktemp("base_tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(path)
    return load_tokenizer(str(path))


def test_stop_tokens_are_where_each_template_ends_a_turn(base_tokenizer):
    from moss_rlhf.tokenizer import stop_token_ids

    ours = train_tokenizer(TEXTS, vocab_size=400)
    assert stop_token_ids(ours) == [ours.eos_token_id]
    assert stop_token_ids(base_tokenizer) == [base_tokenizer.eos_token_id]  # the fallback template ends with eos
    assert base_tokenizer.pad_token == base_tokenizer.eos_token
    chatml = train_tokenizer(TEXTS, vocab_size=400)
    chatml.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    chatml.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
                            "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
                            "{{ '<|im_start|>assistant\\n' }}{% endif %}")
    assert stop_token_ids(chatml) == sorted({chatml.eos_token_id, chatml.convert_tokens_to_ids("<|im_end|>")})


def test_turn_end_is_the_reward_read_position_without_a_chat_template(base_tokenizer, tmp_path):
    """With the fallback template a turn is rendered ``role: content<eos>\\n``. The reward model is trained on the
    reply up to its eos and reads its score there — exactly the token sequence a PPO rollout of that reply has
    (prompt with the generation prompt, the reply, the stop token), so training, PPO, evaluation and serving read
    the score at the same, trained position."""
    import torch

    from moss_rlhf.data.collate import chat_example, left_pad, reply_example
    from moss_rlhf.data.formats import Preference
    from moss_rlhf.models import build_causal_lm, load_scorer, save_model, sequence_scores
    from moss_rlhf.stages.reward import RewardConfig, RewardLoss, pair_data
    from moss_rlhf.tokenizer import stop_token_ids

    eos = base_tokenizer.eos_token_id
    prompt = [{"role": "user", "content": "Lin lives in Stone Bay."}]
    reward_ids = reply_example(base_tokenizer, prompt, "The red apple is sweet.", 256).input_ids
    assert reward_ids[-1] == eos and stop_token_ids(base_tokenizer) == [eos]
    prompt_ids = encode_chat(base_tokenizer, prompt, add_generation_prompt=True)
    assert reward_ids[:len(prompt_ids)] == prompt_ids  # a rollout of this reply is these very tokens
    reply_ids = reward_ids[len(prompt_ids):]
    assert reply_ids.count(eos) == 1 and base_tokenizer.decode(reply_ids[:-1]) == " The red apple is sweet."

    # SFT labels: each reply up to and including its eos; the newline after it belongs to no reply
    two_turns = prompt + [{"role": "assistant", "content": "Yes."}, {"role": "user", "content": "Hello"},
                          {"role": "assistant", "content": "Hello, world!"}]
    example = chat_example(base_tokenizer, two_turns, 1 << 30)
    labelled = [t for t in example.labels if t != -100]
    assert labelled.count(eos) == 2 and example.input_ids[-1] == eos
    newline = base_tokenizer("\n", add_special_tokens=False)["input_ids"]
    first_eos = example.input_ids.index(eos)
    assert example.input_ids[first_eos + 1:first_eos + 1 + len(newline)] == newline
    assert example.labels[first_eos + 1] == -100

    # the score reward training computes equals the score a PPO rollout of the same tokens gets
    save_model(build_causal_lm("tiny", base_tokenizer, seed=0), base_tokenizer, tmp_path / "lm")
    scorer = load_scorer(str(tmp_path / "lm"), base_tokenizer).eval()
    torch.nn.init.normal_(scorer.score.weight, std=0.1, generator=torch.Generator().manual_seed(0))
    cfg = RewardConfig(data=["-"], max_len=256)
    pref = Preference(prompt, "The red apple is sweet.", "Hello, world!")
    batch = pair_data(base_tokenizer, [pref], cfg).batch([0])
    with torch.no_grad():
        trained_read, _, _, _ = RewardLoss(cfg, None).forward(scorer, batch)
        other = torch.tensor(base_tokenizer("Hello", add_special_tokens=False)["input_ids"])
        ids, mask = left_pad([reward_ids, other.tolist()], base_tokenizer.pad_token_id)
        rollout_read = sequence_scores(scorer, ids, mask)
    torch.testing.assert_close(rollout_read[0], trained_read[0], atol=1e-5, rtol=0)


def test_every_cjk_character_is_a_token_of_its_own_unless_asked_otherwise():
    # "鸟很慢" (bird, very, slow) is frequent enough in this corpus for BPE to merge it into one token
    texts = ["黑鸟很慢。白鸟很慢。The bird is slow.", "红鸟很慢。猫很小。"] * 50
    split = train_tokenizer(texts, vocab_size=400)
    pieces = [split.decode([i]) for i in split("黑鸟很慢。", add_special_tokens=False)["input_ids"]]
    assert pieces == ["黑", "鸟", "很", "慢", "。"]
    merged = train_tokenizer(texts, vocab_size=400, split_cjk=False)
    pieces = [merged.decode([i]) for i in merged("黑鸟很慢。", add_special_tokens=False)["input_ids"]]
    assert len(pieces) < 5 and "".join(pieces) == "黑鸟很慢。"
    # English words still merge as before, and mixed text round-trips
    assert split.decode(split(" bird is slow", add_special_tokens=False)["input_ids"]) == " bird is slow"
    assert len(split(" slow", add_special_tokens=False)["input_ids"]) == 1
