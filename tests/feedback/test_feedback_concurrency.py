"""20 annotators submitting 50 judgements each against a running server: nothing lost, nothing duplicated — on a
SQLite file and on a real PostgreSQL server (skipped unless MOSS_RLHF_TEST_POSTGRES_URL is set)."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import sqlalchemy as sa
from fbtools import add_pairwise_project, running_server

from moss_rlhf.feedback.simulate import AnnotatorModel, simulate_http

ANNOTATORS, EACH = 20, 50


def _length_scorer(messages, response):
    return float(len(response))


@pytest.mark.slow
def test_twenty_annotators_fifty_judgements_each(any_store):
    store = any_store
    # Every annotator must judge every item: 50 items x 20 annotators, all claiming the same items at once.
    add_pairwise_project(store, "load", n_items=EACH, annotators_per_item=ANNOTATORS,
                         responses=[[f"short {i}", f"a longer answer {i}"] for i in range(EACH)])
    tokens = [store.add_annotator(f"user-{n:02d}")[1] for n in range(ANNOTATORS)]
    with running_server(store) as url:
        started = time.perf_counter()
        summary, logs = simulate_http(url, tokens, AnnotatorModel(temperature=1.0), seed=1, scorer=_length_scorer,
                                      limit=EACH + 5)  # asks for more than there is: each runs out at 50
        elapsed = time.perf_counter() - started
        print(f"\n{store.url.split(':')[0]}: {ANNOTATORS * EACH} judgements over HTTP in {elapsed:.1f}s")
        assert summary.judgements == ANNOTATORS * EACH
        assert all(len(log.sent) == EACH for log in logs)
        assert all(status == 201 for log in logs for _, status, _ in log.sent)

        # Resubmit every 5th payload of every annotator, twice each, all at once: same rows come back, none added.
        local = threading.local()

        def resend(args):
            token, payload, judgement_id = args
            if not hasattr(local, "client"):  # one client per thread (creating one costs ~0.1 s)
                local.client = httpx.Client(base_url=url, timeout=60)
            r = local.client.post("/api/judgements", json=payload, headers={"Authorization": f"Bearer {token}"})
            return r.status_code, r.json()["judgement"]["id"], judgement_id

        jobs = [(log.token, payload, jid) for log in logs for payload, _, jid in log.sent[::5]] * 2
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=ANNOTATORS) as pool:
            results = list(pool.map(resend, jobs))
        print(f"{len(jobs)} resubmissions in {time.perf_counter() - started:.1f}s")
        assert all(status == 200 and got == expected for status, got, expected in results)
    with store.engine.connect() as c:
        total = c.execute(sa.text("SELECT count(*) FROM judgements")).scalar_one()
        pairs = c.execute(sa.text("SELECT count(*) FROM (SELECT DISTINCT annotator_id, item_id FROM judgements) d"))
        uuids = c.execute(sa.text("SELECT count(DISTINCT submission_id) FROM judgements")).scalar_one()
        assignments = c.execute(sa.text("SELECT count(*) FROM assignments")).scalar_one()
        retracted = c.execute(sa.text("SELECT count(*) FROM retractions")).scalar_one()
        per_item = c.execute(sa.text("SELECT max(n), min(n) FROM (SELECT item_id, count(*) AS n FROM judgements "
                                     "GROUP BY item_id) d")).one()
    sent = {payload["submission_id"] for log in logs for payload, _, _ in log.sent}
    assert total == uuids == pairs.scalar_one() == assignments == len(sent) == ANNOTATORS * EACH
    assert retracted == 0 and tuple(per_item) == (ANNOTATORS, ANNOTATORS)


@pytest.mark.parametrize("same_uuid", [True, False], ids=["same-uuid", "fresh-uuids"])
def test_racing_submissions_store_one_row(any_store, same_uuid):
    """Four copies of an annotator's answer posted at the same instant: with one UUID (a client retrying) they all
    get the one stored row; with four UUIDs (four tabs) one is stored and the others are refused as already judged."""
    store = any_store
    add_pairwise_project(store, "race", n_items=6, annotators_per_item=1)
    tokens = [store.add_annotator(f"racer-{n}")[1] for n in range(6)]
    copies = 4
    with running_server(store) as url:
        payloads = []
        for token in tokens:
            got = httpx.get(f"{url}/api/next", headers={"Authorization": f"Bearer {token}"}, timeout=30).json()
            for _ in range(copies):
                sid = got["submission_id"] if same_uuid else str(uuid.uuid4())
                payloads.append((token, {"item_id": got["item"]["id"], "submission_id": sid, "choice": "A"}))
        barrier = threading.Barrier(len(payloads), timeout=60)

        def post(job):
            token, payload = job
            with httpx.Client(timeout=60) as client:
                barrier.wait()
                return client.post(f"{url}/api/judgements", json=payload,
                                   headers={"Authorization": f"Bearer {token}"})

        with ThreadPoolExecutor(max_workers=len(payloads)) as pool:
            responses = list(pool.map(post, payloads))
    codes = [r.status_code for r in responses]
    assert codes.count(201) == len(tokens)
    assert set(codes) == ({201, 200} if same_uuid else {201, 409})
    if same_uuid:
        for n in range(len(tokens)):
            group = responses[n * copies:(n + 1) * copies]
            assert len({r.json()["judgement"]["id"] for r in group}) == 1
    with store.engine.connect() as c:
        assert c.execute(sa.text("SELECT count(*) FROM judgements")).scalar_one() == len(tokens)
