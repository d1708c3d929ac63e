"""Pretraining documents about the demo world.

A tiny model must pick up three things before SFT: the language of the world (its few
hundred words), the world's facts (who lives where, who does what), and a first taste of
the chat format. So the corpus mixes profiles, short stories, product reviews of both
sentiments, conversations between inhabitants, town descriptions, English–Chinese
sentence pairs either way round ("The red apple is sweet. = 红苹果很甜。") with word glossaries, and
conversations with clean answers (as messages, rendered with the chat template by pretraining).
Every fact comes from :mod:`moss_rlhf.demo.lexicon`, so all documents agree with each
other and with the judge.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

from moss_rlhf.demo import lexicon as lx
from moss_rlhf.demo import sentences as sx
from moss_rlhf.demo.tasks import FACT_SLOTS, fact_answer, fact_answer_zh, reference_response, review
from moss_rlhf.demo.templating import Template

PromptSampler = Callable[[random.Random], str]

FACT_PHRASINGS: dict[str, tuple[str, ...]] = {
    "town": ("{name} lives in {town}.", "{name}'s home is in {town}.", "{name} has a house in {town}."),
    "job": ("{name} is a {job}.", "{name} works as a {job}."),
    "food": ("{name} likes {food}.", "{name}'s favorite food is {food}."),
    "pet": ("{name} has a {pet}.", "{name} has a pet {pet}."),
    "sport": ("{name} enjoys {sport}.", "In free time, {name} enjoys {sport}."),
    "age": ("{name} is {age} years old.",),
}


def _fact_sentence(person: lx.Person, slot: str, rng: random.Random) -> str:
    return rng.choice(FACT_PHRASINGS[slot]).format(**dataclasses.asdict(person))


def profile(rng: random.Random, sample_prompt: PromptSampler) -> str:
    person = rng.choice(lx.PEOPLE)
    slots = list(FACT_SLOTS)
    rng.shuffle(slots)
    lines = [_fact_sentence(person, slot, rng) for slot in slots]
    if rng.random() < 0.5:
        lines.append(lx.TOWN_DESCRIPTIONS[person.town])
    return " ".join(lines)


def _about(person: lx.Person, templates: tuple[Template, ...], label: str, rng: random.Random) -> str:
    """A labelled world sentence, starring ``person`` when the template has a name slot."""
    template = rng.choice([t for t in templates if t.label == label])
    fixed = {"name": person.name} if "name" in template.fields else {}
    return template.render(template.sample_values(rng, fixed))


def story(rng: random.Random, sample_prompt: PromptSampler) -> str:
    hero, friend = rng.sample(lx.PEOPLE, 2)
    day = rng.choice(lx.DAYS)
    lines = [f"On {day}, {hero.name} woke up early in {hero.town}."]
    for _ in range(rng.randint(2, 4)):
        if rng.random() < 0.6:
            lines.append(_about(hero, sx.TOPIC_TEMPLATES, rng.choice(lx.TOPIC_LABELS), rng))
        else:
            lines.append(_about(hero, sx.SENTIMENT_TEMPLATES, rng.choice(lx.SENTIMENT_LABELS), rng))
    lines.append(f"Later, {hero.name} met {friend.name}.")
    lines.append(_fact_sentence(friend, rng.choice(FACT_SLOTS), rng))
    lines.append(rng.choice((
        f"In the evening, {hero.name} went home to {hero.town}.",
        f"At night, {hero.name} played with the {hero.pet}.",
        f"{hero.name} ate {hero.food} for dinner and went to bed.",
    )))
    return " ".join(lines)


def product_review(rng: random.Random, sample_prompt: PromptSampler) -> str:
    product = rng.choice(lx.PRODUCTS)
    polarity = rng.choice(("positive", "negative"))
    reviewer = rng.choice(lx.PEOPLE)
    body = review(product, polarity, choice_key=str(rng.random()))
    stars = rng.choice((4, 5)) if polarity == "positive" else rng.choice((1, 2))
    extra = (f"The {product} works great." if polarity == "positive" else f"The {product} broke after one day.")
    closing = extra if rng.random() < 0.5 else ""
    return " ".join(part for part in (f"Review of the {product} by {reviewer.name}:", body, closing,
                                      f"Rating: {stars} out of 5.") if part)


def conversation(rng: random.Random, sample_prompt: PromptSampler) -> str:
    first, second = rng.sample(lx.PEOPLE, 2)
    exchanges = [
        (f"Hello, {second.name}! How are you?", "I am fine, thank you. And you?"),
        (f"How is your {second.pet}?", f"My {second.pet} is well, thank you."),
        ("Are you still living in the same town?", f"Yes, I still live in {second.town}."),
        ("What do you do these days?", f"I am still a {second.job}."),
        ("Do you want to eat together?", f"Yes, let us eat {second.food}. I like {second.food}."),
        ("What do you do for fun?", f"I enjoy {second.sport}."),
    ]
    chosen = [exchanges[0]] + rng.sample(exchanges[1:], rng.randint(2, 4))
    lines = []
    for question, answer in chosen:
        lines += [f"{first.name}: {question}", f"{second.name}: {answer}"]
    lines += [f"{first.name}: See you soon, {second.name}!", f"{second.name}: Goodbye, {first.name}!"]
    return "\n".join(lines)


def bilingual(rng: random.Random, sample_prompt: PromptSampler) -> str:
    """Parallel sentences, each written either way round (a model that only ever read English first never learns to
    translate into English), and now and then a glossary line of the words a sentence shape is built from."""
    lines = []
    for _ in range(rng.randint(3, 6)):
        roll = rng.random()
        if roll < 0.15:
            person, slot = rng.choice(lx.PEOPLE), rng.choice(FACT_SLOTS)
            english, chinese = fact_answer(person, slot), fact_answer_zh(person, slot)
        elif roll < 0.3:
            vocabulary = dict(rng.choice(rng.choice(sx.TRANSLATION_TEMPLATES).fields)[1])
            words = rng.sample(sorted(vocabulary), min(len(vocabulary), rng.randint(3, 5)))
            english, chinese = ", ".join(words), "，".join(vocabulary[w] for w in words)
        else:
            pair = sx.sample_translation_pair(rng)
            english, chinese = pair.english, pair.chinese
        lines.append(f"{english} = {chinese}" if rng.random() < 0.5 else f"{chinese} = {english}")
    return "\n".join(lines)


def town_page(rng: random.Random, sample_prompt: PromptSampler) -> str:
    town = rng.choice(lx.TOWNS)
    residents = [person for person in lx.PEOPLE if person.town == town]
    names = " and ".join(person.name for person in residents)
    lines = [lx.TOWN_DESCRIPTIONS[town], f"{names} live in {town}."]
    lines += [_fact_sentence(person, "job", rng) for person in residents]
    return " ".join(lines)


def chat(rng: random.Random, sample_prompt: PromptSampler) -> list[dict[str, str]]:
    """A conversation of one to three exchanges with clean answers, as messages: pretraining renders it with the chat
    template, so the pretrained model already answers in the format SFT and RL will ask it in (the tokens
    ``<|user|>`` and ``<|assistant|>`` mean something before SFT starts). ``sample_prompt`` yields training prompts
    only."""
    messages = []
    for _ in range(rng.randint(1, 3)):
        prompt = sample_prompt(rng)
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": reference_response(prompt)}]
    return messages


Document = str | list[dict[str, str]]  # a text, or a conversation's messages
# Every maker takes the prompt sampler so all share one signature; only ``chat`` uses it.
DOCUMENT_KINDS: dict[str, tuple[Callable[[random.Random, PromptSampler], Document], float]] = {
    "profile": (profile, 0.14),
    "story": (story, 0.18),
    "review": (product_review, 0.14),
    "conversation": (conversation, 0.09),
    "bilingual": (bilingual, 0.20),
    "town": (town_page, 0.05),
    "chat": (chat, 0.20),
}


def document_key(document: Document) -> str:
    """A document as one string: itself, or a conversation as "User: …" / "Assistant: …" lines (for sizes, and for
    comparing documents)."""
    if isinstance(document, str):
        return document
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in document)


def documents(
    rng: random.Random, target_bytes: int, sample_prompt: PromptSampler, exclude: frozenset[str] = frozenset()
) -> list[Document]:
    """Documents of mixed kinds until their UTF-8 size reaches ``target_bytes``.

    Documents whose :func:`document_key` is in ``exclude`` are skipped, which keeps a held-out split free of exact
    copies of training documents (short ones, like a single chat turn, do recur by chance).
    """
    makers = [maker for maker, _ in DOCUMENT_KINDS.values()]
    weights = [weight for _, weight in DOCUMENT_KINDS.values()]
    written: list[Document] = []
    total = 0
    while total < target_bytes:
        document = rng.choices(makers, weights=weights, k=1)[0](rng, sample_prompt)
        key = document_key(document)
        if key in exclude:
            continue
        written.append(document)
        total += len(key.encode("utf-8"))
    return written
