"""The model in use: generation, chat replies, streaming, and label scoring that learns what it was taught."""

from __future__ import annotations

import random

import pytest
import torch

from moss_rlhf.assistant import (CLASSIFY_PROMPT, CLASSIFY_REPLY, SENTIMENT_PROMPT, SENTIMENT_REPLY, Assistant,
                                 Label)
from tests.conftest import single_thread

NAMES = ["Lin", "Ana", "Bo", "Mei", "Tom", "Sara", "Ivan", "Zoe"]
THINGS = ["tea", "book", "game"]
VERBS = {"positive": ["loved", "enjoyed"], "negative": ["hated", "disliked"], "neutral": ["saw", "bought"]}
TOPICS = {"food": ["tea", "soup"], "travel": ["bus", "train"], "tech": ["phone", "laptop"]}


def sentiment_examples(names: list[str]) -> list[tuple[str, str]]:
    return [(f"{n} {v} the {t}.", label)
            for label, verbs in VERBS.items() for v in verbs for n in names for t in THINGS]


def topic_examples(names: list[str]) -> list[tuple[str, str]]:
    return [(f"{n} {v} about the {t}.", topic) for topic, things in TOPICS.items() for t in things for n in names
            for v in ("talked", "asked", "read")]


def _conversation(prompt: str, reply: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Assistant:
    """A tiny model fine-tuned for 100 steps (seconds) on sentiment and topic questions in the demo world's words."""
    from moss_rlhf.data.collate import chat_example, pad_examples
    from moss_rlhf.losses import lm_loss_sum
    from moss_rlhf.models import build_causal_lm, save_model
    from moss_rlhf.tokenizer import train_tokenizer

    train_names = NAMES[:6]
    options = ", ".join(TOPICS)
    conversations = [_conversation(SENTIMENT_PROMPT.format(text=s), SENTIMENT_REPLY.format(label=label))
                     for s, label in sentiment_examples(train_names)]
    conversations += [_conversation(CLASSIFY_PROMPT.format(text=s, options=options), CLASSIFY_REPLY.format(label=t))
                      for s, t in topic_examples(train_names)]
    tokenizer = train_tokenizer([m["content"] for c in conversations for m in c] + NAMES, vocab_size=320)
    model = build_causal_lm("tiny", tokenizer, seed=0)
    examples = [chat_example(tokenizer, c, 128) for c in conversations]
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-3)
    rng = random.Random(0)
    model.train()
    with single_thread():
        for _ in range(100):
            batch = pad_examples(rng.sample(examples, 16), tokenizer.pad_token_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss_sum, n = lm_loss_sum(logits, batch["labels"])
            (loss_sum / n).backward()
            optimizer.step()
            optimizer.zero_grad()
    path = tmp_path_factory.mktemp("assistant_model")
    save_model(model, tokenizer, path)
    return Assistant.from_pretrained(str(path), device="cpu")


def test_sentiment_is_a_calibrated_label_and_learned(trained):
    held_out = sentiment_examples(NAMES[6:])  # names never seen in training
    predictions = trained.analyze_sentiment([s for s, _ in held_out])
    assert all(isinstance(p, Label) and p.label in VERBS for p in predictions)
    accuracy = sum(p.label == gold for p, (_, gold) in zip(predictions, held_out)) / len(held_out)
    assert accuracy >= 0.9, accuracy
    single = trained.analyze_sentiment("Zoe loved the tea.")
    assert single.label == "positive" and 0.5 < single.score <= 1.0
    probabilities = trained.label_probabilities([SENTIMENT_PROMPT.format(text="Zoe hated the game.")],
                                                list(VERBS), SENTIMENT_REPLY)
    assert probabilities.shape == (1, 3)
    assert torch.allclose(probabilities.sum(-1), torch.ones(1))
    assert probabilities[0].argmax().item() == list(VERBS).index("negative")


def test_classify_picks_among_the_given_labels(trained):
    held_out = topic_examples(NAMES[6:])
    predictions = trained.classify([s for s, _ in held_out], list(TOPICS))
    accuracy = sum(p.label == gold for p, (_, gold) in zip(predictions, held_out)) / len(held_out)
    assert accuracy >= 0.9, accuracy
    with pytest.raises(ValueError, match="at least two labels"):
        trained.classify("Zoe talked about the tea.", ["food"])
    with pytest.raises(ValueError, match="distinct"):
        trained.classify("Zoe talked about the tea.", ["food", "food"])
    assert trained.analyze_sentiment([]) == [] and trained.classify([], list(TOPICS)) == []


def test_respond_generate_and_batches(trained):
    question = SENTIMENT_PROMPT.format(text="Ivan loved the game.")
    assert trained.respond(question, temperature=0.0) == "The sentiment is positive."
    replies = trained.respond([[{"role": "user", "content": question}]] * 2, temperature=0.0)
    assert replies == ["The sentiment is positive."] * 2
    continuation = trained.generate(["Lin", "Bo"], max_new_tokens=5, temperature=1.0, seed=1)
    assert isinstance(continuation, list) and len(continuation) == 2
    completions = trained.complete(["Lin"], max_new_tokens=3, temperature=1.0, seed=0)
    assert completions[0].completion_tokens <= 3 and completions[0].prompt_tokens >= 1
    with pytest.raises(TypeError, match="unknown sampling option"):
        trained.generate("Lin", temprature=0.5)
    # a conversation given in code is checked as a data file's is, never rendered as something else
    with pytest.raises(ValueError, match=r"messages\[1\].role: expected one of system, user, assistant, got 'robot'"):
        trained.respond([{"role": "user", "content": "hi"}, {"role": "robot", "content": "hi"}])
    with pytest.raises(ValueError, match=r"messages\[0\].content: expected a string"):
        trained.complete([[{"role": "user", "content": None}]])


def test_same_seed_same_reply(trained):
    a = trained.respond("Hello", temperature=1.0, max_new_tokens=12, seed=3)
    b = trained.respond("Hello", temperature=1.0, max_new_tokens=12, seed=3)
    assert a == b


def test_stream_joins_to_the_full_reply_and_honours_stop(trained):
    question = SENTIMENT_PROMPT.format(text="Ivan hated the book.")
    finished = []
    pieces = list(trained.stream([{"role": "user", "content": question}], temperature=0.0, on_finish=finished.append))
    assert len(pieces) > 1
    reply = trained.respond(question, temperature=0.0)
    assert "".join(pieces) == reply and reply.startswith("The sentiment is ")
    assert finished[0].finish_reason == "stop" and finished[0].text == reply
    stopped = "".join(trained.stream([{"role": "user", "content": question}], temperature=0.0, stop=["is"]))
    assert stopped == "The sentiment "


def test_translate_uses_the_translation_prompt(trained):
    out = trained.translate(["Lin saw the tea.", "Bo saw the book."], "Chinese", max_new_tokens=4)
    assert isinstance(out, list) and len(out) == 2


def test_load_entry_point(trained, tmp_path):
    import moss_rlhf
    from moss_rlhf.models import save_model

    save_model(trained.model, trained.tokenizer, tmp_path / "m")
    loaded = moss_rlhf.load(str(tmp_path / "m"), device="cpu")
    assert loaded.respond(SENTIMENT_PROMPT.format(text="Ivan loved the game."), temperature=0.0) == \
        "The sentiment is positive."
