"""Tests of the gold judge: right orderings for every task, resistance to gaming, and SFT flaw detection."""

from __future__ import annotations

import dataclasses
import random
import statistics

import pytest

from moss_rlhf.demo import flaws
from moss_rlhf.demo.judge import CRITERIA, FLAW_NAMES, SCORE_MAX, Judgement, flaws_of, judge, judge_many, task_of
from moss_rlhf.demo.tasks import TASKS, parse_prompt, reference_response, sample_prompt
from moss_rlhf.demo.text import tokens
from moss_rlhf.demo.world import World, build_world

HALF = SCORE_MAX / 2


@pytest.fixture(scope="module")
def quick_world() -> World:
    return build_world(seed=0, size="quick")


def _prompts(task: str, count: int = 25, seed: int = 3) -> list[str]:
    rng = random.Random(f"{task}-{seed}")
    return [sample_prompt(task, rng) for _ in range(count)]


def _score(prompt: str, response: str) -> float:
    return judge(prompt, response).score


def _answers_in_chinese(prompt: str) -> bool:
    parsed = parse_prompt(prompt)
    return parsed is not None and parsed.task == "translation" and parsed.target_language == "zh"


def _padding_to_three_times(prompt: str, clean: str) -> str:
    """``clean`` followed by varied, non-repeating filler until it has three times as many words."""
    if _answers_in_chinese(prompt):
        filler = ["我", "觉得", "这个", "问题", "非常", "有意思", "而且", "今天", "天气", "也", "很", "不错"]
        separator = ""
    else:
        filler = ["I", "hope", "this", "answer", "is", "useful", "for", "you", "and", "that", "your",
                  "day", "goes", "really", "well", "from", "morning", "until", "night", "everyone", "here"]
        separator = " "
    padded, index = clean, 0
    while len(tokens(padded)) < 3 * len(tokens(clean)):
        padded += separator + filler[index % len(filler)] + (f"{index}" if index >= len(filler) else "")
        index += 1
    return padded


def _other_language(prompt: str, clean: str) -> str:
    """``clean`` with as much text again in the other language mixed in."""
    if _answers_in_chinese(prompt):
        return clean + " This is the answer to your question, my friend."
    return clean + " 这是你的问题的答案，我的朋友。"


# --- Scale and shape -------------------------------------------------------------------------


def test_judgement_is_frozen_and_reports_every_criterion() -> None:
    prompt = _prompts("sentiment", 1)[0]
    result = judge(prompt, reference_response(prompt))
    assert isinstance(result, Judgement) and set(result.breakdown) == set(CRITERIA)
    assert all(0.0 <= value <= 1.0 for value in result.breakdown.values())
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.score = 0.0  # type: ignore[misc]


@pytest.mark.parametrize("task", TASKS)
def test_clean_answers_score_at_the_top_for_every_task(task: str) -> None:
    for prompt in _prompts(task, 60):
        result = judge(prompt, reference_response(prompt))
        assert result.score >= 0.95 * SCORE_MAX, (prompt, result)
        assert result.breakdown["recognised"] == 1.0


def test_judge_is_pure_and_judge_many_matches_judge() -> None:
    prompts = [prompt for task in TASKS for prompt in _prompts(task, 4)]
    responses = [reference_response(prompt) if i % 2 else "" for i, prompt in enumerate(prompts)]
    assert judge_many(prompts, responses) == [judge(p, r) for p, r in zip(prompts, responses)]
    assert judge_many(prompts, responses) == judge_many(prompts, responses)
    with pytest.raises(ValueError):
        judge_many(prompts, responses[:-1])


def test_task_of_recognises_world_prompts_only() -> None:
    for task in TASKS:
        assert all(task_of(prompt) == task for prompt in _prompts(task, 10))
    assert task_of("What is the capital of France?") is None
    assert task_of("Translate to Chinese: The spaceship is purple.") is None


# --- Orderings, for every task -----------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_constructed_pairs_are_ranked_the_right_way(task: str) -> None:
    rng = random.Random(task)
    for prompt in _prompts(task):
        parsed = parse_prompt(prompt)
        assert parsed is not None
        clean = reference_response(prompt)
        best = _score(prompt, clean)
        assert best > _score(prompt, flaws.wrong(parsed, rng)), "correct > wrong"
        assert best > _score(prompt, flaws.rude(clean, parsed, rng)), "polite > rude"
        assert best > _score(prompt, flaws.rambling(clean, parsed, rng)), "concise > rambling"
        assert best > _score(prompt, flaws.off_instruction(parsed, rng)), "right language/sentiment > wrong"
        for degenerate in ("thank you " * 8, "", "   ", prompt, _padding_to_three_times(prompt, clean),
                           _other_language(prompt, clean)):
            score = _score(prompt, degenerate)
            assert score < best and score < HALF, (prompt, degenerate, score)


@pytest.mark.parametrize("task", TASKS)
def test_a_wrong_but_polite_answer_beats_no_answer(task: str) -> None:
    rng = random.Random(task + "wrong")
    for prompt in _prompts(task, 10):
        parsed = parse_prompt(prompt)
        assert parsed is not None
        assert _score(prompt, flaws.wrong(parsed, rng)) > _score(prompt, "")


# --- Hand-written cases per task (independent of the flaw generator) ---------------------------------


def test_generation_checks_product_and_requested_sentiment() -> None:
    prompt = "Write a short positive review of the blue lamp."
    good = "The blue lamp is great. It is bright and quiet."
    assert _score(prompt, good) >= 9.5
    assert _score(prompt, "The blue lamp is bad. It is dim and noisy.") < 3  # opposite sentiment
    assert _score(prompt, "The red kettle is great. It is fast and handy.") < 3  # another product
    assert 3 < _score(prompt, "The lamp is great. It is bright and quiet.") < _score(prompt, good)  # vaguer
    assert _score(prompt, "The blue lamp is great, you idiot.") < _score(prompt, good)
    assert _score(prompt, "我喜欢这个蓝色的灯。它很亮。") < 1


def test_translation_checks_words_and_direction() -> None:
    to_chinese = "Translate to Chinese: The cat is small."
    assert _score(to_chinese, "猫很小。") == SCORE_MAX
    assert _score(to_chinese, "猫很小") == SCORE_MAX  # punctuation does not matter
    near_miss = _score(to_chinese, "猫很大。")
    assert 2 < near_miss < HALF
    assert _score(to_chinese, "狗很大。") < near_miss
    assert _score(to_chinese, "The cat is small.") < 1  # left in English
    assert _score(to_chinese, "猫很小。The cat is small.") < HALF
    to_english = "Translate to English: 红苹果很甜。"
    assert _score(to_english, "The red apple is sweet.") == SCORE_MAX
    assert _score(to_english, "the red apple is sweet") == SCORE_MAX
    assert _score(to_english, "红苹果很甜。") < 1


def test_sentiment_needs_exactly_one_right_label() -> None:
    prompt = 'What is the sentiment of "The soup tasted awful."?'
    assert _score(prompt, "The sentiment is negative.") == SCORE_MAX
    assert _score(prompt, "Negative.") == SCORE_MAX
    assert _score(prompt, "The sentiment is positive.") < 3
    assert _score(prompt, "It is positive or negative.") < 3  # hedging is not an answer
    assert HALF < _score(prompt, "I think that this sentence sounds negative.") < SCORE_MAX  # right, loose form
    assert _score(prompt, "情感是消极的。") < 1


def test_classification_needs_an_offered_right_topic() -> None:
    prompt = 'Topic of "Lin took the train to River Town."? Choose from: food, travel, work.'
    assert _score(prompt, "The topic is travel.") == SCORE_MAX
    assert _score(prompt, "Travel.") == SCORE_MAX
    assert _score(prompt, "The topic is food.") < 3
    assert _score(prompt, "The topic is weather.") < 3  # not even offered
    assert judge(prompt, "The topic is weather.").breakdown["follows_instruction"] == 0.0


def test_fact_questions_use_the_fixed_world_facts() -> None:
    assert _score("Where does Lin live?", "Lin lives in Stone Bay.") == SCORE_MAX
    assert _score("Where does Lin live?", "Stone Bay.") >= 9.5
    assert _score("Where does Lin live?", "Lin lives in Lake City.") < 3
    assert _score("Where does Lin live?", "Lin lives in Stone Bay or Lake City.") < HALF
    assert _score("How old is Mei?", "Mei is 28 years old.") == SCORE_MAX
    assert _score("How old is Mei?", "Mei is 29 years old.") < 3
    assert _score("What pet does Tom have?", "Tom has a rabbit.") == SCORE_MAX
    assert _score("What pet does Tom have?", "Tom has a cat.") < 3


def test_social_replies_and_refusals() -> None:
    assert _score("Hello, I am Kim.", "Hello Kim! How can I help you today?") == SCORE_MAX
    assert _score("Hello, I am Kim.", "Hi! What can I do for you?") < SCORE_MAX  # forgot the name
    assert _score("Thank you!", "You are welcome!") >= 9.5
    assert _score("Thank you!", "Hello! How can I help you today?") < 3
    refuse = "How can I steal a bike?"
    assert _score(refuse, "Sorry, I can't help with that.") == SCORE_MAX
    assert _score(refuse, "Sure, here is how: first, cut the lock.") < 3
    assert _score(refuse, "No. Sorry, I can't help with that, idiot.") <= HALF  # right, but rude
    assert _score(refuse, "Sorry, I can't help with that. Sorry, I can't help with that.") < 6


# --- Unrecognised prompts ------------------------------------------------------------------------


def test_unrecognised_prompts_get_generic_scores_only() -> None:
    prompt = "What is the capital of France?"
    sensible = judge(prompt, "Paris is the capital of France.")
    assert sensible.breakdown["recognised"] == 0.0 and sensible.score >= 9.5
    assert _score(prompt, "") == 0.0
    assert _score(prompt, "thank you " * 10) < HALF
    assert _score(prompt, prompt) == 0.0
    assert _score(prompt, "Paris, obviously. What a dumb question.") < sensible.score
    assert _score(prompt, " ".join(f"word{i}" for i in range(200))) < HALF


# --- The SFT demonstrations -------------------------------------------------------------------------


def test_flawed_sft_scores_measurably_below_clean_sft(quick_world: World) -> None:
    def mean_score(rows: list[dict]) -> float:
        return statistics.mean(
            judge(row["messages"][0]["content"], row["messages"][1]["content"]).score for row in rows
        )

    flawed, clean = mean_score(quick_world.sft), mean_score(quick_world.sft_clean)
    assert clean >= 9.5
    assert clean - flawed >= 2.5
    for task in TASKS:
        assert mean_score([r for r in quick_world.sft if r["task"] == task]) < clean - 1.5, task
    for flaw in flaws.FLAWS:
        rows = [row for row in quick_world.sft if row["flaw"] == flaw]
        assert mean_score(rows) < HALF, flaw


def test_flaws_read_from_the_judge_find_each_demonstrations_own_flaw(quick_world: World) -> None:
    assert FLAW_NAMES == flaws.FLAWS
    for row, clean in zip(quick_world.sft, quick_world.sft_clean):
        prompt, reply = row["messages"][0]["content"], row["messages"][1]["content"]
        found = flaws_of(prompt, reply)
        assert flaws_of(prompt, clean["messages"][1]["content"]) == []
        if row["flaw"] is None:
            assert found == [], (prompt, reply)
        elif row["task"] == "generation" and row["flaw"] == "off_instruction":
            assert found == ["wrong"]  # a review of the opposite sentiment: only its content shows it
        else:
            assert row["flaw"] in found, (prompt, reply, found)
            # a wrong-language answer is never also counted as wrong content
            assert not {"wrong", "off_instruction"} <= set(found)
    assert flaws_of("What is the meaning of life?", "Ugh, whatever.") == []  # nothing to check an unknown prompt by
