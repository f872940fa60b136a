"""Shared fixtures: a real collector under uvicorn on 127.0.0.1, on SQLite and PostgreSQL.

PostgreSQL runs when ``RUNWATCH_TEST_POSTGRES_URL`` names a server (``.ci/run``
sets it). Without it the PostgreSQL cases are skipped, except under CI
(``CI=true``), where a skipped PostgreSQL test is a failure.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from runwatch.client import Client
from runwatch.collector.server import ServerThread
from runwatch.collector.storage import migrate
from runwatch.collector.storage.store import Store
from runwatch.db import make_engine, metadata
from runwatch.settings import Settings

POSTGRES_ENV = "RUNWATCH_TEST_POSTGRES_URL"
T = TypeVar("T")


def wait_for(probe: Callable[[], T], what: str = "the condition", timeout: float = 15.0) -> T:
    """``probe()``'s first truthy value, polled every 50 ms; a test failure after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if found:
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout:g} s for {what}")
        time.sleep(0.05)


def _postgres_base_url() -> str:
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        if os.environ.get("CI"):
            pytest.fail(f"{POSTGRES_ENV} is not set: PostgreSQL tests may not be skipped in CI")
        pytest.skip(f"{POSTGRES_ENV} not set")
    return url


@contextmanager
def scratch_postgres_database() -> Iterator[str]:
    """URL of a new, empty database on the test server, dropped afterwards."""
    base = make_url(_postgres_base_url()).set(drivername="postgresql+psycopg")
    name = f"runwatch_test_{uuid.uuid4().hex[:10]}"
    admin = make_engine(base.render_as_string(hide_password=False), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        pytest.fail(f"cannot create a test database on {base.render_as_string()}: {exc}")
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A database on the test server shared by the session, migrated once."""
    with scratch_postgres_database() as url:
        engine = make_engine(url)
        migrate.upgrade(engine)
        engine.dispose()
        yield url


def _truncate_postgres(url: str) -> None:
    engine = make_engine(url)
    tables = ", ".join(t.name for t in metadata.sorted_tables)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty, migrated-on-start database of each kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'runwatch.db'}"
    url = request.getfixturevalue("postgres_url")
    _truncate_postgres(url)
    return url


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    """A migrated store on each configured database, disposed after the test."""
    engine = make_engine(db_url)
    migrate.upgrade(engine)
    found = Store(engine)
    yield found
    found.dispose()


@dataclass
class Collector:
    """A running collector: its URL, its store, and a way to post raw bodies."""

    thread: ServerThread
    http: httpx.Client

    @property
    def url(self) -> str:
        return self.thread.url

    @property
    def store(self) -> Store:
        return self.thread.app.state.store

    def client(self, api_key: str | None = None) -> Client:
        return Client(self.url, api_key=api_key or "")

    def post(
        self, path: str, body: bytes, content_type: str, *, key: str | None = None
    ) -> httpx.Response:
        headers = {"Content-Type": content_type}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return self.http.post(path, content=body, headers=headers)


def start_collector(db_url: str, **settings: object) -> Iterator[Collector]:
    thread = ServerThread(Settings(db=db_url, host="127.0.0.1", port=0, **settings)).start()
    try:
        with httpx.Client(base_url=thread.url, timeout=30) as http:
            yield Collector(thread, http)
    finally:
        thread.stop()


@pytest.fixture
def collector(db_url: str) -> Iterator[Collector]:
    """The collector on an open loopback server, on SQLite and on PostgreSQL."""
    yield from start_collector(db_url)


@pytest.fixture
def client(collector: Collector) -> Iterator[Client]:
    with collector.client() as c:
        yield c
