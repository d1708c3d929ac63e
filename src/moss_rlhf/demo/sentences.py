"""The world's sentence inventory: labelled sentiment and topic sentences, and translation pairs.

Sentences are built from templates over the fixed lexicon, so their labels are known by
construction: a sentiment sentence is labelled by the template it came from, and a
translation pair is the same template rendered in English and in Chinese. The judge
recognises a sentence by matching it back against these templates, which makes every
gold label exact rather than guessed.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from functools import lru_cache

from moss_rlhf.demo import lexicon as lx
from moss_rlhf.demo.templating import Domains, Template

SENTENCE_DOMAINS: Domains = {
    "name": lx.NAMES,
    "town": lx.TOWNS,
    "food": tuple(lx.FOODS_ZH),
    "item": tuple(lx.PRODUCT_ITEMS),
    "product": lx.PRODUCTS,
    "day": lx.DAYS,
    "ball_sport": lx.BALL_SPORTS,
    "solo_sport": lx.SOLO_SPORTS,
    "sport": tuple(lx.SPORTS_ZH),
}


def _templates(label: str, *texts: str) -> list[Template]:
    return [Template(text, label, domains=SENTENCE_DOMAINS) for text in texts]


# Positive templates carry only positive lexicon words, negative ones only negative words,
# neutral ones none; a test checks every expansion against the lexicon reader.
SENTIMENT_TEMPLATES: tuple[Template, ...] = tuple(
    _templates(
        "positive",
        "{name} loved the {food} at the cafe.",
        "The {product} works great.",
        "{name} had a wonderful day in {town}.",
        "The {food} tasted delicious.",
        "{name} is happy with the new {item}.",
        "The people in {town} are friendly.",
        "{name} enjoyed the {sport} lesson.",
    )
    + _templates(
        "negative",
        "The {product} broke after one day.",
        "{name} hated the stale {food}.",
        "{name} had a terrible trip to {town}.",
        "The {food} tasted awful.",
        "{name} is disappointed with the {item}.",
        "The bus to {town} was late and dirty.",
        "The {product} is noisy and slow.",
    )
    + _templates(
        "neutral",
        "{name} bought the {product} on {day}.",
        "The {item} is on the table.",
        "{name} took the bus to {town}.",
        "{name} ate {food} at noon.",
        "{name} met {name2} in {town}.",
        "The {item} is in the box.",
        "{name} has a meeting on {day}.",
    )
)

# Each topic template uses keywords of its own topic only (foods for food, sports for
# sports, ...); names, towns and days are shared, so they carry no topic signal.
TOPIC_TEMPLATES: tuple[Template, ...] = tuple(
    _templates(
        "food",
        "{name} cooked {food} for dinner.",
        "{name} ate {food} for lunch in {town}.",
        "The {food} in the kitchen tasted fresh.",
        "{name} shared {food} at breakfast.",
        "{name} wrote a new recipe for {food}.",
    )
    + _templates(
        "sports",
        "{name} played {ball_sport} with the team.",
        "{name} won the {ball_sport} match on {day}.",
        "{name} trained for the race in {town}.",
        "The coach watched {name} play {ball_sport}.",
        "{name} went {solo_sport} before the match.",
    )
    + _templates(
        "weather",
        "It rained all day in {town}.",
        "The morning was sunny in {town}.",
        "Snow covered {town} on {day}.",
        "{name} saw a storm over {town}.",
        "It will be windy in {town} on {day}.",
        "It was cloudy and foggy in {town}.",
    )
    + _templates(
        "travel",
        "{name} took the train to {town}.",
        "{name} bought a bus ticket to {town}.",
        "{name} flew to {town} for a short trip.",
        "{name} waited at the station for the train.",
        "{name} booked a hotel in {town}.",
        "{name} packed a suitcase for {town}.",
    )
    + _templates(
        "work",
        "{name} had a long meeting at the office.",
        "{name} sent the report to the boss on {day}.",
        "{name} worked a late shift on {day}.",
        "{name} answered emails at the office.",
        "{name} and a colleague finished the project.",
        "The deadline for the report is {day}.",
    )
)


def _match(templates: tuple[Template, ...], sentence: str) -> str | None:
    for template in templates:
        if template.match(sentence) is not None:
            return template.label
    return None


@lru_cache(maxsize=65536)
def sentiment_of_sentence(sentence: str) -> str | None:
    """Gold sentiment of a world sentence, or None if the world cannot produce it."""
    return _match(SENTIMENT_TEMPLATES, sentence)


@lru_cache(maxsize=65536)
def topic_of_sentence(sentence: str) -> str | None:
    """Gold topic of a world sentence, or None if the world cannot produce it."""
    return _match(TOPIC_TEMPLATES, sentence)


def sample_labelled(templates: tuple[Template, ...], label: str, rng: random.Random) -> str:
    """A random sentence with ``label`` (templates of that label chosen uniformly)."""
    return rng.choice([template for template in templates if template.label == label]).sample(rng)


# --- Translation pairs -------------------------------------------------------------------


@dataclass(frozen=True)
class TranslationTemplate:
    """One sentence shape in both languages; each field maps English words to Chinese."""

    key: str
    english: str
    chinese: str
    fields: tuple[tuple[str, dict[str, str]], ...]
    weight: float


@dataclass(frozen=True)
class TranslationPair:
    english: str
    chinese: str
    template_key: str
    words: tuple[str, ...]  # the English field values, in template field order


def _shape(key: str, english: str, chinese: str, weight: float, **fields: dict[str, str]) -> TranslationTemplate:
    return TranslationTemplate(key, english, chinese, tuple(fields.items()), weight)


_NAMES_ZH = {person.name: person.name_zh for person in lx.PEOPLE}
TRANSLATION_TEMPLATES: tuple[TranslationTemplate, ...] = (
    _shape("animal_is", "The {noun} is {adj}.", "{noun}很{adj}。", 0.10, noun=lx.ANIMALS_ZH, adj=lx.ANIMAL_ADJECTIVES_ZH),
    _shape("food_is", "The {noun} is {adj}.", "{noun}很{adj}。", 0.08, noun=lx.FOOD_NOUNS_ZH, adj=lx.FOOD_ADJECTIVES_ZH),
    _shape("thing_is", "The {noun} is {adj}.", "{noun}很{adj}。", 0.10, noun=lx.THINGS_ZH, adj=lx.THING_ADJECTIVES_ZH),
    _shape("color_animal_is", "The {color} {noun} is {adj}.", "{color}{noun}很{adj}。", 0.10,
           color=lx.COLORS_ZH, noun=lx.ANIMALS_ZH, adj=lx.ANIMAL_ADJECTIVES_ZH),
    _shape("color_apple_is", "The {color} apple is {adj}.", "{color}苹果很{adj}。", 0.06,
           color=lx.APPLE_COLORS_ZH, adj=lx.FOOD_ADJECTIVES_ZH),
    _shape("color_thing_is", "The {color} {noun} is {adj}.", "{color}{noun}很{adj}。", 0.10,
           color=lx.COLORS_ZH, noun=lx.THINGS_ZH, adj=lx.THING_ADJECTIVES_ZH),
    _shape("likes_animals", "{name} likes {noun}.", "{name}喜欢{noun}。", 0.10, name=_NAMES_ZH, noun=lx.LIKED_ANIMALS_ZH),
    _shape("likes_things", "{name} likes {noun}.", "{name}喜欢{noun}。", 0.10, name=_NAMES_ZH, noun=lx.LIKED_THINGS_ZH),
    _shape("is_in_town", "{name} is in {town}.", "{name}在{town}。", 0.16, name=_NAMES_ZH, town=lx.TOWNS_ZH),
    _shape("we_eat", "We eat {food} today.", "我们今天吃{food}。", 0.04, food=lx.MEALS_ZH),
    _shape("i_have_pet", "I have a {pet}.", "我有一只{pet}。", 0.04, pet=lx.SMALL_PETS_ZH),
    _shape("temperature", "It is {temp} today.", "今天很{temp}。", 0.02, temp=lx.TEMPERATURES_ZH),
)


def _pairs_of(template: TranslationTemplate) -> list[TranslationPair]:
    names = [name for name, _ in template.fields]
    vocabularies = [vocabulary for _, vocabulary in template.fields]
    pairs = []
    for words in itertools.product(*(list(vocabulary) for vocabulary in vocabularies)):
        english = template.english.format(**dict(zip(names, words)))
        chinese = template.chinese.format(**{n: v[w] for n, v, w in zip(names, vocabularies, words)})
        pairs.append(TranslationPair(english, chinese, template.key, tuple(words)))
    return pairs


@lru_cache(maxsize=1)
def translation_pairs() -> tuple[TranslationPair, ...]:
    """All English–Chinese sentence pairs of the world; the mapping is one-to-one both ways."""
    pairs = [pair for template in TRANSLATION_TEMPLATES for pair in _pairs_of(template)]
    if len({pair.english for pair in pairs}) != len(pairs) or len({pair.chinese for pair in pairs}) != len(pairs):
        raise AssertionError("translation lexicon is ambiguous: two pairs share a sentence")
    return tuple(pairs)


@lru_cache(maxsize=1)
def english_to_chinese() -> dict[str, str]:
    return {pair.english: pair.chinese for pair in translation_pairs()}


@lru_cache(maxsize=1)
def chinese_to_english() -> dict[str, str]:
    return {pair.chinese: pair.english for pair in translation_pairs()}


@lru_cache(maxsize=1)
def _pairs_by_sentence() -> dict[str, TranslationPair]:
    return {text: pair for pair in translation_pairs() for text in (pair.english, pair.chinese)}


def pair_of(sentence: str) -> TranslationPair:
    """The pair containing ``sentence`` in either language (KeyError if there is none)."""
    return _pairs_by_sentence()[sentence]


@lru_cache(maxsize=1)
def _pairs_by_template() -> dict[str, tuple[TranslationPair, ...]]:
    grouped: dict[str, list[TranslationPair]] = {}
    for pair in translation_pairs():
        grouped.setdefault(pair.template_key, []).append(pair)
    return {key: tuple(pairs) for key, pairs in grouped.items()}


def sample_translation_pair(rng: random.Random) -> TranslationPair:
    """A pair drawn shape-first, so rare shapes (e.g. "I have a cat.") still show up."""
    template = rng.choices(TRANSLATION_TEMPLATES, weights=[t.weight for t in TRANSLATION_TEMPLATES], k=1)[0]
    return rng.choice(_pairs_by_template()[template.key])


def near_miss_pair(pair: TranslationPair, rng: random.Random) -> TranslationPair:
    """A pair of the same shape that differs in exactly one word: a plausible wrong translation."""
    candidates = [
        other for other in _pairs_by_template()[pair.template_key]
        if sum(a != b for a, b in zip(other.words, pair.words)) == 1
    ]
    return rng.choice(candidates)
