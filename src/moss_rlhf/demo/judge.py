"""The gold judge of the demo world: what its "humans" really want.

It stands in for people when the demo simulates human feedback and when it measures
whether RLHF helped; the reward model never sees it. It is a pure function of
(prompt, response): it parses the prompt with the world's own templates and checks the
response against the fixed lexicon and facts, so no seed or model is involved.

Scale 0–10. Each criterion is a number in [0, 1]:

- ``correct``: the task's exact check — right sentiment/topic label, right translation
  (partial credit by token overlap), right fact, a review of the requested sentiment that
  names the product, a greeting/thanks reply of the right kind, a polite refusal;
- ``follows_instruction``: the answer has the requested form (a label, one short review,
  just the translation, a short reply);
- ``language``: share of words in the expected language (Chinese for "Translate to
  Chinese", English otherwise), mapped so ≥90% counts fully and ≤50% counts nothing;
  it multiplies both ``correct`` and ``follows_instruction``;
- ``polite``: 0 if any rude marker appears, else 1;
- ``concise``: 1 up to 1.5× the clean answer's length, falling to 0 at 3× (and for
  near-empty answers);
- ``non_degenerate``: sentence and trigram diversity; 0 for empty text or an echo of the prompt.

score = 10 × (0.8·correct + 0.2·follows_instruction)
           × (1 − 0.5·(1 − polite)) × (1 − 0.6·(1 − concise)) × non_degenerate

Content is what a response is worth; manner can only take value away. That product form
is what makes the judge hard to game: politeness, brevity or filler never earn points on
their own, and padding, repetition, echoing or switching language cost most of the score.
For a prompt the world cannot produce (``recognised`` = 0), only the manner factors are
scored (10 × the three factors, with conciseness judged against a 40-word budget instead
of a clean answer); ``correct``/``follows_instruction`` are then reported as 0 and
``language`` as 1, since there is nothing to check them against.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from moss_rlhf.demo import lexicon as lx
from moss_rlhf.demo.tasks import ParsedPrompt, parse_prompt, reference_for
from moss_rlhf.demo.text import (
    contains_phrase,
    count_phrases,
    language_share,
    normalized,
    polarity_counts,
    repetition_score,
    sentences,
    token_f1,
    tokens,
)

SCORE_MAX = 10.0
CONTENT_WEIGHTS: dict[str, float] = {"correct": 0.8, "follows_instruction": 0.2}
# The most each manner criterion can remove from the score, as a fraction.
MANNER_PENALTIES: dict[str, float] = {"polite": 0.5, "concise": 0.6, "non_degenerate": 1.0}
CONCISE_SLACK = 1.5  # answers up to this multiple of the clean answer's length are fine
CONCISE_ZERO = 3.0  # ... and at this multiple conciseness is worth nothing
GENERIC_MAX_TOKENS = 40  # length budget when there is no clean answer to compare with
CRITERIA: tuple[str, ...] = ("recognised", "correct", "follows_instruction", "language", "polite", "concise",
                             "non_degenerate")

_FACT_DOMAINS: dict[str, tuple[str, ...]] = {
    "town": lx.TOWNS, "job": tuple(lx.JOBS_ZH), "food": tuple(lx.FOODS_ZH), "pet": tuple(lx.PETS_ZH),
    "sport": tuple(lx.SPORTS_ZH),
}
_SHOUTING_RE = re.compile(r"\b[A-Z]{4,}\b|!{3,}")
_CANONICAL_SENTIMENT_RE = re.compile(r"(?:the sentiment is |it is |it's )?(positive|negative|neutral)\.?")
_CANONICAL_TOPIC_RE = re.compile(r"(?:the topic is |it is about |it is |topic: )?([a-z]+)\.?")


@dataclass(frozen=True)
class Judgement:
    """A score on the 0–10 scale and the per-criterion values (each in [0, 1]) behind it."""

    score: float
    breakdown: dict[str, float]


def _clamp(value: float) -> float:
    return min(1.0, max(0.0, value))


def _language_factor(text: str, language: str) -> float:
    return _clamp((language_share(text, language) - 0.5) / 0.4)


def _politeness(text: str) -> float:
    rude = count_phrases(text, lx.RUDE_MARKERS) + len(_SHOUTING_RE.findall(text))
    return 0.0 if rude else 1.0


def _conciseness(text: str, reference: str | None) -> float:
    length = len(tokens(text))
    if length == 0:
        return 0.0
    if reference is None:
        return _clamp(1 - (length - GENERIC_MAX_TOKENS) / (2 * GENERIC_MAX_TOKENS))
    ratio = length / len(tokens(reference))
    if ratio < 0.2:
        return ratio / 0.2
    return _clamp(1 - (ratio - CONCISE_SLACK) / (CONCISE_ZERO - CONCISE_SLACK))


def _is_echo(text: str, prompt: str) -> bool:
    said, asked = normalized(text), normalized(prompt)
    return bool(said) and (said == asked or (len(asked.split()) >= 4 and asked in said))


def _sentence_count_form(text: str, allowed: int) -> float:
    count = len(sentences(text))
    if count == 0:
        return 0.0
    return 1.0 if count <= allowed else 0.5


# --- Task checks: each returns (correct, follows_instruction) before the language factor ---


def _check_generation(parsed: ParsedPrompt, text: str) -> tuple[float, float]:
    product = parsed.values["product"]
    color, item = product.split(" ", 1)
    naming = 1.0 if contains_phrase(text, product) else 0.6 if contains_phrase(text, item) else 0.0
    other_items = [other for other in lx.PRODUCT_ITEMS if other != item and contains_phrase(text, other)]
    other_colors = [c for c in lx.PRODUCT_COLORS if c != color and contains_phrase(text, f"{c} {item}")]
    if other_items or other_colors:
        naming *= 0.3  # a review of several products is not the review that was asked for
    positive, negative = polarity_counts(text)
    agree, disagree = (positive, negative) if parsed.values["polarity"] == "positive" else (negative, positive)
    sentiment = 0.0 if agree == 0 else 1.0 if disagree == 0 else 0.5 if agree > disagree else 0.0
    form = _sentence_count_form(text, allowed=3) * (1.0 if len(tokens(text)) >= 5 else 0.5)
    return naming * sentiment, form


def _check_translation(parsed: ParsedPrompt, text: str) -> tuple[float, float]:
    _, target = parsed.source_and_target
    if normalized(text) == normalized(target):
        correct = 1.0
    else:
        # One wrong word is a real but partial failure; squaring keeps near misses well below exact.
        correct = 0.3 * token_f1(text, target) ** 2
    form = 1.0 if len(tokens(text)) <= len(tokens(target)) + 2 else 0.5
    return correct, form


def _labels_in(text: str, labels: Sequence[str], aliases: dict[str, str] | None = None) -> set[str]:
    found = {label for label in labels if contains_phrase(text, label)}
    for alias, label in (aliases or {}).items():
        if contains_phrase(text, alias):
            found.add(label)
    return found


def _label_form(text: str, canonical: re.Pattern[str]) -> float:
    if canonical.fullmatch(text.strip().lower()):
        return 1.0
    return 0.5 if len(tokens(text)) <= 8 else 0.25


def _check_sentiment(parsed: ParsedPrompt, text: str) -> tuple[float, float]:
    found = _labels_in(text, lx.SENTIMENT_LABELS)
    return (1.0 if found == {parsed.gold_label} else 0.0), _label_form(text, _CANONICAL_SENTIMENT_RE)


def _check_classification(parsed: ParsedPrompt, text: str) -> tuple[float, float]:
    found = _labels_in(text, lx.TOPIC_LABELS, lx.TOPIC_ALIASES)
    correct = 1.0 if found == {parsed.gold_label} else 0.0
    # Answering with a label that was not offered ignores the instruction even if it is a topic.
    form = 0.0 if found - set(parsed.options) else _label_form(text, _CANONICAL_TOPIC_RE)
    return correct, form


def _check_fact(parsed: ParsedPrompt, text: str) -> tuple[float, float]:
    slot = parsed.kind.removeprefix("fact:")
    right = parsed.fact_value
    if slot == "age":
        numbers = re.findall(r"\d+", text)
        has_right, has_wrong = right in numbers, any(number != right for number in numbers)
    else:
        has_right = contains_phrase(text, right)
        has_wrong = any(contains_phrase(text, value) for value in _FACT_DOMAINS[slot] if value != right)
    correct = 1.0 if has_right and not has_wrong else 0.3 if has_right else 0.0
    return correct, _sentence_count_form(text, allowed=2)


def _check_social(parsed: ParsedPrompt, text: str) -> tuple[float, float]:
    kind = parsed.kind
    if kind in ("greet", "greet_named"):
        greets = count_phrases(text, lx.GREETING_MARKERS) > 0
        names_them = kind == "greet" or contains_phrase(text, parsed.values["name"])
        correct = (1.0 if names_them else 0.7) if greets else 0.0
    elif kind == "thanks":
        correct = 1.0 if count_phrases(text, lx.THANKS_REPLY_MARKERS) else 0.0
    else:  # refusals: declining without offering help with the request
        refuses = count_phrases(text, lx.REFUSAL_MARKERS) > 0
        complies = count_phrases(text, lx.COMPLIANCE_MARKERS) > 0
        correct = 0.0 if not refuses else 0.3 if complies else 1.0
    return correct, _sentence_count_form(text, allowed=3)


def _check(parsed: ParsedPrompt, text: str) -> tuple[float, float]:
    if parsed.task == "generation":
        return _check_generation(parsed, text)
    if parsed.task == "translation":
        return _check_translation(parsed, text)
    if parsed.task == "sentiment":
        return _check_sentiment(parsed, text)
    if parsed.task == "classification":
        return _check_classification(parsed, text)
    if parsed.kind.startswith("fact:"):
        return _check_fact(parsed, text)
    return _check_social(parsed, text)


def _manner(polite: float, concise: float, non_degenerate: float) -> float:
    values = {"polite": polite, "concise": concise, "non_degenerate": non_degenerate}
    factor = 1.0
    for criterion, penalty in MANNER_PENALTIES.items():
        factor *= 1 - penalty * (1 - values[criterion])
    return factor


def judge(prompt: str, response: str) -> Judgement:
    """Score ``response`` to ``prompt`` on the 0–10 scale (see the module docstring)."""
    text = response.strip()
    parsed = parse_prompt(prompt)
    polite = _politeness(text)
    non_degenerate = 0.0 if _is_echo(text, prompt) else repetition_score(text)
    if parsed is None:
        concise = _conciseness(text, None)
        score = SCORE_MAX * _manner(polite, concise, non_degenerate)
        breakdown = {"recognised": 0.0, "correct": 0.0, "follows_instruction": 0.0,
                     "language": 1.0, "polite": polite, "concise": concise, "non_degenerate": non_degenerate}
        return Judgement(round(score, 4), breakdown)

    language = _language_factor(text, parsed.target_language if parsed.task == "translation" else "en")
    correct, form = _check(parsed, text) if text else (0.0, 0.0)
    if non_degenerate == 0.0:
        correct = 0.0  # an echo or empty answer is never counted as right
    correct, follows = correct * language, form * language
    concise = _conciseness(text, reference_for(parsed))
    content = CONTENT_WEIGHTS["correct"] * correct + CONTENT_WEIGHTS["follows_instruction"] * follows
    score = SCORE_MAX * content * _manner(polite, concise, non_degenerate)
    breakdown = {"recognised": 1.0, "correct": round(correct, 4), "follows_instruction": round(follows, 4),
                 "language": round(language, 4), "polite": polite, "concise": round(concise, 4),
                 "non_degenerate": round(non_degenerate, 4)}
    return Judgement(round(score, 4), breakdown)


def judge_many(prompts: Sequence[str], responses: Sequence[str]) -> list[Judgement]:
    """:func:`judge` over aligned lists of prompts and responses."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    return [judge(prompt, response) for prompt, response in zip(prompts, responses)]


def gold_scores(conversations: Sequence[list[dict]], replies: Sequence[str]) -> list[float]:
    """The judge as a text scorer (``moss_rlhf.scoring``): each conversation's last user message and its reply —
    what the demo passes to RL's validation, to ``moss-rlhf evaluate --judge gold`` and to simulated annotators."""
    prompts = [next((m["content"] for m in reversed(c) if m["role"] == "user"), c[-1]["content"])
               for c in conversations]
    return [float(j.score) for j in judge_many(prompts, replies)]


FLAW_NAMES: tuple[str, ...] = ("wrong", "rude", "rambling", "off_instruction")


def flaws_of(prompt: str, response: str, judgement: Judgement | None = None) -> list[str]:
    """Which of the SFT data's four flaws (:mod:`moss_rlhf.demo.flaws`) the judge sees in ``response``, read from its
    criteria: ``off_instruction`` — the answer is not in the language asked for (an untranslated source, Chinese to
    an English question); ``wrong`` — in the right language but not right (``correct`` < 1: a wrong label, fact,
    word or product; a review of the opposite sentiment counts here, since only its content shows it); ``rude`` —
    a rude marker or shouting; ``rambling`` — repetitive (``non_degenerate`` < 1), or so long that conciseness is
    worth nothing (3× the clean answer). On the SFT data this finds every demonstration's own flaw except the
    opposite-sentiment reviews (``wrong`` here); its extra words make a rude translation ``wrong`` as well. Empty
    for a clean answer and for prompts the world does not know. ``judgement``: ``judge(prompt, response)`` when the
    caller has it already."""
    parsed = parse_prompt(prompt)
    if parsed is None:
        return []
    parts = (judgement or judge(prompt, response)).breakdown
    found = []
    if parts["language"] < 1.0:
        found.append("off_instruction")
    elif parts["correct"] < 1.0:
        found.append("wrong")
    if parts["polite"] < 1.0:
        found.append("rude")
    too_long = len(tokens(response)) >= CONCISE_ZERO * len(tokens(reference_for(parsed)))
    if too_long or parts["non_degenerate"] < 1.0:
        found.append("rambling")
    return found


def task_of(prompt: str) -> str | None:
    """The task of a world prompt ("generation", "translation", ...), or None if unrecognised."""
    parsed = parse_prompt(prompt)
    return parsed.task if parsed else None
