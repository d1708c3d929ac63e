"""Export: judgements → preference JSONL that load_preferences reads; rankings expanded; ties left out."""

from __future__ import annotations

import json

import pytest
from fbtools import add_pairwise_project

from moss_rlhf.config import ConfigError
from moss_rlhf.data.formats import load_preferences
from moss_rlhf.feedback.export import ExportOptions, dump_judgements, export_preferences
from moss_rlhf.feedback.store import Submission


def _label_all(store, people, answer):
    """Every annotator judges every item they can get; ``answer(person_index, view)`` builds the Submission."""
    for n, person in enumerate(people):
        while (view := store.next_item(person.id)) is not None:
            store.submit(person.id, answer(n, view))


def _pick(view, text):
    """'A' or 'B': the side on which the response ``text`` is shown."""
    return "A" if view.candidates[0].text == text else "B"


def test_pairwise_majority_margin_and_round_trip(tmp_path, sqlite_store):
    add_pairwise_project(sqlite_store, n_items=3, annotators_per_item=3)
    people = [sqlite_store.add_annotator(f"a{i}")[0] for i in range(3)]

    def answer(n, view):
        i = int(view.messages[0]["content"].split()[1].rstrip("?"))
        if i == 0:    # all three prefer the good answer: much, much, slightly
            return Submission(item_id=view.id, choice=_pick(view, "good answer 0"), strength=["much", "much", "slightly"][n])
        if i == 1:    # 2 of 3 prefer the bad answer; the third says tie
            return (Submission(item_id=view.id, choice=_pick(view, "bad answer 1")) if n < 2
                    else Submission(item_id=view.id, choice="tie"))
        return Submission(item_id=view.id, choice="tie" if n < 2 else "both_bad")  # a tie majority

    _label_all(sqlite_store, people, answer)
    out, ties = tmp_path / "prefs.jsonl", tmp_path / "ties.jsonl"
    summary = export_preferences(sqlite_store, "p", out, ExportOptions(), ties_path=ties)
    assert (summary.pairs, summary.ties, summary.judgements) == (2, 1, 9)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    prefs = load_preferences(out)
    assert [p.chosen for p in prefs] == ["good answer 0", "bad answer 1"]
    assert [p.rejected for p in prefs] == ["bad answer 0", "good answer 1"]
    assert prefs[0].prompt == [{"role": "user", "content": "question 0?"}]
    assert prefs[0].margin == pytest.approx((1.0 + 1.0 + 0.5) / 3)
    assert prefs[1].margin == pytest.approx(0.5)  # no stated strength: margin_default
    assert rows[0]["agreement"] == 1.0 and rows[1]["agreement"] == pytest.approx(2 / 3) and rows[1]["votes"] == 3
    tie_rows = [json.loads(line) for line in ties.read_text().splitlines()]
    assert [(t["label"], t["votes"]) for t in tie_rows] == [("tie", 3)]

    strict = export_preferences(sqlite_store, "p", tmp_path / "strict.jsonl", ExportOptions(min_agreement=0.9))
    assert strict.pairs == 1 and strict.below_agreement == 2  # the 2-of-3 pair and the 2-of-3 tie
    custom = export_preferences(sqlite_store, "p", tmp_path / "m.jsonl", ExportOptions(margin_much=3.0,
                                                                                       margin_slightly=1.0))
    assert load_preferences(tmp_path / "m.jsonl")[0].margin == pytest.approx(7 / 3)
    assert custom.pairs == 2


def test_rankings_expand_to_pairs_and_ratings_by_difference(tmp_path, sqlite_store):
    pid = sqlite_store.create_project("r", "ranking", 1)
    sqlite_store.add_items(pid, [
        {"messages": [{"role": "user", "content": "rank these"}], "responses": ["w", "x", "y", "z"]},
        {"messages": [{"role": "user", "content": "partial"}], "responses": ["p", "q", "r"]},
        {"messages": [{"role": "user", "content": "rate"}], "responses": ["lo", "mid", "hi"], "task_type": "rating"},
    ])
    alice, _ = sqlite_store.add_annotator("alice")

    def by_text(view, *texts):
        ids = {c.text: c.id for c in view.candidates}
        return [ids[t] for t in texts]

    v = sqlite_store.next_item(alice.id)
    sqlite_store.submit(alice.id, Submission(item_id=v.id, ranking=by_text(v, "y", "w", "z", "x")))
    v = sqlite_store.next_item(alice.id)
    sqlite_store.submit(alice.id, Submission(item_id=v.id, ranking=by_text(v, "r", "p")))  # q unranked
    v = sqlite_store.next_item(alice.id)
    ids = by_text(v, "lo", "mid", "hi")
    sqlite_store.submit(alice.id, Submission(item_id=v.id, ratings={ids[0]: 2, ids[1]: 4, ids[2]: 6}))

    out = tmp_path / "prefs.jsonl"
    summary = export_preferences(sqlite_store, "r", out)
    prefs = load_preferences(out)
    full = {(p.chosen, p.rejected) for p in prefs if p.prompt[0]["content"] == "rank these"}
    assert full == {("y", "w"), ("y", "z"), ("y", "x"), ("w", "z"), ("w", "x"), ("z", "x")}
    partial = {(p.chosen, p.rejected) for p in prefs if p.prompt[0]["content"] == "partial"}
    assert partial == {("r", "p")}
    rated = {(p.chosen, p.rejected): p.margin for p in prefs if p.prompt[0]["content"] == "rate"}
    assert rated == {("mid", "lo"): 0.5, ("hi", "mid"): 0.5, ("hi", "lo"): 1.0}  # gaps 2, 2, 4 (much from 3)
    assert summary.pairs == 6 + 1 + 3

    below = export_preferences(sqlite_store, "r", tmp_path / "below.jsonl", ExportOptions(unranked_below=True))
    partial = {(p.chosen, p.rejected) for p in load_preferences(tmp_path / "below.jsonl")
               if p.prompt[0]["content"] == "partial"}
    assert partial == {("r", "p"), ("r", "q"), ("p", "q")} and below.pairs == 12


def test_retracted_rows_do_not_count_and_raw_dump_keeps_them(tmp_path, sqlite_store):
    add_pairwise_project(sqlite_store, n_items=1, annotators_per_item=1)
    alice, _ = sqlite_store.add_annotator("alice")
    v = sqlite_store.next_item(alice.id)
    sqlite_store.submit(alice.id, Submission(item_id=v.id, choice=_pick(v, "bad answer 0"), edited="a better one"))
    sqlite_store.retract(alice.id)
    v = sqlite_store.next_item(alice.id, item_id=v.id)
    sqlite_store.submit(alice.id, Submission(item_id=v.id, choice=_pick(v, "good answer 0"), strength="much",
                                             edited="the best answer"))
    out = tmp_path / "prefs.jsonl"
    export_preferences(sqlite_store, None, out)
    assert [(p.chosen, p.rejected, p.margin) for p in load_preferences(out)] == [("good answer 0", "bad answer 0", 1.0)]
    export_preferences(sqlite_store, None, out, ExportOptions(include_edits=True))
    assert {(p.chosen, p.rejected) for p in load_preferences(out)} == {
        ("good answer 0", "bad answer 0"), ("the best answer", "good answer 0"), ("the best answer", "bad answer 0")}
    raw = tmp_path / "raw.jsonl"
    assert dump_judgements(sqlite_store, "p", raw) == 2
    rows = [json.loads(line) for line in raw.read_text().splitlines()]
    assert [r["retracted"] for r in rows] == [True, False]
    assert rows[1]["prompt"] == [{"role": "user", "content": "question 0?"}] and len(rows[1]["candidates"]) == 2
    assert rows[1]["strength"] == "much" and rows[1]["shown_order"] and rows[1]["annotator"] == "alice"
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files


def test_undecided_pairs_are_left_out(tmp_path, sqlite_store):
    add_pairwise_project(sqlite_store, n_items=1, annotators_per_item=2)
    people = [sqlite_store.add_annotator(f"a{i}")[0] for i in range(2)]
    _label_all(sqlite_store, people, lambda n, v: Submission(item_id=v.id, choice="A" if n == 0 else "B")
               if v.candidates[0].text == "good answer 0"
               else Submission(item_id=v.id, choice="B" if n == 0 else "A"))
    summary = export_preferences(sqlite_store, "p", tmp_path / "x.jsonl")
    assert summary.pairs == 0 and summary.undecided == 1


def test_kto_records_from_ratings_and_both_bad(tmp_path, sqlite_store):
    """Ratings of 5–7 make a response desirable and 1–3 undesirable (4 says neither); a "both bad" answer makes
    both responses undesirable; per response the annotators' majority decides, a split vote is left out; A/B choices
    say nothing of a response on its own. Every record loads as KTO data."""
    from moss_rlhf.data.formats import load_labelled_records

    pid = sqlite_store.create_project("kto", "rating", 3)
    sqlite_store.add_items(pid, [{"messages": [{"role": "user", "content": "rate"}],
                                  "responses": ["great", "fine", "awful", "split"], "task_type": "rating"}])
    add_pairwise_project(sqlite_store, name="pairs", n_items=2, annotators_per_item=1)
    people = [sqlite_store.add_annotator(f"a{i}")[0] for i in range(3)]
    votes = {"great": [7, 6, 4], "fine": [4, 4, 5], "awful": [1, 2, 6], "split": [6, 2, 4]}

    def answer(n, view):
        if view.task_type == "rating":
            return Submission(item_id=view.id, ratings={c.id: votes[c.text][n] for c in view.candidates})
        both_bad = view.messages[0]["content"] == "question 0?"
        return Submission(item_id=view.id, choice="both_bad" if both_bad else "A")

    _label_all(sqlite_store, people, answer)
    out = tmp_path / "kto.jsonl"
    summary = export_preferences(sqlite_store, None, tmp_path / "prefs.jsonl", kto_path=out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    labels = {r["completion"]: r["label"] for r in rows}
    assert labels == {"great": True, "awful": False, "good answer 0": False, "bad answer 0": False}
    assert (summary.desirable, summary.undesirable) == (1, 3)
    great = next(r for r in rows if r["completion"] == "great")
    assert great["votes"] == 3 and great["agreement"] == pytest.approx(2 / 3)
    assert great["mean_rating"] == pytest.approx(17 / 3)
    replies = [r for record in load_labelled_records(out) for r in record]
    assert [(r.reply, r.desirable) for r in replies] == [(r["completion"], r["label"]) for r in rows]
    assert replies[0].prompt == [{"role": "user", "content": "rate"}]

    strict = export_preferences(sqlite_store, None, tmp_path / "p.jsonl", ExportOptions(
        kto_desirable_min=7, kto_undesirable_max=1, min_agreement=0.5), kto_path=tmp_path / "strict.jsonl")
    strict_rows = [json.loads(line) for line in (tmp_path / "strict.jsonl").read_text().splitlines()]
    # great: 7 / 4 / 6 → one desirable vote, two neutral: a neutral majority; awful: 1 / 2 / 6 → neutral too
    assert {r["completion"] for r in strict_rows} == {"good answer 0", "bad answer 0"}
    assert (strict.desirable, strict.undesirable) == (0, 2)
    with pytest.raises(ConfigError, match="kto-undesirable-max"):
        ExportOptions(kto_desirable_min=4, kto_undesirable_max=4)
