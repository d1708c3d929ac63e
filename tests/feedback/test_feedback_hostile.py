"""Regression tests for what a hostile test of the labelling app found (issue "Nothing lost, nothing wrong, no
traceback"), on SQLite and PostgreSQL: one open claim per annotator however many requests arrive at once; an edit is
stored only when the text changed; answer fields of another task type, ids beyond 32 bits, deep JSON and NUL
characters are 4xx, never 500; a malformed undo undoes nothing; identical replies never become a pair; a missing or
broken database is one clear error; logout ends the session on the server and tokens can be rotated; the server
decides the shown order and the guideline version; look-alike names are refused; ``--project`` restricts the admin
pages; failed sign-ins are rate-limited."""

from __future__ import annotations

import threading

import httpx
import pytest
from fbtools import add_pairwise_project, running_server

from moss_rlhf.feedback.export import export_preferences, item_pairs
from moss_rlhf.feedback.store import FeedbackError, InvalidSubmission, Store, Submission, import_candidates

BIG = 2 ** 40


def _pairwise(store, n=3, **kw):
    return add_pairwise_project(store, "p", n_items=n, annotators_per_item=kw.pop("annotators_per_item", 1), **kw)


def test_one_open_claim_per_annotator_under_concurrent_requests(any_store):
    """Eight "next item" requests of one annotator at once (tabs, reloads) claim one item between them."""
    _pairwise(any_store, n=6)
    annotator, token = any_store.add_annotator("alice")
    with running_server(any_store) as url:
        barrier = threading.Barrier(8)
        got = []

        def ask():
            with httpx.Client(base_url=url, timeout=60) as client:
                barrier.wait()
                got.append(client.get("/api/next", headers={"Authorization": f"Bearer {token}"}).json())

        threads = [threading.Thread(target=ask) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len({g["item"]["id"] for g in got}) == 1  # the same item for all eight
    with any_store.engine.connect() as c:
        import sqlalchemy as sa

        claims = c.execute(sa.text("SELECT count(*) FROM assignments WHERE annotator_id = :a"),
                           {"a": annotator.id}).scalar_one()
    assert claims == 1


def test_an_edit_is_stored_only_when_the_text_changed(any_store):
    _pairwise(any_store, n=2)
    alice, _ = any_store.add_annotator("alice")
    view = any_store.next_item(alice.id)
    a_text = view.candidates[0].text
    # "Edit into a better answer" starts filled with response A; a tie, then submitting it unchanged
    stored = any_store.submit(alice.id, Submission(item_id=view.id, choice="tie", edited=a_text + "  ")).judgement
    assert stored.edited == ""
    pairs, _, counts = item_pairs(any_store.items()[0], [stored], _edit_options())
    assert not pairs and counts["edits"] == 0  # export writes no "A beats B" beside the tie
    view = any_store.next_item(alice.id)
    changed = any_store.submit(alice.id, Submission(item_id=view.id, choice="A", edited="a better answer")).judgement
    assert changed.edited == "a better answer"


def _edit_options():
    from moss_rlhf.feedback.export import ExportOptions

    return ExportOptions(include_edits=True)


def test_answer_fields_of_another_task_type_are_refused(any_store):
    pid = any_store.create_project("r", "rating")
    any_store.add_items(pid, [{"messages": [{"role": "user", "content": "q"}], "responses": ["x", "y"]}])
    alice, _ = any_store.add_annotator("alice")
    view = any_store.next_item(alice.id, pid)
    ratings = {c.id: 5 for c in view.candidates}
    with pytest.raises(InvalidSubmission, match="choice: not an answer to a rating item"):
        any_store.submit(alice.id, Submission(item_id=view.id, ratings=ratings, choice="A"))
    with pytest.raises(InvalidSubmission, match="ranking"):
        any_store.submit(alice.id, Submission(item_id=view.id, ratings=ratings, ranking=view.shown_order))
    pairwise = _pairwise(any_store, n=1)
    view = any_store.next_item(alice.id, pairwise)
    with pytest.raises(InvalidSubmission, match="ranking: not an answer to a pairwise item"):
        any_store.submit(alice.id, Submission(item_id=view.id, choice="A", ranking=list(reversed(view.shown_order))))


def test_the_server_decides_the_shown_order_and_the_guideline_version(any_store):
    _pairwise(any_store, n=1)
    alice, _ = any_store.add_annotator("alice")
    view = any_store.next_item(alice.id)
    with pytest.raises(InvalidSubmission, match="shown_order: differs"):
        any_store.submit(alice.id, Submission(item_id=view.id, choice="A", shown_order=view.shown_order[::-1]))
    with pytest.raises(InvalidSubmission, match="guideline_version"):
        any_store.submit(alice.id, Submission(item_id=view.id, choice="A", guideline_version="x" * 100))
    stored = any_store.submit(alice.id, Submission(item_id=view.id, choice="A")).judgement
    assert stored.shown_order == view.shown_order and stored.guideline_version == "1"


def test_malformed_input_is_4xx_never_500(any_store):
    _pairwise(any_store, n=2)
    _, token = any_store.add_annotator("alice")
    headers = {"Authorization": f"Bearer {token}"}
    with running_server(any_store) as url, httpx.Client(base_url=url, timeout=60) as client:
        item = client.get("/api/next", headers=headers).json()["item"]
        base = {"item_id": item["id"], "choice": "A"}
        cases = [
            client.post("/api/judgements", headers=headers, json={**base, "item_id": BIG}),
            client.post("/api/judgements", headers=headers, json={**base, "time_ms": BIG}),
            client.get(f"/api/next?item={BIG}", headers=headers),
            client.get(f"/label?item={BIG}", headers=headers),
            client.post("/api/undo", headers=headers, json={"judgement_id": BIG}),
            client.post("/api/judgements", headers={**headers, "content-type": "application/json"},
                        content=b"[" * 30_000 + b"]" * 30_000),
            client.post("/api/judgements", headers=headers, json={**base, "rationale": "nul \x00 here"}),
            client.get("/api/admin/summary?project=a%00b", headers=headers),
        ]
        statuses = [r.status_code for r in cases]
        assert all(400 <= s < 500 for s in statuses), statuses
        assert all("error" in r.json() for r in cases)
        assert client.post("/api/judgements", headers=headers, json=base).status_code == 201  # still works


def test_a_malformed_undo_undoes_nothing(any_store):
    _pairwise(any_store, n=2)
    alice, token = any_store.add_annotator("alice")
    headers = {"Authorization": f"Bearer {token}"}
    with running_server(any_store) as url, httpx.Client(base_url=url, timeout=60) as client:
        for _ in range(2):
            item = client.get("/api/next", headers=headers).json()["item"]
            assert client.post("/api/judgements", headers=headers, json={"item_id": item["id"], "choice": "A"}
                               ).status_code == 201
        bad = [client.post("/api/undo", headers=headers, json={"judgement_id": "1x"}),
               client.post("/api/undo", headers=headers, json={"judgment_id": 1}),
               client.post("/api/undo", headers=headers, json=[1]),
               client.post("/api/undo", headers={**headers, "content-type": "text/plain"}, content=b"1")]
        assert [r.status_code for r in bad] == [400] * 4
        assert len(any_store.judgements()) == 2  # nothing was retracted
        first = any_store.judgements()[0].id
        assert client.post("/api/undo", headers=headers, json={"judgement_id": first}).json()["retracted"]["id"] == \
            first
        assert client.post("/api/undo", headers=headers).json()["retracted"] is not None  # no body: the latest
    assert any_store.judgements() == []


def test_texts_with_nul_are_refused_with_file_and_line(any_store, tmp_path):
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"prompt": "q", "responses": ["a", "b"]}\n{"prompt": "q", "responses": ["a\\u0000", "b"]}\n')
    from moss_rlhf.data.formats import DataError

    with pytest.raises(DataError, match=r"c.jsonl:2: .*NUL"):
        import_candidates(any_store, "imp", bad)
    with pytest.raises(FeedbackError, match="guideline version"):
        any_store.create_project("long", guideline_version="v" * 65)


def test_identical_replies_never_make_a_pair(any_store, tmp_path):
    pid = _pairwise(any_store, n=3, responses=[["same", "same"], ["good", "bad"], [" twice", "twice "]])
    people = [any_store.add_annotator(f"a{i}")[0] for i in range(1)]
    while (view := any_store.next_item(people[0].id, pid)) is not None:
        any_store.submit(people[0].id, Submission(item_id=view.id, choice="A"))
    summary = export_preferences(any_store, "p", tmp_path / "prefs.jsonl")
    assert (summary.pairs, summary.identical) == (1, 2)
    from moss_rlhf.data.formats import load_preferences

    assert [(p.chosen, p.rejected) for p in load_preferences(str(tmp_path / "prefs.jsonl"))] in (
        [("good", "bad")], [("bad", "good")])


def test_export_of_a_project_without_judgements_is_an_error(any_store, tmp_path):
    _pairwise(any_store, n=2)
    with pytest.raises(FeedbackError, match="no judgements: nothing to export"):
        export_preferences(any_store, "p", tmp_path / "prefs.jsonl")


def test_a_missing_or_broken_database_is_one_clear_error(tmp_path):
    with pytest.raises(FeedbackError, match="no feedback database there"):
        Store(str(tmp_path / "typo.db"), create=False)
    assert not (tmp_path / "typo.db").exists()
    (tmp_path / "notes.db").write_text("this is not a database\n" * 100)
    with pytest.raises(FeedbackError, match="cannot open the database"):
        Store(str(tmp_path / "notes.db"))
    with pytest.raises(FeedbackError, match=r"cannot open the database.*"):
        Store("postgresql+psycopg://someone:secret@127.0.0.1:9/none")
    try:
        Store("postgresql+psycopg://someone:secret@127.0.0.1:9/none")
    except FeedbackError as e:
        assert "secret" not in str(e) and "***" in str(e)  # the password is never printed


def test_logout_ends_the_session_and_tokens_rotate(any_store):
    alice, token = any_store.add_annotator("alice")
    session = any_store.open_session(alice.id)
    assert any_store.session_annotator(session) == alice
    assert any_store.session_annotator(token) is None  # a session id is not the permanent token, and vice versa
    assert any_store.authenticate(session) is None
    any_store.close_session(session)
    assert any_store.session_annotator(session) is None
    other = any_store.open_session(alice.id)
    new_token = any_store.rotate_token("alice")
    assert any_store.authenticate(token) is None and any_store.authenticate(new_token) == alice
    assert any_store.session_annotator(other) is None  # rotating ends every session


@pytest.mark.parametrize("name, message", [
    ("Ana", "already exists"), ("ANA", "already exists"), ("Аna", "mixes scripts"), ("Като", "looks the same"),
    ("An\u200ba", "invisible or control"), ("\u202eanA", "invisible or control"), ("Ana\x00", "invisible or control"),
])
def test_look_alike_names_are_refused(any_store, name, message):
    any_store.add_annotator("Ana")
    any_store.add_annotator("Kato")
    with pytest.raises(FeedbackError, match=message):
        any_store.add_annotator(name)
    any_store.add_annotator("田中さくら")  # one writing system, several scripts: fine


def test_serve_project_restricts_the_admin_pages(any_store):
    _pairwise(any_store, n=1)
    other = any_store.create_project("secret", "pairwise")
    _, boss = any_store.add_annotator("boss", admin=True)
    with running_server(any_store, project="p") as url, httpx.Client(base_url=url, timeout=60) as client:
        headers = {"Authorization": f"Bearer {boss}"}
        summary = client.get("/api/admin/summary", headers=headers).json()
        assert [p["name"] for p in summary["projects"]] == ["p"]
        assert client.get(f"/api/admin/summary?project={other}", headers=headers).status_code == 404
        assert client.get("/api/admin/summary?project=secret", headers=headers).status_code == 404


def test_failed_sign_ins_are_rate_limited(any_store):
    import re

    _, token = any_store.add_annotator("alice")
    with running_server(any_store, login_attempts=3) as url, httpx.Client(base_url=url, timeout=60) as client:
        def attempt(value):
            page = client.get("/login").text
            nonce = re.search(r'name="login_nonce" value="([^"]+)"', page).group(1)
            return client.post("/login", data={"token": value, "login_nonce": nonce}, follow_redirects=False)

        assert [attempt("wrong").status_code for _ in range(3)] == [401, 401, 401]
        limited = attempt(token)
        assert limited.status_code == 429 and int(limited.headers["Retry-After"]) > 0


def test_sessions_in_the_browser_flow_end_at_logout(any_store):
    import re

    _pairwise(any_store, n=1)
    _, token = any_store.add_annotator("alice")
    with running_server(any_store) as url, httpx.Client(base_url=url, timeout=60) as client:
        page = client.get("/login").text
        nonce = re.search(r'name="login_nonce" value="([^"]+)"', page).group(1)
        assert client.post("/login", data={"token": token, "login_nonce": nonce}).status_code == 303
        cookie = client.cookies.get("mrf_session")
        assert cookie and cookie != token  # the cookie is a session id, not the permanent token
        label = client.get("/label").text
        csrf = re.search(r'name="csrf" value="([^"]+)"', label).group(1)
        assert client.post("/logout", data={"csrf": csrf}, follow_redirects=False).status_code == 303
        stolen = httpx.get(f"{url}/api/next", cookies={"mrf_session": cookie})
        assert stolen.status_code == 401  # a copied cookie is worthless after logout
