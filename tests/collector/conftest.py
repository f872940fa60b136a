"""Fixtures of the collector tests that work on the storage layer directly."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from runwatch.collector.storage import migrate
from runwatch.collector.storage.store import Store
from runwatch.db import make_engine


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    """A migrated store on each configured database, disposed after the test."""
    engine = make_engine(db_url)
    migrate.upgrade(engine)
    found = Store(engine)
    yield found
    found.dispose()
