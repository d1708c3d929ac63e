"""The labelling page in headless Chromium: sign in, label items with the keyboard only (pairwise with strength
and rationale, a partial ranking, ratings, an undo, an edit box opened and left unchanged), find the rows in the
database, check XSS payloads stay inert
text, see the admin page's re-label queue, and save screenshots of the labelling and admin pages to
test-artifacts/."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from fbtools import running_server

from moss_rlhf.feedback.relabel import create_relabel_project
from moss_rlhf.feedback.simulate import AnnotatorModel, simulate

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
XSS_PROMPT = "Summarise: <script>alert('prompt')</script> <img src=x onerror=alert('img')>"
XSS_A = "<img src=x onerror=alert('A')>"
XSS_B = "</div><script>alert(\"B\")</script><b>not bold</b>"
FOCUSED_TOKEN = "document.activeElement && document.activeElement.id === 'token'"

pytestmark = [pytest.mark.browser, pytest.mark.slow,
              pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"needs headless Chromium at {CHROMIUM}")]


def _project(store):
    pid = store.create_project("helpfulness-v1", "pairwise", 3, guideline_version="2024-06",
                               guidelines="Prefer the response that answers the question correctly and completely.\n"
                                          "Then prefer the clearer, more concise one. Rudeness is always worse.")
    store.add_items(pid, [
        {"messages": [{"role": "system", "content": "You are a helpful gardening assistant."},
                      {"role": "user", "content": "How do I keep basil alive on a windowsill?"}],
         "responses": ["Water it every day and keep it out of the sun so the leaves don't burn.",
                       "Give it at least six hours of direct sun, water when the top 2 cm of soil feels dry, and "
                       "pinch off flower buds so the plant keeps making leaves.\n\nA south-facing window is ideal."]},
        {"messages": [{"role": "user", "content": XSS_PROMPT}], "responses": [XSS_A, XSS_B]},
        {"messages": [{"role": "user", "content": "Translate into Chinese: We eat soup today."}],
         "responses": ["我们今天吃汤。", "We eat soup today.", "我们今天喝茶。"], "task_type": "ranking"},
        {"messages": [{"role": "user", "content": "Is \"Tom is happy with the new blanket.\" positive, negative "
                                                  "or neutral?"}],
         "responses": ["The sentiment is positive.", "It is negative, obviously."], "task_type": "rating"},
    ])
    rng = random.Random(0)
    topics = ["tea", "bicycles", "rain", "libraries", "trains", "bread", "chess", "owls", "maps", "clocks",
              "kites", "honey"]
    store.add_items(pid, [{"messages": [{"role": "user", "content": f"Tell me one fact about {t}."}],
                           "responses": [f"A fact about {t}: " + "it is interesting. " * rng.randint(1, 3),
                                         f"{t.capitalize()} have a long history."],
                           "gold": 1 if n % 4 == 0 else None}
                          for n, t in enumerate(topics)])
    return pid


def _ready(page, text):
    """Wait for the page showing ``text`` to have its keyboard shortcuts installed."""
    page.wait_for_selector(f"text={text}")
    page.wait_for_selector("html[data-ready='1']", state="attached")


def _score(messages, response):
    return -len(response) / 20  # the sims like short answers


def _strength_file(folder: Path) -> Path:
    """Pairs scored by a (pretend) reward-model ensemble, as `moss-rlhf reward strength` writes them."""
    rows = [{"prompt": f"Fact {i}?", "chosen": f"yes {i}", "rejected": f"no {i}", "strength_mean": mean,
             "strength_std": 0.2} for i, mean in enumerate([2.0, 1.1, 0.05, -0.3, 3.0])]
    path = folder / "strength.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_keyboard_labelling_in_chromium(sqlite_store, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    store = sqlite_store
    _project(store)
    me, token = store.add_annotator("maria")
    _, admin_token = store.add_annotator("lead", admin=True)
    ARTIFACTS.mkdir(exist_ok=True)
    dialogs: list[str] = []
    with running_server(store) as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(f"{url}/label")
            assert "Sign in" in page.content()  # 401 shows the sign-in form
            page.goto(f"{url}/login")
            page.wait_for_function(FOCUSED_TOKEN)  # autofocus: the token field takes the keys
            page.keyboard.type(token)
            page.keyboard.press("Enter")
            page.wait_for_url(f"{url}/label")
            _ready(page, "How do I keep basil alive")

            # 1. pairwise: B is better, much better, with a rationale — keys 2, m, r, text, Esc, Enter
            assert "How do I keep basil alive" in page.inner_text(".conversation")
            assert page.inner_text(".progress-text").startswith("0 of 16")
            shown_b = page.inner_text("#card-1 .response-text")
            page.keyboard.press("2")
            page.keyboard.press("m")
            page.keyboard.press("r")
            page.keyboard.type("The second one gives concrete light and watering advice.")
            page.keyboard.press("Escape")
            assert page.is_checked("input[name=choice][value=B]") and page.is_checked("input[name=strength][value=much]")
            assert "chosen" in page.get_attribute("#card-1", "class")
            page.screenshot(path=str(ARTIFACTS / "feedback-label.png"))
            page.keyboard.press("Enter")

            # 2. XSS payloads are shown as text and nothing runs — key ← (A is better), Enter
            _ready(page, "Summarise:")
            assert page.inner_text(".msg-user .bubble") == XSS_PROMPT
            texts = sorted(page.locator(".response-text").all_inner_texts())
            assert texts == sorted([XSS_A, XSS_B])
            assert page.locator("img").count() == 0 and page.locator("b").count() == 0
            page.keyboard.press("ArrowLeft")
            page.keyboard.press("Enter")

            # 3. ranking of three, partial: keys 3, 1, Enter
            _ready(page, "Rank the responses")
            ranking_order = page.locator(".response-text").all_inner_texts()
            page.keyboard.press("3")
            page.keyboard.press("1")
            assert page.inner_text("#ranking-text").startswith("C › A")
            page.screenshot(path=str(ARTIFACTS / "feedback-ranking.png"))
            page.keyboard.press("Enter")

            # 4. ratings: 6 then 2 (the highlight moves on by itself), Enter; then undo with U and redo 7, 1
            _ready(page, "Rate each response")
            rating_order = page.locator(".response-text").all_inner_texts()
            page.keyboard.press("6")
            page.keyboard.press("2")
            page.screenshot(path=str(ARTIFACTS / "feedback-rating.png"))
            page.keyboard.press("Enter")
            _ready(page, "Tell me one fact")
            page.keyboard.press("u")
            _ready(page, "Rate each response")
            page.keyboard.press("7")
            page.keyboard.press("1")
            page.keyboard.press("e")  # edit: starts from the best-rated response, caret at the end
            page.keyboard.type(" Well spotted!")
            page.keyboard.press("Escape")
            page.keyboard.press("Enter")
            _ready(page, "Tell me one fact")
            assert page.inner_text(".progress-text").startswith("4 of 16")

            # 5. a tie, then E (the edit box opens filled with a response), Esc, Enter: nobody edited, none stored
            page.keyboard.press("3")
            page.keyboard.press("e")
            page.keyboard.press("Escape")
            page.keyboard.press("Enter")
            _ready(page, "Tell me one fact")
            assert page.inner_text(".progress-text").startswith("5 of 16")

            # Help overlay toggles with ?
            page.keyboard.press("?")
            assert page.is_visible("#help")
            page.keyboard.press("?")

            # admin page, after two simulated colleagues labelled the project
            simulate(store, "helpfulness-v1", annotators=["alex", "sam"], scorer=_score,
                     model=AnnotatorModel(temperature=0.3, error_rate=0.15), seed=2)
            admin = browser.new_page(viewport={"width": 1280, "height": 800})
            admin.goto(f"{url}/login")
            admin.wait_for_function(FOCUSED_TOKEN)
            admin.keyboard.type(admin_token)
            admin.keyboard.press("Enter")
            admin.wait_for_url(f"{url}/admin")
            assert "Krippendorff" in admin.content() and "maria" in admin.inner_text("table")
            admin.screenshot(path=str(ARTIFACTS / "feedback-admin.png"), full_page=True)
            # the re-label queue: the pairs a reward-model ensemble is least sure of, most uncertain first
            relabel_id, _ = create_relabel_project(store, "relabel-1", _strength_file(tmp_path), 3)
            admin.goto(f"{url}/admin?project={relabel_id}")
            queue = admin.locator("#uncertain tbody tr")
            assert queue.count() == 3 and "Fact 2" in queue.nth(0).inner_text()
            admin.screenshot(path=str(ARTIFACTS / "feedback-relabel-queue.png"), full_page=True)
            # an annotator may not open it
            page.goto(f"{url}/admin")
            assert "needs an admin token" in page.content()
        finally:
            browser.close()
    assert dialogs == []

    rows = {r.item_id: r for r in store.judgements(annotator_id=me.id)}
    items = {i.id: i for i in store.items()}
    first, xss, ranked, rated, tie = sorted(rows)[:5]
    text = {c.id: c.text for i in items.values() for c in i.candidates}
    assert rows[first].choice == "B" and rows[first].strength == "much" and text[rows[first].preferred_candidate_id] == shown_b
    assert rows[first].rationale == "The second one gives concrete light and watering advice."
    assert rows[xss].choice == "A"
    assert [text[c] for c in rows[ranked].ranking] == [ranking_order[2], ranking_order[0]]
    assert {text[c]: r for c, r in rows[rated].ratings.items()} == {rating_order[0]: 7, rating_order[1]: 1}
    assert rows[rated].edited == rating_order[0] + " Well spotted!"
    assert rows[tie].choice == "tie" and rows[tie].edited == ""
    assert all(r.time_ms and r.time_ms > 0 for r in rows.values())
    everything = store.judgements(annotator_id=me.id, include_retracted=True)
    assert len(everything) == 6 and sum(r.retracted for r in everything) == 1
