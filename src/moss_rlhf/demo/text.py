"""Small text-analysis helpers shared by the demo world generator and its gold judge.

Both sides must agree on what a "word", a "sentence", "English" or "Chinese" is, and on
how the sentiment of a sentence is read from the fixed lexicon; keeping those rules in one
module is what guarantees the generator's labels and the judge's checks never drift apart.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from moss_rlhf.demo.lexicon import NEGATION_WORDS, NEGATIVE_WORDS, POSITIVE_WORDS

# A token is an English word, a number, or a single Chinese character: Chinese has no
# spaces, so counting characters keeps length and overlap comparable across languages.
_TOKEN_RE = re.compile(r"[A-Za-z]+|\d+|[\u4e00-\u9fff]")
_LATIN_WORD_RE = re.compile(r"[A-Za-z]+")
_CJK_RE = re.compile(r"[\u4e00-\u9fff]")
_SENTENCE_SPLIT_RE = re.compile(r"(?<=[.!?。！？])\s*")


def tokens(text: str) -> list[str]:
    """Lower-cased tokens of ``text`` (English words, numbers, Chinese characters)."""
    return [token.lower() for token in _TOKEN_RE.findall(text)]


def normalized(text: str) -> str:
    """``text`` reduced to its tokens, for comparisons that ignore case, spacing and punctuation."""
    return " ".join(tokens(text))


def sentences(text: str) -> list[str]:
    """Non-empty sentences of ``text``, split after English or Chinese end punctuation."""
    return [part.strip() for part in _SENTENCE_SPLIT_RE.split(text.strip()) if part.strip()]


def language_share(text: str, language: str) -> float:
    """Share of the words in ``text`` that are in ``language`` ("en" or "zh").

    Only English words and Chinese characters count; digits and punctuation are neutral.
    A text with no words at all has share 0, so an empty or punctuation-only answer never
    passes as being in the right language.
    """
    english = len(_LATIN_WORD_RE.findall(text))
    chinese = len(_CJK_RE.findall(text))
    if english + chinese == 0:
        return 0.0
    return (english if language == "en" else chinese) / (english + chinese)


def contains_phrase(text: str, phrase: str) -> bool:
    """Whether ``phrase`` occurs in ``text`` as whole words (case-insensitive).

    Chinese phrases match as plain substrings, since Chinese has no word boundaries.
    """
    if _CJK_RE.search(phrase):
        return phrase in text
    pattern = r"(?<![A-Za-z])" + re.escape(phrase.lower()) + r"(?![A-Za-z])"
    return re.search(pattern, text.lower()) is not None


def count_phrases(text: str, phrases: Iterable[str]) -> int:
    """How many of ``phrases`` occur in ``text`` (each counted once)."""
    return sum(1 for phrase in phrases if contains_phrase(text, phrase))


def polarity_counts(text: str) -> tuple[int, int]:
    """(positive, negative) sentiment-word counts of ``text``, with simple negation.

    A sentiment word right after "not"/"never"/"n't" (within two words) counts for the
    opposite side, so "not good" reads as negative, as a person would read it.
    """
    words = tokens(text)
    positive = negative = 0
    for index, word in enumerate(words):
        if word in POSITIVE_WORDS or word in NEGATIVE_WORDS:
            negated = any(previous in NEGATION_WORDS for previous in words[max(0, index - 2):index])
            is_positive = (word in POSITIVE_WORDS) != negated
            positive += is_positive
            negative += not is_positive
    return positive, negative


def polarity_label(text: str) -> str:
    """"positive", "negative" or "neutral" by the sign of the lexicon sentiment count."""
    positive, negative = polarity_counts(text)
    if positive > negative:
        return "positive"
    if negative > positive:
        return "negative"
    return "neutral"


def repetition_score(text: str) -> float:
    """1.0 for text without repetition, falling towards 0 for degenerate, repeated text.

    Two signals, the worse one wins: the share of distinct sentences (catches "A. A. A.")
    and the share of distinct word trigrams (catches "thank you thank you thank you" and
    loops inside one sentence). A little repetition is normal, so trigram diversity above
    0.9 counts as fully diverse.
    """
    words = tokens(text)
    if not words:
        return 0.0
    sentence_keys = [normalized(sentence) for sentence in sentences(text)]
    sentence_keys = [key for key in sentence_keys if key]
    sentence_diversity = len(set(sentence_keys)) / len(sentence_keys) if sentence_keys else 1.0
    trigram_diversity = 1.0
    if len(words) >= 6:
        trigrams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
        distinct_share = len(set(trigrams)) / len(trigrams)
        trigram_diversity = min(1.0, max(0.0, (distinct_share - 0.4) / 0.5))
    return min(sentence_diversity, trigram_diversity)


def token_f1(candidate: str, reference: str) -> float:
    """Bag-of-tokens F1 between ``candidate`` and ``reference`` (0 when either is empty)."""
    candidate_tokens, reference_tokens = tokens(candidate), tokens(reference)
    if not candidate_tokens or not reference_tokens:
        return 0.0
    remaining = list(reference_tokens)
    overlap = 0
    for token in candidate_tokens:
        if token in remaining:
            remaining.remove(token)
            overlap += 1
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(candidate_tokens), overlap / len(reference_tokens)
    return 2 * precision * recall / (precision + recall)
