"""20 annotators submitting 50 judgements each against a running server: nothing lost, nothing duplicated — on a
SQLite file and on a real PostgreSQL server (skipped unless MOSS_RLHF_TEST_POSTGRES_URL is set)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import sqlalchemy as sa
from conftest import add_pairwise_project, running_server

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
        assert summary.judgements == ANNOTATORS * EACH
        assert all(len(log.sent) == EACH for log in logs)
        assert all(status == 201 for log in logs for _, status, _ in log.sent)

        # Resubmit every 5th payload of every annotator, twice each, all at once: same rows come back, none added.
        def resend(args):
            token, payload, judgement_id = args
            r = httpx.post(f"{url}/api/judgements", json=payload, headers={"Authorization": f"Bearer {token}"},
                           timeout=60)
            return r.status_code, r.json()["judgement"]["id"], judgement_id

        jobs = [(log.token, payload, jid) for log in logs for payload, _, jid in log.sent[::5]] * 2
        with ThreadPoolExecutor(max_workers=ANNOTATORS) as pool:
            results = list(pool.map(resend, jobs))
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
    print(f"\n{store.url.split(':')[0]}: {ANNOTATORS * EACH} judgements over HTTP in {elapsed:.1f}s")


def test_racing_duplicates_of_one_submission_store_one_row(any_store):
    store = any_store
    add_pairwise_project(store, "race", n_items=8, annotators_per_item=1)
    tokens = [store.add_annotator(f"racer-{n}")[1] for n in range(8)]
    with running_server(store) as url:
        def race(token):
            headers = {"Authorization": f"Bearer {token}"}
            got = httpx.get(f"{url}/api/next", headers=headers, timeout=30).json()
            payload = {"item_id": got["item"]["id"], "submission_id": got["submission_id"], "choice": "A"}
            barrier.wait()
            return [httpx.post(f"{url}/api/judgements", json=payload, headers=headers, timeout=60)
                    for _ in range(1)]

        barrier = threading.Barrier(8 * 4)
        with ThreadPoolExecutor(max_workers=8 * 4) as pool:
            responses = [r for rs in pool.map(race, [t for t in tokens for _ in range(4)]) for r in rs]
    # 4 threads per annotator: each asked for "next" (the same open item) and posted its own UUID at once;
    # exactly one judgement per annotator may win, the others are refused as already judged.
    codes = sorted(r.status_code for r in responses)
    assert codes.count(201) == 8 and set(codes) <= {201, 409}
    with store.engine.connect() as c:
        assert c.execute(sa.text("SELECT count(*) FROM judgements")).scalar_one() == 8
