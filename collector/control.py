"""The control channel: commands for a run's ranks, in ingest replies and a long poll.

An operator (``POST /api/v1/runs/{id}/commands``) or, later, the policy engine
issues a command; every rank receives it in the reply to its next ingest batch,
or from ``GET /api/v1/runs/{id}/commands/pending`` when it is idle, and gets it
again in every reply until it acknowledges it (``POST /api/v1/commands/{id}/ack``).
The agent deduplicates by id and acknowledges again, which makes delivery
exactly-once on the trainer's side. States and the audit log are described in
:mod:`runwatch.collector.storage.commands`.

**at_step.** Ranks must apply a command at the same step, or the next collective
hangs or the replicas diverge. A command issued without ``at_step`` gets
``next_safe_step(run)``: the run's latest step (that of its most recently written
point, which goes back after a rollback) plus the steps the run makes in ~5 s of
delivery at its pace, ``ceil(5 / step_time)`` with rank 0's latest
``train/step_time``, or 1 step when the run reports no step time. Every rank then
holds the command before that step and applies it at its boundary; a rank that
receives it after that step acknowledges ``expired`` instead of applying it late.

**Rollback targets** are resolved when the command is issued, in the same
transaction: ``{"checkpoint": "last_good" | id, ...}`` is stored and delivered as
the checkpoint's id, path and step (see
:func:`runwatch.collector.storage.checkpoints.resolve_rollback`), so that every
rank loads the same file even if the labels change meanwhile; a run without a good
checkpoint, or an unknown, deleted or foreign id, is a :class:`Conflict`.

**No query per batch.** Ingest must not pay a database round trip for commands.
The channel keeps in memory the runs that have a deliverable command (loaded from
the database at start; a run enters when a command is issued and leaves once the
last of its commands expires) and only those runs are queried. Within such a run,
a rank found to have nothing left is remembered until the run's next command, so
a rank that has acknowledged everything costs no query either. Acks and cancels
only ever shrink what is deliverable, so they need no update of that memory.

**One process.** That memory is this process's own. Several collector replicas
behind a load balancer would each miss commands issued through another one: they
would need to reload the live runs from the database every second or two (a short
TTL on the set) and to notify long polls through the database (PostgreSQL
``LISTEN``/``NOTIFY``) instead of in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection
from starlette.concurrency import run_in_threadpool

from runwatch.collector.errors import Conflict, InvalidInput, NotFound
from runwatch.collector.storage.checkpoints import DEFAULT_WINDOW, Window, resolve_rollback
from runwatch.collector.storage.commands import (
    DELIVERY_LEAD_SECONDS,
    CommandFilter,
    CommandRecord,
    cancel_command,
    command_run,
    deliverable,
    expire_due,
    get_command,
    insert_command,
    list_commands,
    live_runs,
    mark_delivered,
    next_safe_step,
    record_ack,
)
from runwatch.collector.storage.runs import get_run, run_project_id
from runwatch.collector.storage.store import Store

log = logging.getLogger("runwatch.collector.control")

DEFAULT_TTL_SECONDS = 600.0
"""How long a command stays deliverable when its issuer sets no ``expires_in``."""
MAX_WAIT_SECONDS = 30.0
"""Longest long poll."""


@dataclass(slots=True)
class _Live:
    """A run with deliverable commands, as this process knows it."""

    until: float
    """The latest ``expires_at`` among them: past it, nothing is deliverable."""
    version: int
    """Changes with every new command of the run."""
    drained: dict[int, int] = field(default_factory=dict)
    """Rank -> the version at which it had nothing left to receive."""


class ControlChannel:
    """Issues, delivers, acknowledges and cancels commands; wakes long polls.

    Thread-safe: the synchronous methods run in the request thread pool, and
    :meth:`wait_pending` on the event loop. ``clock`` gives Unix time (tests move it).

    >>> from runwatch.db import make_engine
    >>> from runwatch.collector.storage import migrate
    >>> store = Store(make_engine("sqlite://"))
    >>> migrate.upgrade(store.engine)
    >>> control = ControlChannel(store)
    >>> control.load()
    >>> control.has_live(1)
    False
    >>> store.dispose()
    """

    def __init__(
        self,
        store: Store,
        *,
        ttl: float = DEFAULT_TTL_SECONDS,
        lead: float = DELIVERY_LEAD_SECONDS,
        clock: Callable[[], float] = time.time,
        checkpoint_window: Window = DEFAULT_WINDOW,
    ) -> None:
        self.store = store
        self.ttl = ttl
        self.lead = lead
        self.clock = clock
        self.checkpoint_window = checkpoint_window
        self._lock = threading.Lock()
        self._live: dict[int, _Live] = {}
        self._versions = itertools.count(1)
        self._waiters: dict[int, set[asyncio.Future[None]]] = {}
        self._closed = False

    def load(self) -> None:
        """Expire what expired while the collector was down; remember the live runs."""
        now = self.clock()
        with self.store.write() as conn:
            expire_due(conn, now)
            found = live_runs(conn, now)
        with self._lock:
            self._live = {run: _Live(until, next(self._versions)) for run, until in found.items()}

    def close(self) -> None:
        """Answer every long poll now (with nothing) and refuse to wait from now on."""
        with self._lock:
            self._closed = True
            waiters = [w for ws in self._waiters.values() for w in ws]
        _wake(waiters)

    # -- delivery --------------------------------------------------------------------
    def has_live(self, run_id: int) -> bool:
        """False when the run certainly has nothing to deliver (no lock, no database)."""
        return run_id in self._live

    def pending(self, run_id: int, rank: int) -> list[CommandRecord]:
        """What ``rank`` should receive now, oldest first; marks first deliveries.

        Returned records carry no acks and the state from before this delivery.
        """
        with self._lock:
            entry = self._live.get(run_id)
            if entry is None:
                return []
            version = entry.version
            if entry.drained.get(rank) == version:
                return []
            now = self.clock()
            ended = entry.until <= now
            if ended:
                del self._live[run_id]
        if ended:
            with self.store.write() as conn:
                expire_due(conn, now, run_id=run_id)
            return []
        with self.store.read() as conn:
            found = deliverable(conn, run_id, rank, now)
        first = [c.id for c in found if c.delivered_at is None]
        if first:
            with self.store.write() as conn:
                mark_delivered(conn, first, now)
        if not found:
            with self._lock:
                if self._live.get(run_id) is entry and entry.version == version:
                    entry.drained[rank] = version
        return found

    async def wait_pending(self, run_id: int, rank: int, wait: float) -> list[CommandRecord]:
        """:meth:`pending`, waiting up to ``wait`` seconds for a command when there is none."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(max(wait, 0.0), MAX_WAIT_SECONDS)
        while True:
            waiter: asyncio.Future[None] = loop.create_future()
            with self._lock:
                closed = self._closed
                # Registered before looking, so that a command issued meanwhile wakes us.
                self._waiters.setdefault(run_id, set()).add(waiter)
            try:
                found = (
                    await run_in_threadpool(self.pending, run_id, rank)
                    if self.has_live(run_id)
                    else []
                )
                remaining = deadline - loop.time()
                if found or remaining <= 0 or closed:
                    return found
                await asyncio.wait([waiter], timeout=remaining)
            finally:
                with self._lock:
                    waiting = self._waiters.get(run_id)
                    if waiting is not None:
                        waiting.discard(waiter)
                        if not waiting:
                            del self._waiters[run_id]

    # -- operations ------------------------------------------------------------------
    def issue(
        self,
        run_id: int,
        type: str,
        args: dict[str, Any],
        *,
        source: str,
        at_step: int | None = None,
        expires_in: float | None = None,
    ) -> CommandRecord:
        """Store a command for every rank of a running run and wake its long polls.

        ``type`` and ``args`` are validated by the caller (``api.schemas``); a rollback's
        ``args`` are stored resolved (:func:`resolve_rollback`).
        """
        now = self.clock()
        expires_at = now + (self.ttl if expires_in is None else expires_in)
        with self.store.write() as conn:
            run = get_run(conn, run_id)
            if run.state != "running":
                raise Conflict(f"run {run_id} is {run.state}; commands go to running runs only")
            if type == "rollback":
                args = resolve_rollback(conn, run_id, args, self.checkpoint_window)
            if at_step is None:
                at_step = next_safe_step(conn, run, lead=self.lead)
            command_id = insert_command(
                conn,
                run_id=run_id,
                type=type,
                args=args,
                at_step=at_step,
                source=source,
                now=now,
                expires_at=expires_at,
            )
            record = get_command(conn, command_id)
        # Only after the commit: a rank that sees the new version must find the row.
        with self._lock:
            entry = self._live.get(run_id)
            if entry is None:
                self._live[run_id] = _Live(expires_at, next(self._versions))
            else:
                entry.until = max(entry.until, expires_at)
                entry.version = next(self._versions)
            waiters = list(self._waiters.get(run_id, ()))
        _wake(waiters)
        log.info(
            "command %d (%s %s at step %s) issued to run %d by %s",
            record.id,
            type,
            args,
            at_step,
            run_id,
            source,
        )
        return record

    def ack(
        self,
        command_id: int,
        *,
        run_id: int,
        rank: int,
        status: str,
        detail: str,
        step: int | None,
        project_id: int | None,
    ) -> CommandRecord:
        """Record ``rank``'s outcome (the first one per rank counts); returns the command."""
        now = self.clock()
        with self.store.write() as conn:
            owner = self._visible_run(conn, command_id, project_id)
            if owner != run_id:
                raise InvalidInput(f"command {command_id} belongs to run {owner}, not run {run_id}")
            expire_due(conn, now, run_id=owner)
            if record_ack(
                conn, command_id, rank=rank, status=status, detail=detail, step=step, now=now
            ):
                log.info("command %d: rank %d reports %s %s", command_id, rank, status, detail)
            return get_command(conn, command_id)

    def cancel(self, command_id: int, *, by: str, project_id: int | None) -> CommandRecord:
        """Stop delivering a pending or delivered command; :class:`Conflict` once it ended.

        Ranks that already hold it may still apply it (they report so in their ack).
        """
        now = self.clock()
        with self.store.write() as conn:
            run_id = self._visible_run(conn, command_id, project_id)
            expire_due(conn, now, run_id=run_id)
            cancel_command(conn, command_id, by=by, now=now)
            record = get_command(conn, command_id)
        log.info("command %d of run %d cancelled by %s", command_id, run_id, by)
        return record

    def commands(self, run_id: int, where: CommandFilter) -> list[CommandRecord]:
        """The run's commands with every rank's outcome, oldest first (the audit view)."""
        now = self.clock()
        with self.store.write() as conn:
            expire_due(conn, now, run_id=run_id)
            return list_commands(conn, run_id, where)

    @staticmethod
    def _visible_run(conn: Connection, command_id: int, project_id: int | None) -> int:
        """The command's run; :class:`NotFound` when absent or outside ``project_id``."""
        run_id = command_run(conn, command_id)
        if run_id is None or (
            project_id is not None and run_project_id(conn, run_id) != project_id
        ):
            raise NotFound(f"unknown command {command_id}")
        return run_id


def _wake(waiters: list[asyncio.Future[None]]) -> None:
    for waiter in waiters:
        # A closed loop (RuntimeError) has nobody waiting any more.
        with contextlib.suppress(RuntimeError):
            waiter.get_loop().call_soon_threadsafe(_resolve, waiter)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
