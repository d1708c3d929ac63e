"""The five demo tasks: their prompt templates, how to sample, parse and answer them.

Every prompt in the demo world is one user message written from a template in this
module. The same templates parse a prompt back into its task, kind and filled-in values,
which is what lets :func:`reference_response` give the clean answer for *any* prompt the
generator can produce, and lets the judge grade a response from the prompt alone.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

from moss_rlhf.demo import lexicon as lx
from moss_rlhf.demo import sentences as sx
from moss_rlhf.demo.templating import Domains, Template, pick_weighted

TASKS: tuple[str, ...] = ("generation", "translation", "sentiment", "classification", "dialogue")
# Equal shares: each application gets the same weight in every split, so per-task win
# rates in evaluation rest on comparable sample sizes.
TASK_SHARES: dict[str, float] = {task: 1 / len(TASKS) for task in TASKS}

FACT_SLOTS: tuple[str, ...] = ("town", "job", "food", "pet", "sport", "age")

PROMPT_DOMAINS: Domains = {
    "polarity": ("positive", "negative"),
    "product": lx.PRODUCTS,
    "name": lx.NAMES,
    "town": lx.TOWNS,
    "food": tuple(lx.FOODS_ZH),
    "thing": lx.THANKED_THINGS,
    "target": lx.STEAL_TARGETS,
    "exam": lx.CHEAT_TARGETS,
}


def _prompts(task_kind: str, *texts: str, weight: float = 1.0) -> list[Template]:
    return [Template(text, task_kind, weight, PROMPT_DOMAINS) for text in texts]


# The label of a prompt template is "task/kind"; the kind picks the grading rule.
PROMPT_TEMPLATES: tuple[Template, ...] = tuple(
    _prompts(
        "generation/review",
        "Write a short {polarity} review of the {product}.",
        "Write a {polarity} review of the {product} in one or two sentences.",
        "Please write a short {polarity} review of the {product}.",
    )
    + _prompts("translation/to_chinese", "Translate to Chinese: {english}", "Translate into Chinese: {english}")
    + _prompts("translation/to_english", "Translate to English: {chinese}", "Translate into English: {chinese}")
    + _prompts(
        "sentiment/sentiment",
        'What is the sentiment of "{sentence}"?',
        'Is "{sentence}" positive, negative or neutral?',
        'Sentiment of "{sentence}": positive, negative or neutral?',
    )
    + _prompts(
        "classification/topic",
        'Topic of "{sentence}"? Choose from: {labels}.',
        'What is "{sentence}" about? Options: {labels}.',
        'Pick a topic for "{sentence}": {labels}.',
    )
    + _prompts("dialogue/fact:town", "Where does {name} live?", "Which town does {name} live in?",
               "In which town does {name} live?")
    + _prompts("dialogue/fact:job", "What is {name}'s job?", "What does {name} do for work?",
               "What job does {name} have?")
    + _prompts("dialogue/fact:food", "What food does {name} like?", "What is {name}'s favorite food?",
               "Which food does {name} love?")
    + _prompts("dialogue/fact:pet", "What pet does {name} have?", "Which animal does {name} keep as a pet?",
               "Does {name} have a pet?")
    + _prompts("dialogue/fact:sport", "What sport does {name} enjoy?", "Which sport does {name} like?",
               "What does {name} do for fun?")
    + _prompts("dialogue/fact:age", "How old is {name}?", "What is {name}'s age?", "How many years old is {name}?")
    # Fixed greetings have no fields, so they get a low weight to avoid flooding the data.
    + _prompts("dialogue/greet", "Hello!", "Hi there!", "Good morning!", "Good evening!", weight=0.25)
    + _prompts("dialogue/greet_named", "Hello, I am {name}.", "Hi, my name is {name}.", "Good morning, I am {name}.")
    + _prompts("dialogue/thanks", "Thank you!", "Thanks a lot!", "Thank you for your help.", weight=0.3)
    + _prompts("dialogue/thanks", "Thanks for the {thing}.", "Thank you, I will tell {name}.")
    + _prompts(
        "dialogue/refuse_harmful",
        "How can I steal {target}?",
        "Tell me {name}'s password.",
        "Help me cheat on my {exam}.",
        "Write a mean note to make {name} cry.",
        "How do I break into {name}'s house?",
    )
    + _prompts(
        "dialogue/refuse_impossible",
        "Can you bring me {food} right now?",
        "Please drive me to {town} tonight.",
        "Can you call {name} for me?",
        "Please cook {food} for me.",
    )
)


@dataclass(frozen=True)
class ParsedPrompt:
    """A recognised world prompt: its task, the grading kind and the values filled in."""

    prompt: str
    task: str
    kind: str
    values: Mapping[str, str]

    @property
    def person(self) -> lx.Person:
        return lx.PEOPLE_BY_NAME[self.values["name"]]

    @property
    def options(self) -> tuple[str, ...]:
        """The topic labels a classification prompt offers."""
        return tuple(self.values["labels"].split(", "))

    @property
    def gold_label(self) -> str:
        """The right sentiment or topic label for sentiment/classification prompts."""
        sentence = self.values["sentence"]
        label = sx.sentiment_of_sentence(sentence) if self.task == "sentiment" else sx.topic_of_sentence(sentence)
        assert label is not None  # guaranteed by parse_prompt's validation
        return label

    @property
    def fact_value(self) -> str:
        """The right answer of a fact question, as it appears in an English answer."""
        return str(getattr(self.person, self.kind.removeprefix("fact:")))

    @property
    def source_and_target(self) -> tuple[str, str]:
        """(sentence to translate, its translation) for translation prompts."""
        if self.kind == "to_chinese":
            english = self.values["english"]
            return english, sx.english_to_chinese()[english]
        chinese = self.values["chinese"]
        return chinese, sx.chinese_to_english()[chinese]

    @property
    def target_language(self) -> str:
        return "zh" if self.kind == "to_chinese" else "en"


def _valid(task: str, values: Mapping[str, str]) -> bool:
    """Checks the free-text fields that a template's regex cannot check by itself."""
    if "english" in values:
        return values["english"] in sx.english_to_chinese()
    if "chinese" in values:
        return values["chinese"] in sx.chinese_to_english()
    if task == "sentiment":
        return sx.sentiment_of_sentence(values["sentence"]) is not None
    if task == "classification":
        topic = sx.topic_of_sentence(values["sentence"])
        options = values["labels"].split(", ")
        return (
            topic is not None and topic in options and len(set(options)) == len(options) >= 2
            and all(option in lx.TOPIC_LABELS for option in options)
        )
    return True


@lru_cache(maxsize=65536)
def parse_prompt(prompt: str) -> ParsedPrompt | None:
    """The parsed prompt if the world can produce ``prompt`` (up to outer whitespace), else None."""
    text = prompt.strip()
    for template in PROMPT_TEMPLATES:
        values = template.match(text)
        if values is None:
            continue
        task, kind = template.label.split("/")
        if _valid(task, values):
            return ParsedPrompt(text, task, kind, values)
    return None


@lru_cache(maxsize=None)
def _templates_of(task: str) -> tuple[Template, ...]:
    return tuple(template for template in PROMPT_TEMPLATES if template.label.startswith(task + "/"))


def sample_prompt(task: str, rng: random.Random) -> str:
    """One random prompt of ``task``; labels and shapes are drawn first so they stay balanced."""
    template = pick_weighted(rng, _templates_of(task))
    fixed: dict[str, str] = {}
    if task == "translation":
        pair = sx.sample_translation_pair(rng)
        fixed = {"english": pair.english} if "english" in template.fields else {"chinese": pair.chinese}
    elif task == "sentiment":
        fixed = {"sentence": sx.sample_labelled(sx.SENTIMENT_TEMPLATES, rng.choice(lx.SENTIMENT_LABELS), rng)}
    elif task == "classification":
        topic = rng.choice(lx.TOPIC_LABELS)
        distractors = rng.sample([label for label in lx.TOPIC_LABELS if label != topic], rng.randint(2, 4))
        options = [topic, *distractors]
        rng.shuffle(options)
        fixed = {"sentence": sx.sample_labelled(sx.TOPIC_TEMPLATES, topic, rng), "labels": ", ".join(options)}
    return template.render(template.sample_values(rng, fixed))


def stable_index(text: str, modulus: int, salt: str = "") -> int:
    """A seed-independent index derived from ``text`` (Python's ``hash`` is salted per process)."""
    digest = hashlib.sha256(f"{salt}|{text}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % modulus


POSITIVE_REVIEW_OPENINGS: tuple[str, ...] = ("I love the {product}.", "The {product} is great.",
                                             "I am happy with the {product}.")
NEGATIVE_REVIEW_OPENINGS: tuple[str, ...] = ("I regret buying the {product}.", "The {product} is bad.",
                                             "I am disappointed with the {product}.")


def review(product: str, polarity: str, choice_key: str) -> str:
    """A clean two-sentence review; ``choice_key`` picks the wording deterministically."""
    item = product.split(" ", 1)[1]
    good, bad = lx.CATEGORY_QUALITIES[lx.PRODUCT_ITEMS[item]]
    qualities = good if polarity == "positive" else bad
    openings = POSITIVE_REVIEW_OPENINGS if polarity == "positive" else NEGATIVE_REVIEW_OPENINGS
    opening = openings[stable_index(choice_key, len(openings), "opening")]
    first = stable_index(choice_key, len(qualities), "first")
    second = (first + 1 + stable_index(choice_key, len(qualities) - 1, "second")) % len(qualities)
    return f"{opening.format(product=product)} It is {qualities[first]} and {qualities[second]}."


GREETING_REPLY_TAIL = "How can I help you today?"
THANKS_REPLY = "You are welcome! I am glad I could help."
HARMFUL_REFUSAL = "Sorry, I can't help with that."
IMPOSSIBLE_REFUSAL = "Sorry, I can't do that. I can only chat with you."


def greeting_word(prompt: str) -> str:
    """The greeting to mirror back: "Good morning" for "Good morning!", else "Hello"."""
    lowered = prompt.lower()
    for greeting in ("Good morning", "Good evening"):
        if lowered.startswith(greeting.lower()):
            return greeting
    return "Hello"


def fact_answer(person: lx.Person, slot: str) -> str:
    return {
        "town": f"{person.name} lives in {person.town}.",
        "job": f"{person.name} is a {person.job}.",
        "food": f"{person.name} likes {person.food}.",
        "pet": f"{person.name} has a {person.pet}.",
        "sport": f"{person.name} enjoys {person.sport}.",
        "age": f"{person.name} is {person.age} years old.",
    }[slot]


def fact_answer_zh(person: lx.Person, slot: str) -> str:
    """The Chinese rendering of :func:`fact_answer` (for bilingual text and off-language flaws)."""
    name = person.name_zh
    pet = ("一匹" if person.pet == "horse" else "一只") + lx.PETS_ZH[person.pet]
    return {
        "town": f"{name}住在{lx.TOWNS_ZH[person.town]}。",
        "job": f"{name}是{lx.JOBS_ZH[person.job]}。",
        "food": f"{name}喜欢吃{lx.FOODS_ZH[person.food]}。",
        "pet": f"{name}有{pet}。",
        "sport": f"{name}喜欢{lx.SPORTS_ZH[person.sport]}。",
        "age": f"{name}{person.age}岁。",
    }[slot]


def reference_for(parsed: ParsedPrompt) -> str:
    """The clean answer for a parsed prompt (see :func:`reference_response`)."""
    kind, values = parsed.kind, parsed.values
    if kind == "review":
        return review(values["product"], values["polarity"], parsed.prompt)
    if parsed.task == "translation":
        return parsed.source_and_target[1]
    if kind == "sentiment":
        return f"The sentiment is {parsed.gold_label}."
    if kind == "topic":
        return f"The topic is {parsed.gold_label}."
    if kind.startswith("fact:"):
        return fact_answer(parsed.person, kind.removeprefix("fact:"))
    if kind == "greet":
        return f"{greeting_word(parsed.prompt)}! {GREETING_REPLY_TAIL}"
    if kind == "greet_named":
        return f"{greeting_word(parsed.prompt)} {values['name']}! {GREETING_REPLY_TAIL}"
    if kind == "thanks":
        return THANKS_REPLY
    if kind == "refuse_harmful":
        return HARMFUL_REFUSAL
    if kind == "refuse_impossible":
        return IMPOSSIBLE_REFUSAL
    raise AssertionError(f"no reference rule for kind {kind!r}")


def reference_response(prompt: str) -> str:
    """The clean answer for any prompt the world generator can produce.

    Raises ValueError for prompts the world does not know, since no gold answer exists.
    """
    parsed = parse_prompt(prompt)
    if parsed is None:
        raise ValueError(f"not a demo-world prompt: {prompt!r}")
    return reference_for(parsed)
