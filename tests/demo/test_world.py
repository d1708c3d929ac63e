"""Tests of the embedded demo world: determinism, sizes, shares, held-out splits and consistency."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from moss_rlhf.demo import lexicon as lx
from moss_rlhf.demo import sentences as sx
from moss_rlhf.demo.flaws import CLEAN_SHARE, FLAW_SHARES
from moss_rlhf.demo.judge import task_of
from moss_rlhf.demo.tasks import TASK_SHARES, TASKS, parse_prompt, reference_response, sample_prompt
from moss_rlhf.demo.text import polarity_label
from moss_rlhf.demo.world import FILE_NAMES, SIZES, WORLD_VERSION, World, build_world, quotas, write_world

CJK = re.compile(r"[\u4e00-\u9fff]")


@pytest.fixture(scope="module")
def quick_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("quick_seed0")
    write_world(directory, seed=0, size="quick")
    return directory


@pytest.fixture(scope="module")
def default_world() -> World:
    return build_world(seed=0, size="default")


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _training_prompts(world: World) -> set[str]:
    prompts = {row["messages"][0]["content"] for row in world.sft + world.sft_clean}
    return prompts | {row["prompt"] for row in world.preference_prompts + world.rl_prompts}


# --- Determinism and files ----------------------------------------------------------------


def test_same_seed_writes_identical_bytes(quick_dir: Path, tmp_path: Path) -> None:
    write_world(tmp_path, seed=0, size="quick")
    for name in (*FILE_NAMES, "world.json"):
        assert (quick_dir / name).read_bytes() == (tmp_path / name).read_bytes(), name


def test_bytes_do_not_depend_on_the_process_hash_seed(quick_dir: Path, tmp_path: Path) -> None:
    import moss_rlhf

    source_root = str(Path(moss_rlhf.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": source_root}
    code = f"from moss_rlhf.demo.world import write_world; write_world({str(tmp_path)!r}, seed=0, size='quick')"
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    for name in (*FILE_NAMES, "world.json"):
        assert (quick_dir / name).read_bytes() == (tmp_path / name).read_bytes(), name


def test_different_seed_gives_different_data(quick_dir: Path, tmp_path: Path) -> None:
    write_world(tmp_path, seed=1, size="quick")
    for name in FILE_NAMES:
        assert (quick_dir / name).read_bytes() != (tmp_path / name).read_bytes(), name


def test_world_json_records_version_counts_and_shares(quick_dir: Path, tmp_path: Path) -> None:
    returned = write_world(tmp_path, seed=0, size="quick")
    written = json.loads((quick_dir / "world.json").read_text(encoding="utf-8"))
    assert written == returned
    assert written["version"] == WORLD_VERSION and written["seed"] == 0 and written["size"] == "quick"
    for name in FILE_NAMES:
        assert written["counts"][name] == len(_lines(quick_dir / name))
        assert written["bytes"][name] == (quick_dir / name).stat().st_size
    assert written["task_shares"] == pytest.approx(TASK_SHARES)
    assert written["flaw_shares"] == pytest.approx({**FLAW_SHARES, "clean": CLEAN_SHARE})


def test_only_final_files_are_left_behind(quick_dir: Path) -> None:
    assert sorted(path.name for path in quick_dir.iterdir()) == sorted([*FILE_NAMES, "world.json"])


def test_files_are_utf8_json_lines_with_readable_chinese(quick_dir: Path) -> None:
    text = (quick_dir / "pretrain.jsonl").read_text(encoding="utf-8")
    assert CJK.search(text) and "\\u" not in text  # ensure_ascii=False keeps Chinese readable
    assert {tuple(row) for row in _lines(quick_dir / "pretrain.jsonl")} == {("text",), ("messages",)}
    for row in _lines(quick_dir / "sft.jsonl"):
        assert set(row) == {"messages", "task", "flaw"}
        assert [message["role"] for message in row["messages"]] == ["user", "assistant"]
    for name in ("preference_prompts.jsonl", "rl_prompts.jsonl", "eval_prompts.jsonl"):
        assert all(set(row) == {"prompt", "task"} for row in _lines(quick_dir / name))


def test_unknown_size_is_rejected() -> None:
    with pytest.raises(ValueError):
        build_world(size="huge")


# --- Sizes and shares ------------------------------------------------------------------------


def test_default_sizes(default_world: World) -> None:
    pretrain_bytes = sum(len(json.dumps(r, ensure_ascii=False).encode()) for r in default_world.records()["pretrain.jsonl"])
    assert 1_500_000 <= pretrain_bytes <= 3_000_000
    assert 2000 <= len(default_world.sft) <= 4000 and len(default_world.sft_clean) == len(default_world.sft)
    assert 400 <= len(default_world.preference_prompts) <= 700
    assert 800 <= len(default_world.rl_prompts) <= 1300
    assert len(default_world.eval_prompts) >= 300
    assert len(default_world.pretrain_eval) > 0


def test_quick_is_about_ten_times_smaller_but_keeps_200_eval_prompts(quick_dir: Path) -> None:
    stats = json.loads((quick_dir / "world.json").read_text(encoding="utf-8"))
    default = SIZES["default"]
    assert 5 <= default.pretrain_bytes / stats["bytes"]["pretrain.jsonl"] <= 15
    assert 5 <= default.sft / stats["counts"]["sft.jsonl"] <= 15
    assert stats["counts"]["eval_prompts.jsonl"] >= 200


def test_task_shares_match_the_documented_shares(default_world: World) -> None:
    files = {
        "sft": [row["task"] for row in default_world.sft],
        "preference": [row["task"] for row in default_world.preference_prompts],
        "rl": [row["task"] for row in default_world.rl_prompts],
        "eval": [row["task"] for row in default_world.eval_prompts],
    }
    for name, tasks in files.items():
        counts = Counter(tasks)
        for task in TASKS:
            assert counts[task] / len(tasks) == pytest.approx(TASK_SHARES[task], abs=0.01), (name, task)


def test_recorded_task_is_the_task_of_the_prompt(default_world: World) -> None:
    for row in default_world.sft:
        assert task_of(row["messages"][0]["content"]) == row["task"]
    for row in default_world.preference_prompts + default_world.rl_prompts + default_world.eval_prompts:
        assert task_of(row["prompt"]) == row["task"]


def test_flaw_shares_match_overall_and_within_every_task(default_world: World) -> None:
    expected = {**FLAW_SHARES, None: CLEAN_SHARE}
    overall = Counter(row["flaw"] for row in default_world.sft)
    for flaw, share in expected.items():
        assert overall[flaw] / len(default_world.sft) == pytest.approx(share, abs=0.01)
    for task in TASKS:
        rows = [row for row in default_world.sft if row["task"] == task]
        per_task = Counter(row["flaw"] for row in rows)
        for flaw, share in expected.items():
            assert per_task[flaw] / len(rows) == pytest.approx(share, abs=0.01), (task, flaw)


def test_quotas_split_totals_exactly() -> None:
    assert quotas(7, {"a": 0.5, "b": 0.25, "c": 0.25}) == {"a": 3, "b": 2, "c": 2}
    assert sum(quotas(301, TASK_SHARES).values()) == 301


# --- Splits ------------------------------------------------------------------------------------


def test_eval_prompts_are_held_out_from_every_training_file(default_world: World, quick_dir: Path) -> None:
    eval_prompts = {row["prompt"] for row in default_world.eval_prompts}
    assert len(eval_prompts) == len(default_world.eval_prompts)  # no duplicates inside eval either
    assert not eval_prompts & _training_prompts(default_world)
    chat_turns = {m.group(1) for text in default_world.pretrain_texts for m in re.finditer(r"User: (.*)\n", text)}
    assert chat_turns and not eval_prompts & chat_turns

    quick = {name: _lines(quick_dir / name) for name in FILE_NAMES}
    quick_eval = {row["prompt"] for row in quick["eval_prompts.jsonl"]}
    quick_train = {row["messages"][0]["content"] for row in quick["sft.jsonl"]}
    quick_train |= {row["prompt"] for row in quick["preference_prompts.jsonl"] + quick["rl_prompts.jsonl"]}
    assert not quick_eval & quick_train


def test_training_files_prefer_fresh_prompts(default_world: World) -> None:
    sft_prompts = [row["messages"][0]["content"] for row in default_world.sft]
    assert len(set(sft_prompts)) / len(sft_prompts) > 0.85
    rl_prompts = {row["prompt"] for row in default_world.rl_prompts}
    # Tasks with large prompt spaces never need to reuse an SFT prompt for RL.
    reused = [p for p in rl_prompts & set(sft_prompts) if task_of(p) in ("sentiment", "classification")]
    assert not reused


def test_pretrain_eval_holds_no_copy_of_a_pretrain_document(default_world: World) -> None:
    from moss_rlhf.demo.corpus import document_key

    assert not {document_key(d) for d in default_world.pretrain_eval} & set(default_world.pretrain_texts)
    conversations = [d for d in default_world.pretrain if not isinstance(d, str)]
    assert 0.1 < len(conversations) / len(default_world.pretrain) < 0.3  # pretraining renders them as chats
    assert all(m["role"] == ("user", "assistant")[i % 2] for d in conversations for i, m in enumerate(d))


# --- Content ------------------------------------------------------------------------------------


def test_clean_sft_rows_are_the_reference_answers(default_world: World) -> None:
    for flawed, clean in zip(default_world.sft, default_world.sft_clean):
        prompt = clean["messages"][0]["content"]
        assert flawed["messages"][0]["content"] == prompt and flawed["task"] == clean["task"]
        assert clean["flaw"] is None
        assert clean["messages"][1]["content"] == reference_response(prompt)
        if flawed["flaw"] is None:
            assert flawed["messages"][1]["content"] == clean["messages"][1]["content"]
        else:
            assert flawed["messages"][1]["content"] != clean["messages"][1]["content"]


def test_prompts_and_clean_answers_are_short(default_world: World) -> None:
    for row in default_world.sft_clean:
        prompt, answer = (message["content"] for message in row["messages"])
        assert len(prompt) <= 110 and len(answer) <= 120
    assert max(len(row["messages"][1]["content"]) for row in default_world.sft) <= 200


def test_corpus_is_partly_bilingual_and_holds_reviews_of_both_sentiments(default_world: World) -> None:
    bilingual = [text for text in default_world.pretrain_texts if " = " in text and CJK.search(text)]
    assert 0.08 <= len(bilingual) / len(default_world.pretrain) <= 0.3
    reviews = [text for text in default_world.pretrain_texts if text.startswith("Review of the")]
    labels = Counter(polarity_label(text) for text in reviews)
    assert labels["positive"] > 0.3 * len(reviews) and labels["negative"] > 0.3 * len(reviews)


def test_parallel_sentences_run_both_ways_round_and_agree_with_the_lexicon(default_world: World) -> None:
    from moss_rlhf.demo import sentences as sx

    directions, glossary_words = Counter(), 0
    words = {english: chinese for template in sx.TRANSLATION_TEMPLATES for _, vocabulary in template.fields
             for english, chinese in vocabulary.items()}
    for text in default_world.pretrain_texts:
        for line in text.split("\n"):
            left, sep, right = line.partition(" = ")
            if not sep:
                continue
            if left in sx.english_to_chinese():
                assert sx.english_to_chinese()[left] == right
                directions["en-zh"] += 1
            elif left in sx.chinese_to_english():
                assert sx.chinese_to_english()[left] == right
                directions["zh-en"] += 1
            elif "，" in right or "，" in left:
                english, chinese = (left, right) if "，" in right else (right, left)
                assert [words[w] for w in english.split(", ")] == chinese.split("，")
                glossary_words += 1
    assert min(directions.values()) > 0.4 * sum(directions.values()) and glossary_words > 500


def test_facts_stated_in_the_corpus_agree_with_the_lexicon(default_world: World) -> None:
    statements = {
        "town": re.compile(r"\b([A-Z][a-z]+) lives in ([A-Z][a-z]+ [A-Z][a-z]+)"),
        "job": re.compile(r"\b([A-Z][a-z]+) (?:is a|works as a) ([a-z]+)\."),
        "age": re.compile(r"\b([A-Z][a-z]+) is (\d+) years old"),
        "pet": re.compile(r"\b([A-Z][a-z]+) has a (?:pet )?([a-z]+)\."),
    }
    checked = 0
    for text in default_world.pretrain_texts:
        for slot, pattern in statements.items():
            for name, value in pattern.findall(text):
                if name in lx.PEOPLE_BY_NAME:
                    assert str(getattr(lx.PEOPLE_BY_NAME[name], slot)) == value, (text, slot)
                    checked += 1
    assert checked > 1000


def test_every_sentiment_sentence_reads_as_its_label() -> None:
    for template in sx.SENTIMENT_TEMPLATES:
        for sentence in template.expand():
            assert polarity_label(sentence) == template.label, sentence
            assert sx.sentiment_of_sentence(sentence) == template.label


def test_topic_sentences_belong_to_exactly_one_topic() -> None:
    for template in sx.TOPIC_TEMPLATES:
        for sentence in template.expand():
            owners = {other.label for other in sx.TOPIC_TEMPLATES if other.match(sentence) is not None}
            assert owners == {template.label}, sentence


def test_translation_lexicon_is_one_to_one_and_pure() -> None:
    pairs = sx.translation_pairs()
    assert len(pairs) > 500
    for pair in pairs:
        assert not re.search(r"[A-Za-z]", pair.chinese) and not CJK.search(pair.english)
    assert sx.english_to_chinese()["The red apple is sweet."] == "红苹果很甜。"
    assert sx.chinese_to_english()["猫很小。"] == "The cat is small."


def test_every_sampled_prompt_parses_back_to_its_task() -> None:
    rng = random.Random(7)
    for task in TASKS:
        for _ in range(300):
            prompt = sample_prompt(task, rng)
            parsed = parse_prompt(prompt)
            assert parsed is not None and parsed.task == task, prompt
            assert reference_response(prompt)


def test_reference_response_rejects_unknown_prompts() -> None:
    with pytest.raises(ValueError):
        reference_response("What is the capital of France?")
    with pytest.raises(ValueError):
        reference_response("Translate to Chinese: The spaceship is purple.")
