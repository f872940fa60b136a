"""Stored points -> each run's detectors -> stored anomalies, in one daemon thread.

The ingest route hands every batch it committed to :meth:`DetectionPipeline.submit`,
which never blocks the request: a full queue drops the batch from detection (it is
stored all the same) and counts its points in
``runwatch_detection_dropped_points_total{reason="queue_overflow"}``. A replayed batch
stores nothing and is not fed again (no duplicate anomalies); it only tells that its
rank is alive.

The thread keeps one :class:`~runwatch.detectors.engine.Engine` per run, in an LRU of
``max_engines`` runs. The first time a run is seen after a start its engine is restored
from ``detector_state``, so a restarted collector needs no new warm-up; a run without a
snapshot gets a fresh engine. Points are fed in batch order; anomalies of a group of
batches are stored in one transaction through :meth:`Store.write` (on SQLite that
serialises with the ingest writer thread; the pipeline never holds the lock while
waiting for anything else, so the two cannot deadlock). Anomalies are stored *before*
engines are snapshotted: a crash between the two loses learning, never a finding.

Once anomalies are stored, ``on_anomalies`` (the policy engine, when there is one) gets
them in this thread, all those of a group together: several findings of one fault
usually arrive in one call. A consumer that raises is logged and counted, nothing more.

Every ``check_seconds`` the run detectors of running runs are asked about time passing
(``Engine.check(now, heartbeats)``), with each rank's last receive time. Those times
live only in memory: after a restart, or once a run's engine was evicted from the LRU,
a run is checked again from its next batch on. Engines are saved every
``snapshot_seconds`` (those that changed), on eviction, when their run has ended
(then they are dropped from memory), and on :meth:`close`. A crash loses at most
``snapshot_seconds`` of learning: points stored meanwhile are not replayed.

A detector that raises loses that point for its run and nothing else: the error is
counted in ``runwatch_detector_errors_total{detector}`` and logged once per (detector,
exception type). Database failures are counted in
``runwatch_detection_failures_total{operation}``; anomalies that could not be stored
because the database is unavailable are kept (up to :data:`MAX_PENDING_ANOMALIES`) and
retried.

One collector process owns detection of every run it receives. Several replicas behind a
load balancer would each keep an engine for the same run; DESIGN.md ("Scale") gives each
run to one replica through a PostgreSQL advisory-lock lease, which is not built yet.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import TypeVar

from sqlalchemy import Connection, select

from runwatch.collector.batch import Batch
from runwatch.collector.storage.anomalies import Found, insert_anomalies
from runwatch.collector.storage.detector_state import Snapshot, load_state, save_states
from runwatch.collector.storage.store import Store
from runwatch.collector.storage.tables import runs
from runwatch.collector.storage.writer import TRANSIENT_ERRORS
from runwatch.collector.telemetry import Telemetry
from runwatch.detectors.base import RunDetector, SeriesDetector
from runwatch.detectors.defaults import default_engine
from runwatch.detectors.engine import Engine

log = logging.getLogger("runwatch.collector.detection")

MAX_QUEUED_BATCHES = 4096
"""Batches waiting for the detectors; more (or :data:`MAX_QUEUED_POINTS`) skip detection."""
MAX_QUEUED_POINTS = 1_000_000
"""Points waiting for the detectors: what bounds the queue's memory (a batch may hold 100,000)."""
MAX_GROUP_POINTS = 50_000
"""A group stops growing here, so that anomalies reach the database without long delays."""
MAX_ENGINES = 1_000
"""Runs whose engine stays in memory; the least recently fed one is saved and dropped."""
MAX_PENDING_ANOMALIES = 10_000
"""Anomalies kept for a retry while the database is unavailable; the oldest go first."""
CLOSE_TIMEOUT = 10.0

T = TypeVar("T")


@dataclass(slots=True)
class _Job:
    """A committed batch (``batch`` None: only a sign of life from ``rank``)."""

    run: int
    rank: int
    received_at: float
    batch: Batch | None

    @property
    def n_points(self) -> int:
        return 0 if self.batch is None else len(self.batch)


@dataclass(slots=True)
class _RunState:
    engine: Engine
    step: int | None = None
    """Highest step fed so far (saved with the snapshot, for people reading the table)."""
    dirty: bool = False
    """Changed since it was last saved."""
    heartbeats: dict[int, float] = field(default_factory=dict)
    """Last receive time of each rank, since this process first saw the run."""


class DetectionPipeline:
    """Feeds committed batches to per-run engines in a daemon thread; see the module doc.

    ``submit`` may be called from any thread; everything else happens in the pipeline's
    own thread, so engines need no lock. ``clock`` gives wall time (receive times, the
    ``now`` of checks, ``created_at``); intervals are measured on the monotonic clock.
    """

    def __init__(
        self,
        store: Store,
        telemetry: Telemetry,
        *,
        check_seconds: float = 5.0,
        snapshot_seconds: float = 30.0,
        engine_factory: Callable[[], Engine] = default_engine,
        max_engines: int = MAX_ENGINES,
        max_queued_batches: int = MAX_QUEUED_BATCHES,
        max_queued_points: int = MAX_QUEUED_POINTS,
        clock: Callable[[], float] = time.time,
        on_anomalies: Callable[[list[Found]], None] | None = None,
    ) -> None:
        if check_seconds <= 0 or snapshot_seconds <= 0 or max_engines < 1:
            raise ValueError("need check_seconds > 0, snapshot_seconds > 0 and max_engines >= 1")
        self.store = store
        self.telemetry = telemetry
        self.check_seconds = check_seconds
        self.snapshot_seconds = snapshot_seconds
        self.engine_factory = engine_factory
        self.max_engines = max_engines
        self.max_queued_points = max_queued_points
        self.on_anomalies = on_anomalies
        self._clock = clock
        self._jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=max_queued_batches)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._queued_points = 0
        self._unfinished = 0
        self._closed = False
        # Only the pipeline thread touches what follows.
        self._runs: OrderedDict[int, _RunState] = OrderedDict()
        self._pending: list[Found] = []
        self._reported: set[tuple[str, str]] = set()
        self._store_failing = False
        self._thread = threading.Thread(target=self._loop, name="runwatch-detection", daemon=True)
        self._thread.start()

    # -- any thread -----------------------------------------------------------
    def submit(self, batch: Batch, *, stored: bool = True) -> bool:
        """Queue a committed batch for detection without blocking; False if it was dropped.

        ``stored=False`` (a replay) feeds nothing and only records that the rank is alive.
        """
        job = _Job(batch.run, batch.rank, self._clock(), batch if stored and len(batch) else None)
        n = job.n_points
        with self._lock:
            if self._closed:
                reason: str | None = "shutdown"
            elif self._queued_points + n > self.max_queued_points:
                reason = "queue_overflow"
            else:
                try:
                    self._jobs.put_nowait(job)
                except queue.Full:
                    reason = "queue_overflow"
                else:
                    self._queued_points += n
                    self._unfinished += 1
                    return True
        if n:
            self.telemetry.detection_dropped.labels(reason).inc(n)
        return False

    def wait_idle(self, timeout: float) -> bool:
        """Block until every submitted batch was fed and its anomalies stored (tests, tools)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._unfinished == 0, timeout)

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Feed what is queued, store its anomalies, save every engine, stop the thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._jobs.put(None, timeout=timeout)
        except queue.Full:
            log.warning("detection queue still full after %.0f s; stopping without it", timeout)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("detection did not stop within %.0f s; unsaved state is lost", timeout)

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    # -- the pipeline thread ----------------------------------------------------
    def _loop(self) -> None:
        now = time.monotonic()
        next_check, next_save = now + self.check_seconds, now + self.snapshot_seconds
        while True:
            wait = max(0.0, min(next_check, next_save) - time.monotonic())
            group, stop = self._next_group(wait)
            try:
                for job in group:
                    self._feed(job)
                now = time.monotonic()
                ended: list[tuple[int, _RunState]] = []
                if now >= next_check:
                    next_check = now + self.check_seconds
                    ended = self._check()
                # Findings first, snapshots after: a crash in between loses learning only.
                self._store_anomalies()
                if now >= next_save or stop:
                    next_save = now + self.snapshot_seconds
                    ended += [(run, s) for run, s in self._runs.items()]
                self._save([(run, s) for run, s in ended if s.dirty])
            except Exception:  # never let the thread die: detection would stop for good
                log.exception("detection failed on a group of %d batches", len(group))
            finally:
                self._done(group)
            if stop:
                return

    def _next_group(self, wait: float) -> tuple[list[_Job], bool]:
        """Jobs that queued up, waiting at most ``wait`` for the first; True when told to stop."""
        group: list[_Job] = []
        points = 0
        try:
            job = self._jobs.get(timeout=wait) if wait > 0 else self._jobs.get_nowait()
        except queue.Empty:
            return group, False
        while job is not None:
            group.append(job)
            points += job.n_points
            if points >= MAX_GROUP_POINTS:
                return group, False
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return group, False
        return group, True

    def _done(self, group: list[_Job]) -> None:
        if not group:
            return
        with self._idle:
            self._queued_points -= sum(job.n_points for job in group)
            self._unfinished -= len(group)
            if self._unfinished == 0:
                self._idle.notify_all()

    def _feed(self, job: _Job) -> None:
        try:
            self._feed_one(job)
        except Exception:  # e.g. an engine that cannot be made; the next batch tries again
            self.telemetry.detection_failures.labels("feed").inc()
            log.exception("detection failed on a batch of run %d", job.run)

    def _feed_one(self, job: _Job) -> None:
        state = self._state_of(job.run)
        if state is None:
            if job.n_points:
                self.telemetry.detection_dropped.labels("state_unavailable").inc(job.n_points)
            return
        if job.received_at > state.heartbeats.get(job.rank, -math.inf):
            state.heartbeats[job.rank] = job.received_at
        batch = job.batch
        if batch is None:
            return
        # The engine's observe() is what observe_many() loops over; called here point by
        # point so that a finding keeps its observation's wall time, and so that a detector
        # that raises costs one point, not the rest of the batch.
        observe = state.engine.observe
        run, rank, pending = job.run, job.rank, self._pending
        nan = math.nan
        values = [nan if v is None else v for v in batch.values]
        points = zip(batch.keys, batch.steps, values, batch.wall_times, strict=True)
        while True:
            try:
                for key, step, value, wall_time in points:
                    for anomaly in observe(key, rank, step, value, wall_time):
                        pending.append(Found(run, wall_time, anomaly))
                break
            except Exception as exc:  # the zip resumes after the point that raised
                self._detector_failed(exc)
        state.dirty = True
        top = max(batch.steps)
        state.step = top if state.step is None else max(state.step, top)

    def _state_of(self, run: int) -> _RunState | None:
        """The run's engine: in memory, restored from its snapshot, or new; None if unreadable."""
        state = self._runs.get(run)
        if state is not None:
            self._runs.move_to_end(run)
            return state
        try:
            with self.store.read() as conn:
                saved = load_state(conn, run)
        except Exception as exc:
            self.telemetry.detection_failures.labels("load_state").inc()
            log.warning("cannot read the detector state of run %d (%s); skipping", run, exc)
            return None
        state = None
        if saved is not None:
            try:
                state = _RunState(Engine.restore(saved.state), step=saved.step)
            except Exception as exc:  # e.g. a detector class renamed by an upgrade
                self.telemetry.detection_failures.labels("load_state").inc()
                log.warning(
                    "the detector state of run %d cannot be restored (%s: %s); "
                    "its detectors start over",
                    run,
                    type(exc).__name__,
                    exc,
                )
        if state is None:
            state = _RunState(self.engine_factory())
        self._runs[run] = state
        if len(self._runs) > self.max_engines:
            evicted = []
            while len(self._runs) > self.max_engines:
                evicted.append(self._runs.popitem(last=False))
            self._store_anomalies()  # findings before the snapshots that follow them
            self._save([(r, s) for r, s in evicted if s.dirty])
        self.telemetry.detection_runs.set(len(self._runs))
        return state

    def _check(self) -> list[tuple[int, _RunState]]:
        """Ask the engines of running runs about time passing; returns those of ended runs.

        Those are dropped from memory; the caller saves them. A deleted run's engine is
        dropped without being returned: there is nothing left to save it for.
        """
        if not self._runs:
            return []
        ids = list(self._runs)
        try:
            with self.store.read() as conn:
                states = _run_states(conn, ids)
        except Exception as exc:
            self.telemetry.detection_failures.labels("check").inc()
            log.warning("cannot read the state of %d run(s) (%s)", len(ids), exc)
            return []
        now = self._clock()
        ended: list[tuple[int, _RunState]] = []
        for run in ids:
            state = self._runs[run]
            if states.get(run) != "running":
                del self._runs[run]
                if run in states:
                    ended.append((run, state))
                continue
            if not state.engine.run_detectors:
                continue
            try:
                found = state.engine.check(now, dict(state.heartbeats))
            except Exception as exc:
                self._detector_failed(exc)
                continue
            state.dirty = True
            self._pending += [Found(run, now, anomaly) for anomaly in found]
        self.telemetry.detection_runs.set(len(self._runs))
        return ended

    def _store_anomalies(self) -> None:
        if not self._pending:
            return
        found, self._pending = self._pending, []
        by_run: dict[int, list[Found]] = {}
        for f in found:
            by_run.setdefault(f.run_id, []).append(f)
        groups = list(by_run.values())
        now = self._clock()
        unwritten, transient = self._write(
            "store_anomalies", groups, lambda conn, rows: insert_anomalies(conn, rows, now)
        )
        if transient:
            keep = [f for rows in unwritten for f in rows] + self._pending
            self._pending = keep[-MAX_PENDING_ANOMALIES:]
        elif unwritten:
            log.error(
                "%d anomalies of run(s) %s could not be stored and are lost",
                sum(map(len, unwritten)),
                ", ".join(str(rows[0].run_id) for rows in unwritten),
            )
        failed = {id(rows) for rows in unwritten}
        stored = [f for rows in groups if id(rows) not in failed for f in rows]
        for f in stored:
            self.telemetry.anomalies.labels(f.anomaly.kind, f.anomaly.severity).inc()
        if stored and self.on_anomalies is not None:
            try:
                self.on_anomalies(stored)
            except Exception:  # a failing consumer must not stop detection
                self.telemetry.detection_failures.labels("on_anomalies").inc()
                log.exception("on_anomalies failed on %d anomalies", len(stored))

    def _save(self, items: list[tuple[int, _RunState]]) -> None:
        """Snapshot engines into ``detector_state``, one transaction; mark them clean."""
        if not items:
            return
        now = self._clock()
        snapshots: list[list[Snapshot]] = []
        saved: dict[int, _RunState] = {}
        for run, state in items:
            try:
                data = state.engine.snapshot()
            except Exception as exc:
                self._detector_failed(exc)
                continue
            snapshots.append([Snapshot(run, data, state.step, now)])
            saved[run] = state
        unwritten, _ = self._write(
            "save_state", snapshots, lambda conn, rows: save_states(conn, rows)
        )
        for rows in unwritten:
            saved.pop(rows[0].run_id, None)
        for state in saved.values():
            state.dirty = False

    def _write(
        self,
        operation: str,
        groups: list[list[T]],
        write: Callable[[Connection, list[T]], object],
    ) -> tuple[list[list[T]], bool]:
        """Write every group in one transaction; if that fails for another reason than an
        unavailable database, each group in its own. Returns the groups not written and
        whether the database was unavailable (worth a retry)."""
        if not groups:
            return [], False
        try:
            with self.store.write() as conn:
                write(conn, [row for rows in groups for row in rows])
        except TRANSIENT_ERRORS as exc:
            self.telemetry.detection_failures.labels(operation).inc()
            if not self._store_failing:
                log.warning("detection cannot write to the database (%s); will retry", exc)
            self._store_failing = True
            return groups, True
        except Exception as exc:
            if len(groups) == 1:
                self.telemetry.detection_failures.labels(operation).inc()
                log.error("detection could not %s: %s", operation.replace("_", " "), exc)
                return groups, False
            unwritten: list[list[T]] = []
            transient = False
            for rows in groups:
                failed, unavailable = self._write(operation, [rows], write)
                unwritten += failed
                transient |= unavailable
            return unwritten, transient
        if self._store_failing:
            log.info("detection writes to the database again")
        self._store_failing = False
        return [], False

    def _detector_failed(self, exc: BaseException) -> None:
        name = _culprit(exc)
        self.telemetry.detector_errors.labels(name).inc()
        seen = (name, type(exc).__name__)
        if seen in self._reported:
            log.debug("detector %s failed again: %r", name, exc)
            return
        self._reported.add(seen)
        log.error(
            "detector %s raised %s (logged once; later ones are only counted)",
            name,
            type(exc).__name__,
            exc_info=exc,
        )


def _run_states(conn: Connection, ids: Iterable[int]) -> dict[int, str]:
    return dict(conn.execute(select(runs.c.id, runs.c.state).where(runs.c.id.in_(list(ids)))).all())


def _culprit(exc: BaseException) -> str:
    """Name of the innermost detector on the traceback, else ``"engine"``."""
    name = "engine"
    for frame in _frames(exc):
        owner = frame.f_locals.get("self")
        if isinstance(owner, SeriesDetector | RunDetector):
            name = getattr(owner, "name", None) or type(owner).__name__
    return name


def _frames(exc: BaseException) -> Iterator[FrameType]:
    tb = exc.__traceback__
    while tb is not None:
        yield tb.tb_frame
        tb = tb.tb_next
