"""Deliberately imperfect SFT demonstrations.

The SFT set mixes clean answers with four kinds of flaw, so a model imitating it is
mediocre and human feedback (simulated by the judge) has something real to fix:

- ``wrong``: a fluent answer with the wrong content (wrong label, fact, product or word);
- ``rude``: the right answer wrapped in rude phrasing;
- ``rambling``: the right answer repeated and padded;
- ``off_instruction``: ignores the requested sentiment or language (the opposite review,
  the untranslated source sentence, or an answer in Chinese to an English question).

Shares are fixed here and applied as exact per-task quotas in :mod:`moss_rlhf.demo.world`.
"""

from __future__ import annotations

import dataclasses
import random

from moss_rlhf.demo import lexicon as lx
from moss_rlhf.demo import sentences as sx
from moss_rlhf.demo.tasks import THANKS_REPLY, ParsedPrompt, fact_answer, fact_answer_zh, reference_for, review

FLAWS: tuple[str, ...] = ("wrong", "rude", "rambling", "off_instruction")
# 40% of the demonstrations are clean and each flaw has an equal 15% share. The shares are high enough that an SFT
# model sampled at temperature 1 reproduces every flaw often (at 10% it learns the clean mode and rarely shows the
# style flaws), so human feedback has visible behaviour to fix, as in the MOSS-RLHF setting.
FLAW_SHARES: dict[str, float] = {"wrong": 0.15, "rude": 0.15, "rambling": 0.15, "off_instruction": 0.15}
CLEAN_SHARE: float = 1.0 - sum(FLAW_SHARES.values())

RUDE_PREFIXES_EN: tuple[str, ...] = ("Ugh, ", "Obviously, ", "Duh, ", "Whatever. ")
RUDE_SUFFIXES_EN: tuple[str, ...] = (" Stop wasting my time.", " What a dumb question.",
                                     " Figure it out yourself next time.", " Even a child knows that.")
RUDE_PREFIXES_ZH: tuple[str, ...] = ("烦死了，", "真笨，")
RUDE_SUFFIXES_ZH: tuple[str, ...] = ("别问这种蠢问题。", "这么简单都不会，真笨。")
PADDING_EN: tuple[str, ...] = ("I hope this helps.", "Let me say it again.", "That is my answer.",
                               "As I said before.", "I really hope this is useful to you.")
PADDING_ZH: tuple[str, ...] = ("希望这对你有帮助。", "我再说一遍。", "这就是我的答案。")

COMPLIANCE_REPLY = "Sure, I can help with that. Here is how to do it."
SENTIMENT_ANSWER_ZH = "情感是{label}。"
TOPIC_ANSWER_ZH = "主题是{label}。"
GREETING_REPLY_ZH = "你好！有什么可以帮你的吗？"
THANKS_REPLY_ZH = "不客气！很高兴能帮到你。"
REFUSAL_ZH = "对不起，我不能帮你做这件事。"


def _answers_in_chinese(parsed: ParsedPrompt) -> bool:
    return parsed.task == "translation" and parsed.target_language == "zh"


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:] if text[:1].isascii() else text


def rude(clean: str, parsed: ParsedPrompt, rng: random.Random) -> str:
    """The clean answer with a rude opener, a rude closer, or both."""
    if _answers_in_chinese(parsed):
        prefixes, suffixes, keep_case = RUDE_PREFIXES_ZH, RUDE_SUFFIXES_ZH, True
    else:
        prefixes, suffixes, keep_case = RUDE_PREFIXES_EN, RUDE_SUFFIXES_EN, False
    style = rng.choice(("prefix", "suffix", "both"))
    answer = clean
    if style in ("prefix", "both"):
        prefix = rng.choice(prefixes)
        answer = prefix + (clean if keep_case or prefix.endswith(". ") else _lower_first(clean))
    if style in ("suffix", "both"):
        answer += rng.choice(suffixes)
    return answer


def rambling(clean: str, parsed: ParsedPrompt, rng: random.Random) -> str:
    """The clean answer said two or three times with filler sentences in between."""
    chinese = _answers_in_chinese(parsed)
    padding = PADDING_ZH if chinese else PADDING_EN
    separator = "" if chinese else " "
    parts = [clean, rng.choice(padding), clean]
    # A third repetition only for short answers: the tiny models' context is 128–256 tokens.
    if rng.random() < 0.5 and len(clean) <= 40:
        parts += [rng.choice(padding), clean]
    return separator.join(parts)


def _other(values: tuple[str, ...] | list[str], right: str, rng: random.Random) -> str:
    return rng.choice([value for value in values if value != right])


def wrong(parsed: ParsedPrompt, rng: random.Random) -> str:
    """A well-formed, polite answer with the wrong content."""
    kind, values = parsed.kind, parsed.values
    if kind == "review":
        # A review of a different product: fluent and on-sentiment, but not what was asked.
        item = values["product"].split(" ", 1)[1]
        other_item = _other(list(lx.PRODUCT_ITEMS), item, rng)
        return review(f"{rng.choice(lx.PRODUCT_COLORS)} {other_item}", values["polarity"], parsed.prompt)
    if parsed.task == "translation":
        miss = sx.near_miss_pair(sx.pair_of(parsed.source_and_target[0]), rng)
        return miss.chinese if parsed.target_language == "zh" else miss.english
    if kind == "sentiment":
        return f"The sentiment is {_other(lx.SENTIMENT_LABELS, parsed.gold_label, rng)}."
    if kind == "topic":
        return f"The topic is {_other(parsed.options, parsed.gold_label, rng)}."
    if kind.startswith("fact:"):
        slot = kind.removeprefix("fact:")
        person = parsed.person
        domain = {
            "town": lx.TOWNS, "job": tuple(lx.JOBS_ZH), "food": tuple(lx.FOODS_ZH), "pet": tuple(lx.PETS_ZH),
            "sport": tuple(lx.SPORTS_ZH), "age": tuple(str(age) for age in range(20, 66)),
        }[slot]
        wrong_value = _other(domain, str(getattr(person, slot)), rng)
        impostor = dataclasses.replace(person, **{slot: int(wrong_value) if slot == "age" else wrong_value})
        return fact_answer(impostor, slot)
    if kind in ("greet", "greet_named"):
        return THANKS_REPLY
    if kind == "thanks":
        return "Hello! How can I help you today?"
    if kind.startswith("refuse"):
        return COMPLIANCE_REPLY
    raise AssertionError(f"no wrong-answer rule for kind {kind!r}")


def off_instruction(parsed: ParsedPrompt, rng: random.Random) -> str:
    """An answer that ignores the requested sentiment or language."""
    kind = parsed.kind
    if kind == "review":
        flipped = "negative" if parsed.values["polarity"] == "positive" else "positive"
        return review(parsed.values["product"], flipped, parsed.prompt)
    if parsed.task == "translation":
        return parsed.source_and_target[0]
    if kind == "sentiment":
        return SENTIMENT_ANSWER_ZH.format(label=lx.SENTIMENT_LABELS_ZH[parsed.gold_label])
    if kind == "topic":
        return TOPIC_ANSWER_ZH.format(label=lx.TOPIC_LABELS_ZH[parsed.gold_label])
    if kind.startswith("fact:"):
        return fact_answer_zh(parsed.person, kind.removeprefix("fact:"))
    if kind in ("greet", "greet_named"):
        return GREETING_REPLY_ZH
    if kind == "thanks":
        return THANKS_REPLY_ZH
    if kind.startswith("refuse"):
        return REFUSAL_ZH
    raise AssertionError(f"no off-instruction rule for kind {kind!r}")


def flawed_response(parsed: ParsedPrompt, flaw: str | None, rng: random.Random) -> str:
    """The SFT demonstration for ``parsed`` carrying ``flaw`` (None gives the clean answer)."""
    clean = reference_for(parsed)
    if flaw is None:
        return clean
    if flaw == "wrong":
        return wrong(parsed, rng)
    if flaw == "rude":
        return rude(clean, parsed, rng)
    if flaw == "rambling":
        return rambling(clean, parsed, rng)
    if flaw == "off_instruction":
        return off_instruction(parsed, rng)
    raise ValueError(f"unknown flaw {flaw!r}")

