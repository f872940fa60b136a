"""The handle every storage function takes: engine, write serialisation, series-id cache."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

from sqlalchemy import Connection, Engine

log = logging.getLogger("runwatch.collector")

SERIES_CACHE_SIZE = 200_000
"""Entries per in-memory id cache. Ids never change, so a full cache is cleared, never checked."""


class Store:
    """Wraps an engine with what the database itself does not give us.

    SQLite allows one writer at a time and answers a second one that started
    as a reader with ``SQLITE_BUSY`` at once (no busy-wait applies to the lock
    upgrade), so writes are serialised in-process. PostgreSQL needs no lock.
    """

    def __init__(self, engine: Engine, *, checkpoint_interval: float | None = None) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self._write_lock: AbstractContextManager[object] = (
            threading.Lock() if self.dialect == "sqlite" else nullcontext()
        )
        self._series_ids: dict[tuple[int, int, str], int] = {}
        self._run_projects: dict[int, int] = {}
        self._stop = threading.Event()
        self._checkpointer: threading.Thread | None = None
        if self.dialect == "sqlite" and checkpoint_interval is not None:
            self._checkpointer = threading.Thread(
                target=self._checkpoint_loop,
                args=(checkpoint_interval,),
                name="runwatch-sqlite-checkpoint",
                daemon=True,
            )
            self._checkpointer.start()

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A connection inside one transaction, committed on success, rolled back on error."""
        with self._write_lock, self.engine.begin() as conn:
            yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A connection for queries."""
        with self.engine.connect() as conn:
            yield conn

    def cached_series_id(self, run_id: int, rank: int, key: str) -> int | None:
        return self._series_ids.get((run_id, rank, key))

    def remember_series_ids(self, run_id: int, rank: int, ids: dict[str, int]) -> None:
        if len(self._series_ids) + len(ids) > SERIES_CACHE_SIZE:
            self._series_ids.clear()
        for key, series_id in ids.items():
            self._series_ids[(run_id, rank, key)] = series_id

    def run_project(self, run_id: int) -> int | None:
        """Cached project id of a run (runs never change project)."""
        return self._run_projects.get(run_id)

    def remember_run_project(self, run_id: int, project_id: int) -> None:
        if len(self._run_projects) >= SERIES_CACHE_SIZE:
            self._run_projects.clear()
        self._run_projects[run_id] = project_id

    def _checkpoint_loop(self, interval: float) -> None:
        """Copy the WAL back into the database file without ever blocking a writer.

        With auto-checkpoints the commit that crosses the WAL threshold does the
        copy and its fsyncs itself, which made that one ingest request ~30 ms.
        """
        while not self._stop.wait(interval):
            try:
                with self.engine.connect() as conn:
                    conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")
            except Exception:  # the next round retries; a dead database shows in /readyz
                log.debug("WAL checkpoint failed", exc_info=True)

    def dispose(self) -> None:
        self._stop.set()
        if self._checkpointer is not None:
            self._checkpointer.join(timeout=10)
        self.engine.dispose()
