"""Simulated annotators: Bradley–Terry noise plus an error rate, through the store's own labelling functions."""

from __future__ import annotations

import random

import pytest
from fbtools import add_pairwise_project

from moss_rlhf.feedback.simulate import AnnotatorModel, decide, simulate
from moss_rlhf.feedback.store import CandidateView, ItemView


def _scored_project(store, n=150, seed=0):
    """Pairwise items whose two responses carry their score in the text ("score 7.0"), scores at least 1 apart."""
    rng = random.Random(seed)
    responses = []
    for _ in range(n):
        a = rng.uniform(0, 10)
        b = a + rng.choice([-1, 1]) * rng.uniform(1, 4)
        responses.append([f"score {a:.3f}", f"score {b:.3f}"])
    add_pairwise_project(store, "sim", n_items=n, annotators_per_item=2, responses=responses)


def _score(messages, response):
    return float(response.split()[1])


@pytest.mark.parametrize("error_rate,low,high", [(0.0, 0.9, 1.0), (0.3, 0.62, 0.78)])
def test_agreement_with_the_judge_follows_the_error_rate(sqlite_store, error_rate, low, high):
    _scored_project(sqlite_store)
    summary = simulate(sqlite_store, "sim", annotators=2, model=AnnotatorModel(temperature=0.05, error_rate=error_rate),
                       seed=3, scorer=_score)
    assert summary.judgements == 300 and summary.comparisons == 300
    assert low < summary.agreement <= high, summary.agreement
    rows = sqlite_store.judgements()
    assert len(rows) == 300 and {r.annotator for r in rows} == {"sim-1", "sim-2"}
    # indistinguishable from people: real rows with sides, strengths, times and the guideline version
    assert all(r.choice in ("A", "B") and r.strength in ("slightly", "much") for r in rows)
    assert all(r.time_ms and r.time_ms >= 600 and r.guideline_version == "1" for r in rows)
    assert len({r.time_ms for r in rows}) > 100


def test_bradley_terry_probability_and_strength():
    item = ItemView(1, 1, "p", "pairwise", [{"role": "user", "content": "q"}],
                    [CandidateView(10, 0, "a"), CandidateView(11, 1, "b")], "1")
    rng = random.Random(0)
    model = AnnotatorModel(temperature=1.0)
    n = 4000
    # s_A - s_B = 1 at T = 1: P(A) = sigmoid(1) = 0.731
    wins = sum(decide(item, [1.0, 0.0], model, rng).choice == "A" for _ in range(n))
    assert abs(wins / n - 0.731) < 0.03
    # strength: the chosen side's BT probability >= 0.85 -> much
    assert decide(item, [5.0, 0.0], AnnotatorModel(temperature=1.0), rng).strength == "much"
    assert decide(item, [0.3, 0.0], AnnotatorModel(temperature=100.0), rng).strength == "slightly"
    # temperature 0: always the higher score
    assert all(decide(item, [0.0, 0.1], AnnotatorModel(temperature=0.0), rng).choice == "B" for _ in range(50))


def test_rankings_and_ratings(sqlite_store):
    pid = sqlite_store.create_project("k", "ranking", 1)
    sqlite_store.add_items(pid, [{"messages": [{"role": "user", "content": "q"}],
                                  "responses": ["score 1", "score 9", "score 5", "score 3"]},
                                 {"messages": [{"role": "user", "content": "q"}], "task_type": "rating",
                                  "responses": ["score 1", "score 9", "score 5"]}])
    summary = simulate(sqlite_store, "k", annotators=1, model=AnnotatorModel(temperature=0.01), scorer=_score)
    ranking, rating = sqlite_store.judgements()
    texts = {c.id: c.text for i in sqlite_store.items() for c in i.candidates}
    assert [texts[c] for c in ranking.ranking] == ["score 9", "score 5", "score 3", "score 1"]
    by_text = {texts[c]: r for c, r in rating.ratings.items()}
    assert by_text["score 9"] > by_text["score 5"] > by_text["score 1"]
    assert summary.agreement == 1.0


def test_the_gold_judge_is_the_default_scorer(sqlite_store):
    tasks = pytest.importorskip("moss_rlhf.demo.tasks")
    flaws = pytest.importorskip("moss_rlhf.demo.flaws")
    rng = random.Random(0)
    prompts, responses = [], []
    for n in range(40):
        prompt = tasks.sample_prompt(tasks.TASKS[n % len(tasks.TASKS)], rng)
        good = tasks.reference_response(prompt)
        bad = flaws.flawed_response(tasks.parse_prompt(prompt), flaws.FLAWS[n % len(flaws.FLAWS)], rng)
        prompts.append(prompt)
        responses.append([good, bad] if n % 2 else [bad, good])
    add_pairwise_project(sqlite_store, "world", n_items=40, annotators_per_item=1, prompts=prompts,
                         responses=responses)
    summary = simulate(sqlite_store, "world", annotators=1, model=AnnotatorModel(temperature=0.1), seed=0)
    assert summary.judgements == 40 and summary.comparisons >= 35
    assert summary.agreement > 0.9


def test_the_same_seed_gives_the_same_labels(tmp_path):
    """Screens are shuffled per (item, annotator), not from the system's entropy: a rerun of a simulated labelling
    with the same seed shows the same sides and gets the same answers, so the demo's labels are reproducible."""
    from moss_rlhf.feedback.store import Store

    runs = []
    for n in range(2):
        store = Store(str(tmp_path / f"run{n}.db"))
        _scored_project(store, n=40)
        simulate(store, "sim", annotators=2, model=AnnotatorModel(temperature=2.0), seed=5, scorer=_score)
        runs.append([(r.item_id, r.annotator, r.shown_order, r.choice) for r in store.judgements()])
        store.close()
    assert runs[0] == runs[1] and len(runs[0]) == 80
    # the shuffle is still a shuffle: the stored first candidate (lowest id) is shown first on about half the screens
    shown_first = sum(order[0] == min(order) for _, _, order, _ in runs[0])
    assert 20 <= shown_first <= 60, shown_first
