"""The web app: authentication (401/403), CSRF, body limit (413), escaping, the form and JSON flows."""

from __future__ import annotations

import re
import uuid

import pytest
from fbtools import add_pairwise_project
from fastapi.testclient import TestClient

from moss_rlhf.feedback.app import create_app

XSS_PROMPT = "<script>alert('p')</script> & <b>bold?</b>"
XSS_RESPONSES = ["<img src=x onerror=alert('a')>", "</div><script>alert(\"b\")</script>"]


@pytest.fixture
def world(sqlite_store):
    add_pairwise_project(sqlite_store, n_items=3, annotators_per_item=2,
                         prompts=[XSS_PROMPT, "q1", "q2"],
                         responses=[XSS_RESPONSES, ["good 1", "bad 1"], ["good 2", "bad 2"]])
    _, alice = sqlite_store.add_annotator("alice")
    _, boss = sqlite_store.add_annotator("boss", admin=True)
    return sqlite_store, alice, boss


def _client(store, **kw):
    return TestClient(create_app(store, **kw), base_url="http://testserver", follow_redirects=False)


def _login(client, token):
    page = client.get("/login")
    nonce = re.search(r'name="login_nonce" value="([^"]+)"', page.text).group(1)
    return client.post("/login", data={"token": token, "login_nonce": nonce})


def _csrf(html):
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def test_every_route_needs_a_valid_token(world):
    store, alice, boss = world
    client = _client(store)
    for path in ("/label", "/admin", "/api/next", "/api/progress", "/api/admin/summary"):
        assert client.get(path).status_code == 401, path
        assert client.get(path, headers={"Authorization": "Bearer nope"}).status_code == 401, path
    assert client.post("/api/judgements", json={"item_id": 1, "choice": "A"}).status_code == 401
    assert client.post("/api/undo").status_code == 401
    assert client.post("/label/submit", data={"item_id": "1", "choice": "A"}).status_code == 401
    assert client.get("/label").headers["content-type"].startswith("text/html")  # the sign-in page, with 401
    annotator = {"Authorization": f"Bearer {alice}"}
    assert client.get("/api/next", headers=annotator).status_code == 200
    assert client.get("/admin", headers=annotator).status_code == 403
    assert client.get("/api/admin/summary", headers=annotator).status_code == 403
    admin = {"Authorization": f"Bearer {boss}"}
    assert client.get("/api/admin/summary", headers=admin).status_code == 200
    assert client.get("/admin", headers=admin).status_code == 200


def test_login_sets_a_strict_httponly_cookie_and_forms_need_csrf(world):
    store, alice, _ = world
    client = _client(store)
    assert _login(client, "wrong").status_code == 401
    response = _login(client, alice)
    assert response.status_code == 303 and response.headers["location"] == "/label"
    cookie = response.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict") and "Path=/" in cookie
    page = client.get("/label")
    assert page.status_code == 200
    csrf = _csrf(page.text)
    item_id = re.search(r'name="item_id" value="(\d+)"', page.text).group(1)
    shown = re.search(r'name="shown_order" value="([\d,]+)"', page.text).group(1)
    form = {"item_id": item_id, "shown_order": shown, "choice": "A", "submission_id": str(uuid.uuid4())}
    assert client.post("/label/submit", data=form).status_code == 403  # no CSRF token
    assert client.post("/label/submit", data={**form, "csrf": "0" * 64}).status_code == 403
    assert client.post("/api/judgements", json={"item_id": int(item_id), "choice": "A"}).status_code == 403
    ok = client.post("/label/submit", data={**form, "csrf": csrf, "strength": "much", "rationale": "why",
                                            "time_ms": "2500"})
    assert ok.status_code == 303
    again = client.post("/label/submit", data={**form, "csrf": csrf})  # a double submit: same UUID, no new row
    assert again.status_code == 303
    rows = store.judgements()
    assert len(rows) == 1 and rows[0].strength == "much" and rows[0].time_ms == 2500 and rows[0].rationale == "why"
    undo = client.post("/label/undo", data={"csrf": csrf})
    assert undo.status_code == 303 and undo.headers["location"] == f"/label?item={item_id}"
    assert store.judgements() == [] and store.judgements(include_retracted=True)[0].retracted
    assert client.post("/logout", data={"csrf": csrf}).status_code == 303


def test_model_text_is_escaped_in_the_page(world):
    store, alice, _ = world
    client = _client(store)
    page = client.get("/label", headers={"Authorization": f"Bearer {alice}"})
    assert page.status_code == 200
    html = page.text
    assert "<script>alert" not in html and "<img src=x" not in html and "<b>bold" not in html
    assert "&lt;script&gt;alert(&#39;p&#39;)&lt;/script&gt; &amp; &lt;b&gt;bold?&lt;/b&gt;" in html
    assert "&lt;img src=x onerror=alert(&#39;a&#39;)&gt;" in html
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"


def test_body_limit_gives_413(world):
    store, alice, _ = world
    client = _client(store, max_body_bytes=1024)
    headers = {"Authorization": f"Bearer {alice}"}
    big = client.post("/api/judgements", headers=headers,
                      json={"item_id": 1, "choice": "A", "rationale": "x" * 5000})
    assert big.status_code == 413

    def chunks():  # no Content-Length: the limit holds while the body streams in
        for _ in range(10):
            yield b"y" * 512

    streamed = client.post("/api/judgements", headers={**headers, "content-type": "application/json"},
                           content=chunks())
    assert streamed.status_code == 413
    assert client.post("/login", data={"token": "t" * 4000}).status_code == 413


def test_json_api_flow(world):
    store, alice, boss = world
    client = _client(store)
    headers = {"Authorization": f"Bearer {alice}"}
    got = client.get("/api/next", headers=headers).json()
    item = got["item"]
    assert item["messages"][0]["content"] == XSS_PROMPT and [c["label"] for c in item["candidates"]] == ["A", "B"]
    payload = {"item_id": item["id"], "submission_id": got["submission_id"], "choice": "B", "strength": "slightly",
               "shown_order": item["shown_order"], "time_ms": 900}
    first = client.post("/api/judgements", headers=headers, json=payload)
    second = client.post("/api/judgements", headers=headers, json=payload)
    assert (first.status_code, second.status_code) == (201, 200)
    assert first.json()["judgement"]["id"] == second.json()["judgement"]["id"]
    assert first.json()["judgement"]["preferred_candidate_id"] == item["shown_order"][1]
    assert client.post("/api/judgements", headers=headers, json={**payload, "submission_id": str(uuid.uuid4())}
                       ).status_code == 409
    assert client.post("/api/judgements", headers=headers, json={"item_id": item["id"], "choice": "C"}
                       ).status_code == 422
    assert client.post("/api/judgements", headers=headers, content=b"{not json",
                       ).status_code == 400
    assert client.get("/api/progress", headers=headers).json() == {"done": 1, "total": 3, "remaining": 2}
    summary = client.get("/api/admin/summary", headers={"Authorization": f"Bearer {boss}"}).json()
    assert {a["name"]: a["judged"] for a in summary["annotators"]}["alice"] == 1
    undo = client.post("/api/undo", headers=headers).json()
    assert undo["retracted"]["id"] == first.json()["judgement"]["id"]
    assert client.get("/api/progress", headers=headers).json()["done"] == 0


def test_ranking_and_rating_forms(sqlite_store):
    pid = sqlite_store.create_project("k4", "ranking", 1)
    sqlite_store.add_items(pid, [
        {"messages": [{"role": "user", "content": "rank"}], "responses": ["w", "x", "y", "z"]},
        {"messages": [{"role": "user", "content": "rate"}], "responses": ["lo", "hi"], "task_type": "rating"}])
    _, token = sqlite_store.add_annotator("alice")
    client = _client(sqlite_store)
    _login(client, token)
    page = client.get("/label").text
    assert page.count('class="rank-input"') == 4
    ids = [int(x) for x in re.search(r'name="shown_order" value="([\d,]+)"', page).group(1).split(",")]
    form = {"csrf": _csrf(page), "item_id": re.search(r'name="item_id" value="(\d+)"', page).group(1),
            "shown_order": ",".join(map(str, ids)), "submission_id": str(uuid.uuid4()),
            f"rank_{ids[2]}": "1", f"rank_{ids[0]}": "2", f"rank_{ids[1]}": ""}
    assert client.post("/label/submit", data=form).status_code == 303
    assert sqlite_store.judgements()[0].ranking == [ids[2], ids[0]]
    page = client.get("/label").text
    assert page.count('type="radio" name="rating_') == 14
    ids = [int(x) for x in re.search(r'name="shown_order" value="([\d,]+)"', page).group(1).split(",")]
    form = {"csrf": _csrf(page), "item_id": re.search(r'name="item_id" value="(\d+)"', page).group(1),
            "shown_order": ",".join(map(str, ids)), "submission_id": str(uuid.uuid4()), f"rating_{ids[0]}": "6"}
    bad = client.post("/label/submit", data=form)
    assert bad.status_code == 422 and "rate every response" in bad.text
    assert client.post("/label/submit", data={**form, f"rating_{ids[1]}": "2"}).status_code == 303
    assert sqlite_store.judgements()[1].ratings == {ids[0]: 6, ids[1]: 2}
    assert "All done" in client.get("/label").text
