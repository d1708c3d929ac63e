"""The store: assignments, idempotent submissions, append-only undo, validation, tokens — on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import json
import uuid

import pytest
import sqlalchemy as sa
from fbtools import add_pairwise_project

from moss_rlhf.data.formats import DataError
from moss_rlhf.feedback.store import (AlreadyJudged, FeedbackError, InvalidSubmission, NotAssigned, Store,
                                      Submission, SubmissionConflict, import_candidates)


def test_tokens_are_stored_only_as_sha256(any_store):
    annotator, token = any_store.add_annotator("alice")
    assert any_store.authenticate(token) == annotator
    assert any_store.authenticate(token + "x") is None and any_store.authenticate("") is None
    with any_store.engine.connect() as c:
        stored = c.execute(sa.text("SELECT token_hash FROM annotators")).scalar_one()
    assert stored == hashlib.sha256(token.encode()).hexdigest() and token not in stored
    with pytest.raises(FeedbackError):
        any_store.add_annotator("alice")


def test_each_item_gets_n_annotators_and_nobody_twice(any_store):
    add_pairwise_project(any_store, n_items=3, annotators_per_item=2)
    people = [any_store.add_annotator(f"a{i}")[0] for i in range(3)]
    seen = {p.id: [] for p in people}
    for _ in range(3):
        for p in people:
            view = any_store.next_item(p.id)
            if view is None:
                continue
            assert view.id not in seen[p.id]
            seen[p.id].append(view.id)
            any_store.submit(p.id, Submission(item_id=view.id, choice="A"))
    per_item = {}
    for items in seen.values():
        for i in items:
            per_item[i] = per_item.get(i, 0) + 1
    assert sorted(per_item.values()) == [2, 2, 2]  # 3 items x 2 annotators, spread over 3 people
    with any_store.engine.connect() as c, pytest.raises(sa.exc.IntegrityError):
        row = c.execute(sa.text("SELECT item_id, annotator_id FROM assignments LIMIT 1")).one()
        c.execute(sa.text("INSERT INTO assignments (item_id, annotator_id, shown_order, created_at) "
                          "VALUES (:i, :a, '[]', CURRENT_TIMESTAMP)"), {"i": row[0], "a": row[1]})


def test_gold_items_go_to_every_annotator(any_store):
    add_pairwise_project(any_store, n_items=4, annotators_per_item=1, gold_every=2)
    people = [any_store.add_annotator(f"a{i}")[0] for i in range(3)]
    got = {p.id: set() for p in people}
    for p in people:
        while (view := any_store.next_item(p.id)) is not None:
            got[p.id].add(view.id)
            any_store.submit(p.id, Submission(item_id=view.id, choice="B"))
    gold_ids = {i.id for i in any_store.items() if i.gold is not None}
    assert len(gold_ids) == 2 and all(gold_ids <= items for items in got.values())
    normal = [i.id for i in any_store.items() if i.gold is None]
    assert sum(i in items for items in got.values() for i in normal) == len(normal)


def test_submission_is_idempotent_and_undo_keeps_the_row(any_store):
    add_pairwise_project(any_store, n_items=2, annotators_per_item=1)
    alice, _ = any_store.add_annotator("alice")
    view = any_store.next_item(alice.id)
    sid = str(uuid.uuid4())
    first = any_store.submit(alice.id, Submission(item_id=view.id, submission_id=sid, choice="A", strength="much",
                                                  rationale="clearer", time_ms=1234))
    again = any_store.submit(alice.id, Submission(item_id=view.id, submission_id=sid, choice="B"))
    assert first.created and not again.created and again.judgement.id == first.judgement.id
    assert again.judgement.choice == "A" and again.judgement.preferred_candidate_id == view.candidates[0].id
    assert first.judgement.shown_order == view.shown_order and first.judgement.time_ms == 1234
    with pytest.raises(AlreadyJudged):
        any_store.submit(alice.id, Submission(item_id=view.id, choice="B"))
    bob, _ = any_store.add_annotator("bob")
    with pytest.raises(SubmissionConflict):
        any_store.submit(bob.id, Submission(item_id=view.id, submission_id=sid, choice="B"))
    with pytest.raises(NotAssigned):
        any_store.submit(bob.id, Submission(item_id=view.id, choice="B"))

    undone = any_store.retract(alice.id)
    assert undone.id == first.judgement.id and undone.retracted
    assert any_store.judgements() == []
    assert len(any_store.judgements(include_retracted=True)) == 1
    # The undone item comes back (asked for by id, as the page does after an undo) and can be judged anew.
    back = any_store.next_item(alice.id, item_id=view.id)
    assert back.id == view.id and back.shown_order == view.shown_order
    redo = any_store.submit(alice.id, Submission(item_id=view.id, choice="B"))
    assert redo.created and redo.judgement.id != first.judgement.id
    rows = any_store.judgements(include_retracted=True)
    assert [(r.choice, r.retracted) for r in rows] == [("A", True), ("B", False)]
    assert any_store.progress(alice.id).done == 1
    with any_store.engine.connect() as c:
        assert c.execute(sa.text("SELECT count(*) FROM judgements")).scalar_one() == 2
        assert c.execute(sa.text("SELECT count(*) FROM retractions")).scalar_one() == 1


def test_rankings_ratings_and_validation(any_store):
    pid = any_store.create_project("mixed", "ranking", 1)
    any_store.add_items(pid, [
        {"messages": [{"role": "user", "content": "rank"}], "responses": ["x", "y", "z", "w"]},
        {"messages": [{"role": "user", "content": "rate"}], "responses": ["x", "y", "z"], "task_type": "rating"},
    ])
    alice, _ = any_store.add_annotator("alice")
    ranking_item = any_store.next_item(alice.id)
    assert ranking_item.task_type == "ranking" and len(ranking_item.candidates) == 4
    ids = ranking_item.shown_order
    for bad in (Submission(item_id=ranking_item.id, ranking=[ids[0]]),
                Submission(item_id=ranking_item.id, ranking=[ids[0], ids[0]]),
                Submission(item_id=ranking_item.id, ranking=[ids[0], 999999]),
                Submission(item_id=ranking_item.id, choice="A"),
                Submission(item_id=ranking_item.id, ranking=ids, shown_order=ids[:2]),
                Submission(item_id=ranking_item.id, ranking=ids, submission_id="not-a-uuid")):
        with pytest.raises(InvalidSubmission):
            any_store.submit(alice.id, bad)
    partial = any_store.submit(alice.id, Submission(item_id=ranking_item.id, ranking=[ids[2], ids[0]]))
    assert partial.judgement.ranking == [ids[2], ids[0]]
    rating_item = any_store.next_item(alice.id)
    assert rating_item.task_type == "rating"
    cids = rating_item.shown_order
    with pytest.raises(InvalidSubmission):
        any_store.submit(alice.id, Submission(item_id=rating_item.id, ratings={cids[0]: 5}))
    with pytest.raises(InvalidSubmission):
        any_store.submit(alice.id, Submission(item_id=rating_item.id, ratings={c: 8 for c in cids}))
    done = any_store.submit(alice.id, Submission(item_id=rating_item.id, ratings=dict(zip(cids, (7, 1, 4)))))
    assert done.judgement.ratings == dict(zip(cids, (7, 1, 4)))
    assert any_store.next_item(alice.id) is None


def test_strength_needs_a_side(sqlite_store):
    add_pairwise_project(sqlite_store, n_items=1, annotators_per_item=1)
    alice, _ = sqlite_store.add_annotator("alice")
    view = sqlite_store.next_item(alice.id)
    with pytest.raises(InvalidSubmission):
        sqlite_store.submit(alice.id, Submission(item_id=view.id, choice="tie", strength="much"))
    with pytest.raises(InvalidSubmission):
        sqlite_store.submit(alice.id, Submission(item_id=view.id, choice="left"))
    with pytest.raises(InvalidSubmission):
        Submission.from_json({"item_id": view.id, "choice": "A", "extra": 1})
    tie = sqlite_store.submit(alice.id, Submission.from_json({"item_id": view.id, "choice": "both_bad"}))
    assert tie.judgement.preferred_candidate_id is None


def test_sqlite_pragmas(sqlite_store):
    with sqlite_store.engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000


def test_import_candidates_reads_prompts_messages_and_gold(tmp_path, sqlite_store):
    path = tmp_path / "cands.jsonl"
    rows = [{"prompt": "Say hi", "responses": ["hi", "go away"], "gold": 0, "task": "greet"},
            {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}],
             "responses": ["4", "5", "four"]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pid = import_candidates(sqlite_store, "imported", path, annotators_per_item=3)
    items = sqlite_store.items(pid)
    assert [i.task_type for i in items] == ["pairwise", "ranking"]
    assert items[0].messages == [{"role": "user", "content": "Say hi"}] and items[0].gold == 0
    assert items[0].meta == {"task": "greet"} and [c.text for c in items[1].candidates] == ["4", "5", "four"]
    with pytest.raises(FeedbackError):
        import_candidates(sqlite_store, "imported", path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "responses": ["a", "b"], "gold": 5}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: gold"):
        import_candidates(sqlite_store, "bad", bad)


def test_database_url_accepts_paths(tmp_path):
    store = Store(str(tmp_path / "sub" / "f.db"))
    assert store.url.startswith("sqlite:///") and (tmp_path / "sub" / "f.db").exists()
    store.close()
