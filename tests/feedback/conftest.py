"""Fixtures for the feedback tests: stores on SQLite (a temp file) and on PostgreSQL (a fresh schema in the server
named by MOSS_RLHF_TEST_POSTGRES_URL — those tests skip when it is unset)."""

from __future__ import annotations

import pytest
from fbtools import postgres_store

from moss_rlhf.feedback.store import Store


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "[postgres" in item.nodeid:
            item.add_marker(pytest.mark.postgres)


@pytest.fixture
def sqlite_store(tmp_path):
    store = Store(str(tmp_path / "feedback.db"))
    yield store
    store.close()


@pytest.fixture(params=["sqlite", "postgres"])
def any_store(request, tmp_path):
    """The same test on a SQLite file and on PostgreSQL (skipped without a server)."""
    if request.param == "sqlite":
        store = Store(str(tmp_path / "feedback.db"))
        yield store
        store.close()
    else:
        with postgres_store() as store:
            yield store
