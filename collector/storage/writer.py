"""Writer threads: batches queue up and are committed in groups.

Several requests write concurrently, but the database takes one writer at a
time (SQLite) or pays a commit per transaction (both). Handing every batch to
one thread that drains whatever has queued into a single transaction (group
commit) pays the transaction overhead once per group, and keeps the GIL
hand-offs of the SQLite driver (it releases the GIL around every row) between
two threads rather than every request's. A group that fails is retried one
batch at a time, so one bad batch cannot fail its neighbours.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import psycopg
import sqlalchemy.exc

from runwatch.collector.batch import Batch
from runwatch.collector.errors import Unavailable
from runwatch.collector.storage.points import Prepared, WriteResult, write_batches
from runwatch.collector.storage.store import Store

log = logging.getLogger("runwatch.collector")

MAX_QUEUED_BATCHES = 256
"""Beyond this the collector answers 503 and agents back off: memory stays bounded."""
MAX_GROUP_POINTS = 50_000
"""A group stops growing here, so one commit never holds the writer for long."""

_Job = tuple[Batch, Prepared | None, "Future[WriteResult]"]

TRANSIENT_ERRORS = (
    sqlite3.OperationalError,
    psycopg.OperationalError,
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.TimeoutError,
)


POSTGRES_WRITERS = 3
"""PostgreSQL takes concurrent writers; each thread mostly waits on the server."""


class BatchWriter:
    """Accepts validated batches from any thread; commits them from its own threads.

    SQLite gets one writer thread (it takes one writer at a time anyway);
    PostgreSQL gets :data:`POSTGRES_WRITERS`, each committing its own groups.
    """

    def __init__(
        self,
        store: Store,
        *,
        max_queued: int = MAX_QUEUED_BATCHES,
        observe: Callable[[float], None] | None = None,
    ) -> None:
        """``observe`` receives the duration of every group's transaction, in seconds."""
        self.store = store
        self._observe = observe
        self._jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=max_queued)
        count = POSTGRES_WRITERS if store.dialect == "postgresql" else 1
        self._threads = [
            threading.Thread(target=self._run, name=f"runwatch-writer-{i}", daemon=True)
            for i in range(count)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, batch: Batch, prepared: Prepared | None = None) -> Future[WriteResult]:
        """Queue ``batch``; the future resolves once it is committed (or fails)."""
        future: Future[WriteResult] = Future()
        try:
            self._jobs.put_nowait((batch, prepared, future))
        except queue.Full:
            raise Unavailable(
                f"the collector has {self._jobs.maxsize} batches waiting to be written; "
                "retry with backoff",
                reason="overloaded",
            ) from None
        return future

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop the threads."""
        for _ in self._threads:
            try:
                self._jobs.put(None, timeout=timeout)
            except queue.Full:
                break
        for thread in self._threads:
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            group, stop = self._next_group()
            if group:
                try:
                    self._write(group)
                except Exception:  # never let the thread die: later batches would hang
                    log.exception("writer failed on a group of %d batches", len(group))
            if stop:
                return

    def _next_group(self) -> tuple[list[_Job], bool]:
        """Block for one job, then take what else has queued; True when told to stop."""
        group: list[_Job] = []
        points = 0
        job = self._jobs.get()
        while job is not None:
            batch, _, future = job
            # A job whose request was cancelled is dropped (the agent will resend it);
            # once running, its future can no longer be cancelled under our feet.
            if future.set_running_or_notify_cancel():
                group.append(job)
                points += len(batch)
            if points >= MAX_GROUP_POINTS:
                return group, False
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return group, False
        return group, True

    def _write(self, group: list[_Job]) -> None:
        started = time.perf_counter()
        try:
            results = write_batches(
                self.store, [batch for batch, _, _ in group], [ready for _, ready, _ in group]
            )
            if self._observe is not None:
                self._observe(time.perf_counter() - started)
        except Exception as exc:
            if len(group) > 1:
                log.warning(
                    "group of %d batches failed (%s); writing them one by one", len(group), exc
                )
                for job in group:
                    self._write([job])
                return
            group[0][2].set_exception(_as_reply(exc, group[0][0]))
            return
        for (_, _, future), result in zip(group, results, strict=True):
            future.set_result(result)


def _as_reply(exc: Exception, batch: Batch) -> Exception:
    """A database that is busy, locked or gone means 'retry later'; anything else is a bug.

    The hot path talks to the driver directly, so its errors arrive unwrapped.
    """
    if isinstance(exc, TRANSIENT_ERRORS):
        log.warning("could not store a batch of run %d: %s", batch.run, exc)
        return Unavailable(f"the batch could not be stored now ({type(exc).__name__}); retry")
    log.error("could not store a batch of run %d", batch.run, exc_info=exc)
    return exc
