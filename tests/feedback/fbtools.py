"""Helpers shared by the feedback tests (imported by name; pytest puts this directory on sys.path): a Store on a
fresh PostgreSQL schema, a uvicorn server in a thread, small projects."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from urllib.parse import urlencode

import pytest

from moss_rlhf.feedback.store import Store

PG_ENV = "MOSS_RLHF_TEST_POSTGRES_URL"


@contextmanager
def postgres_url():
    """The test server's URL, pointed at a schema of its own (dropped afterwards)."""
    url = os.environ.get(PG_ENV)
    if not url:
        pytest.skip(f"{PG_ENV} is not set (eval \"$(bash .ci/start-postgres.sh)\" starts a server)")
    import sqlalchemy as sa

    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(url)
    with admin.begin() as c:
        c.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in url else "?"
    try:
        yield url + sep + urlencode({"options": f"-csearch_path={schema}"})
    finally:
        with admin.begin() as c:
            c.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@contextmanager
def postgres_store():
    """A Store in a schema of its own, so tests never see each other's rows."""
    with postgres_url() as url:
        store = Store(url)
        try:
            yield store
        finally:
            store.close()


def _free_socket() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextmanager
def running_server(store, **app_kwargs):
    """uvicorn serving the app in a thread on 127.0.0.1 and a free port; yields the base URL."""
    import uvicorn

    from moss_rlhf.feedback.app import create_app

    sock = _free_socket()
    config = uvicorn.Config(create_app(store, **app_kwargs), log_level="warning", lifespan="off",
                            timeout_keep_alive=30, backlog=512)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()


def add_pairwise_project(store, name="p", n_items=4, annotators_per_item=2, gold_every=0, prompts=None,
                         responses=None):
    """A project of ``n_items`` pairwise items: responses "good answer i" / "bad answer i"; every ``gold_every``-th
    item is gold (the good one, position 0)."""
    pid = store.create_project(name, "pairwise", annotators_per_item)
    specs = []
    for i in range(n_items):
        prompt = prompts[i] if prompts else f"question {i}?"
        pair = responses[i] if responses else [f"good answer {i}", f"bad answer {i}"]
        specs.append({"messages": [{"role": "user", "content": prompt}], "responses": pair,
                      "gold": 0 if gold_every and i % gold_every == 0 else None})
    store.add_items(pid, specs)
    return pid
