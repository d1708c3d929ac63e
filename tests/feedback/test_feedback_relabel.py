"""Active learning: `feedback relabel` sends the pairs the reward-model ensemble is least sure of back to people, in
order of uncertainty, and the admin page lists them with what the new judgements say."""

from __future__ import annotations

import json

from fbtools import add_pairwise_project

from moss_rlhf.cli import main
from moss_rlhf.feedback.relabel import uncertain_items, uncertainty_order
from moss_rlhf.feedback.store import Store, Submission


def strength_file(path, strengths):
    rows = [{"prompt": f"question {i}?", "chosen": f"good answer {i}", "rejected": f"bad answer {i}", "margin": 0.5,
             "item_id": 100 + i, "strength_mean": mean, "strength_std": std}
            for i, (mean, std) in enumerate(strengths)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_uncertainty_order():
    # |mean| − std: 0.1 − 0.5 = −0.4, 2 − 0.1 = 1.9, −0.3 − 0.3 → 0.0, 0.05 − 0.05 = 0.0 (wider spread first)
    assert uncertainty_order([0.1, 2.0, -0.3, 0.05], [0.5, 0.1, 0.3, 0.05]) == [0, 2, 3, 1]


def test_relabel_project_of_the_most_uncertain_pairs_and_its_queue(tmp_path, capsys):
    db = str(tmp_path / "fb.db")
    path = strength_file(tmp_path / "strength.jsonl", [(3.0, 0.2), (-0.2, 0.6), (0.4, 0.1), (5.0, 1.0), (0.1, 0.9)])
    assert main(["feedback", "relabel", "--db", db, "--name", "again", "--strength", str(path), "--count", "3",
                 "--annotators-per-item", "1"]) == 0
    assert "the 3 most uncertain pairs" in capsys.readouterr().out
    store = Store(db)
    items = store.items()
    assert [i.messages[0]["content"] for i in items] == ["question 4?", "question 1?", "question 2?"]
    assert items[1].meta == {"strength_mean": -0.2, "strength_std": 0.6, "relabel_of": 101}
    assert [c.text for c in items[1].candidates] == ["good answer 1", "bad answer 1"]  # the earlier label first

    person, _ = store.add_annotator("ann")
    while (view := store.next_item(person.id)) is not None:  # ann now prefers the earlier-rejected answers
        bad = next(c for c in view.candidates if c.text.startswith("bad"))
        store.submit(person.id, Submission(item_id=view.id, choice="A" if view.candidates[0].id == bad.id else "B"))
    queue = uncertain_items(store.items(), store.judgements())
    assert [(q["prompt"], q["judged"], q["agree"]) for q in queue] == [
        ("question 4?", 1, 0), ("question 1?", 1, 0), ("question 2?", 1, 0)]
    assert main(["feedback", "relabel", "--db", db, "--name", "x", "--strength",
                 str(strength_file(tmp_path / "empty.jsonl", []))]) == 2
    assert "holds no records" in capsys.readouterr().err
    plain = tmp_path / "unscored.jsonl"
    plain.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n", encoding="utf-8")
    assert main(["feedback", "relabel", "--db", db, "--name", "y", "--strength", str(plain)]) == 2
    assert "without strength_mean" in capsys.readouterr().err


def test_admin_page_shows_the_queue(tmp_path, sqlite_store):
    from fastapi.testclient import TestClient

    from moss_rlhf.feedback.app import create_app
    from moss_rlhf.feedback.relabel import create_relabel_project

    add_pairwise_project(sqlite_store, name="plain", n_items=2)
    pid, added = create_relabel_project(sqlite_store, "again", strength_file(tmp_path / "s.jsonl",
                                                                             [(0.3, 0.4), (-1.0, 0.2)]), 5)
    assert added == 2
    _, token = sqlite_store.add_annotator("boss", admin=True)
    client = TestClient(create_app(sqlite_store), base_url="http://testserver")
    page = client.get(f"/admin?project={pid}", headers={"Authorization": f"Bearer {token}"})
    assert page.status_code == 200 and "Re-label queue" in page.text and "-1.00" in page.text
    other = client.get("/admin?project=plain", headers={"Authorization": f"Bearer {token}"})
    assert "Re-label queue" not in other.text
