"""The sender thread: buffer -> batches -> collector, surviving collector outages.

Everything slow happens here, never on the training thread: turning tensors
into floats (one device sync per flush, off the step), checking keys,
encoding msgpack, HTTP, retries and the spool.

Ordering and exactly-once. Each batch gets ``seq = session_base + n`` when it
is formed, where ``session_base`` is the wall clock in microseconds at start:
sequence numbers grow within a session and across restarts of the trainer
(which resume the same run and so the same ``(run, rank)`` key), and the
collector stores each ``(run, rank, seq)`` once. Batches wait in two FIFOs:
an in-memory *outbox* while the collector answers, and the on-disk
:class:`~runwatch.agent.spool.Spool` once it has failed for longer than
``retry_window``. While the spool holds anything, new batches are appended
to it rather than to the outbox, and the spool is replayed first, so batches
reach the collector in the order they were formed.

Frames hold a batch without its run id (the run may not exist yet when the
collector is down at start); the id is spliced into the msgpack map when the
frame is sent (see :func:`with_run`).
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgpack

from runwatch import wire
from runwatch.agent.buffer import PointBuffer, Record
from runwatch.agent.control import Control, Registration
from runwatch.agent.options import Options, default_spool_dir
from runwatch.agent.safety import FAULTS, Faults, swallow_internal
from runwatch.agent.spool import Spool, point_count
from runwatch.agent.transport import SENDER_THREAD, HttpTransport, Outcome

log = logging.getLogger("runwatch.agent")

BACKOFF_START = 0.5
BACKOFF_MAX = 30.0
DELIVER_SLICE = 0.5
"""Seconds one delivery pass may take before the thread drains the buffer again."""
OUTBOX_MAX_BYTES = 64 * 2**20
"""Encoded batches held in memory before spilling to the spool even inside the retry window."""
MAX_KNOWN_KEYS = 100_000

Q = TypeVar("Q")
"""An item of a control queue: an acknowledgement or a checkpoint registration."""


@dataclass(slots=True)
class Stats:
    """Counters a user (and the tests) can read from ``run.stats``."""

    batches_sent: int = 0
    points_sent: int = 0
    batches_spooled: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    """Points lost, by reason (queue_overflow, spool_full, invalid_key, payload_too_large, ...)."""
    steps_skipped: int = 0
    """Optimizer steps skipped for non-finite gradients (``Run.watch(skip_nonfinite=True)``)."""

    def drop(self, reason: str, n: int) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n


def with_run(frame: bytes, run_id: int) -> bytes:
    """Splice ``"run": run_id`` into a frame, a msgpack fixmap without it, as its first field."""
    if not 0x80 <= frame[0] <= 0x8E:
        raise ValueError("a frame must be a msgpack fixmap of at most 14 fields")
    n = frame[0] & 0x0F
    return bytes([0x80 | (n + 1)]) + msgpack.packb("run") + msgpack.packb(run_id) + frame[1:]


class Sender:
    """Owns the daemon thread that forms, spools and sends batches for one run and rank."""

    def __init__(
        self,
        options: Options,
        buffer: PointBuffer,
        *,
        name: str,
        rank: int,
        owns_run: bool,
        world_size: int = 1,
        control: Control | None = None,
        faults: Faults = FAULTS,
    ) -> None:
        self.options = options
        self.buffer = buffer
        self.name = name
        self.rank = rank
        self.owns_run = owns_run
        """Whether this rank marks the run finished (rank 0 does; the others only stop)."""
        self.world_size = world_size
        self.faults = faults
        self.control = control
        """Where the commands of ingest replies go, and its acknowledgements come from."""
        self.stats = Stats(dropped=buffer.dropped)
        self.run_id: int | None = None
        self.resumed = False
        self._transport = HttpTransport(
            options.server, options.api_key, timeout=options.request_timeout
        )
        spool_root = options.spool_dir or default_spool_dir()
        self._spool_dir = spool_root / _safe(options.project) / _safe(name) / f"rank-{rank}"
        self._spool: Spool | None = None
        self._outbox: deque[tuple[int, bytes, int]] = deque()
        self._outbox_bytes = 0
        self._seq = time.time_ns() // 1000
        self._failing_since: float | None = None
        self._retry_at = 0.0
        self._backoff = BACKOFF_START
        self._last_send = 0.0
        self._gave_up: str | None = None
        """Why the collector refused the run for good; everything is then dropped."""
        self._warned: set[str] = set()
        self._known_keys: set[str] = set()
        self._idle = threading.Condition()
        self._stop = threading.Event()
        self._deadline = float("inf")
        """Set by :meth:`close`: past it, the last pass stops sending and spools the rest."""
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        thread = threading.Thread(target=self._loop, name=SENDER_THREAD, daemon=True)
        try:
            thread.start()
        except RuntimeError:  # interpreter shutting down: nothing will be sent
            return
        self._thread = thread

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued so far reached the collector; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while not self._drained():
                if self._thread is None or not self._thread.is_alive():
                    return False
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.buffer.wake()
                self._idle.wait(min(left, 0.05))
        return True

    def close(self, timeout: float, state: str | None) -> None:
        """Deliver what is queued within ``timeout``, spool the rest, end the run as ``state``."""
        self._deadline = time.monotonic() + timeout
        self._stop.set()
        self.buffer.wake()
        if self._thread is not None:
            self._thread.join(timeout + 1.0)
        with swallow_internal("sender", self.faults):
            if self._thread is not None and self._thread.is_alive():
                # Stuck in a request that started before the deadline existed. It is a
                # daemon: if the process lives on it may still deliver; count it as lost.
                held = self.buffer.pending() + sum(n for _, _, n in self._outbox)
                self.stats.drop("finish_timeout", held)
                return
            self._spill()
            if state is not None and self.owns_run and self.run_id is not None:
                self._transport.finish_run(self.run_id, state, timeout=self._time_left())
        self._transport.close()

    def _time_left(self) -> float:
        """A request's timeout: ``request_timeout``, cut short by :meth:`close`'s deadline."""
        return min(self.options.request_timeout, max(0.1, self._deadline - time.monotonic()))

    def _drained(self) -> bool:
        empty = not self.buffer.pending() and not self._outbox and not self._spool
        empty = empty and not (self.control is not None and self.control.has_outgoing())
        return empty and (self.run_id is not None or self._gave_up is not None)

    # -- the thread ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            stopping = self._stop.is_set()
            with swallow_internal("sender", self.faults):
                self._cycle(final=stopping)
            if self.faults.failed("sender"):
                return
            with self._idle:
                self._idle.notify_all()
            if stopping:
                return
            if not self._stop.is_set():  # a stop during the cycle: its wake-up was drained
                self.buffer.wait(self._sleep())

    def _sleep(self) -> float:
        now = time.monotonic()
        wake = now + self.options.flush_interval
        outgoing = self.control is not None and self.control.has_outgoing()
        if self._outbox or self._spool or self.run_id is None or outgoing:
            wake = min(wake, max(self._retry_at, now + 0.01))
        return max(0.0, wake - now)

    def _cycle(self, *, final: bool = False) -> None:
        if self._gave_up:
            self._discard(self.buffer.drain())
            return
        now = time.monotonic()
        if self.run_id is None and now >= self._retry_at:
            self._create_run(now)
        records = self.buffer.drain()
        try:
            for points in self._batches(records):
                self._enqueue(points)
        except Exception as exc:  # a value no check foresaw: lose these points, not the thread
            self.stats.drop("internal_error", sum(r.size for r in records))
            self.faults.record("sender: forming a batch", exc)
        finally:
            self.buffer.settle()
        if self.run_id is not None:
            self._deliver(final)
            if final and self._failing_since is None:
                self._deliver(final)  # what arrived while the last pass ran
            elif not (self._outbox or self._spool or final) and (
                time.monotonic() - self._last_send >= self.options.heartbeat_interval
            ):
                self._heartbeat()
            if self.control is not None and self.control.has_outgoing():
                self._send_acks()
                self._send_registrations()
        if self._failing_since is not None and (
            final or time.monotonic() - self._failing_since >= self.options.retry_window
        ):
            self._spill()

    # -- run ------------------------------------------------------------------------------
    def _create_run(self, now: float) -> None:
        o = self.options
        outcome = self._transport.create_run(
            o.project, self.name, o.config, o.tags, self.world_size, timeout=self._time_left()
        )
        if outcome.ok and isinstance(outcome.reply, dict) and "id" in outcome.reply:
            self.run_id = int(outcome.reply["id"])
            self.resumed = bool(outcome.reply.get("resumed"))
            self._succeeded()
        elif outcome.reason in ("unauthorized", "rejected"):
            # A wrong key, project or name never gets better: stop trying, count what is lost.
            self._warn(outcome.reason, f"cannot create run {self.name!r}: {outcome.detail}")
            self._gave_up = outcome.reason
        else:  # down, overloaded, or a proxy's answer during a deploy: try again later
            self._failed(outcome, now)

    # -- forming batches ----------------------------------------------------------------------
    def _batches(self, records: list[Record]) -> Iterator[list[list[Any]]]:
        points = self._points(records)
        size = self.options.batch_points
        for start in range(0, len(points), size):
            yield points[start : start + size]

    def _points(self, records: list[Record]) -> list[list[Any]]:
        """Records -> ``[step, wall_time, key, value]`` lists; tensors read in one go."""
        points: list[list[Any]] = []
        tensors: list[tuple[list[Any], Any]] = []
        for record in records:
            step = record.step
            if type(step) is not int or not 0 <= step <= wire.MAX_INT64:
                step = _as_step(step)
                if step is None:
                    self.stats.drop("invalid_step", record.size)
                    continue
            wall = record.wall_time
            if record.keys is None:
                pairs = record.values.items()
            else:
                values = record.values
                seq = values.tolist() if hasattr(values, "tolist") else values
                pairs = zip(record.keys, seq, strict=False)
            for key, value in pairs:
                if key not in self._known_keys and not self._check_key(key):
                    continue
                point = [step, wall, key, value]
                kind = type(value)
                if kind is not float:
                    if hasattr(value, "detach"):
                        tensors.append((point, value))
                    elif (number := _as_float(value)) is not None:
                        point[3] = number
                    else:
                        self.stats.drop("invalid_value", 1)
                        self._warn("invalid_value", f"{key!r}: {value!r:.60} is not a number")
                        continue
                points.append(point)
        if tensors:
            self._read_tensors(tensors, points)
        return points

    def _read_tensors(self, tensors: list[tuple[list[Any], Any]], points: list[list[Any]]) -> None:
        """One stack and one ``tolist`` per device: a single host sync, in this thread."""
        import torch

        by_device: dict[Any, list[tuple[list[Any], Any]]] = {}
        bad: set[int] = set()
        for point, tensor in tensors:
            if tensor.numel() != 1:
                self.stats.drop("invalid_value", 1)
                self._warn("invalid_value", f"{point[2]!r}: tensor of shape {tuple(tensor.shape)}")
                bad.add(id(point))
                continue
            by_device.setdefault(tensor.device, []).append((point, tensor))
        for device, group in by_device.items():
            # MPS has no float64; elsewhere float64 keeps a float64 value whole.
            dtype = torch.float32 if device.type == "mps" else torch.float64
            stacked = torch.stack([t.detach().reshape(()).to(dtype) for _, t in group])
            for (point, _), value in zip(group, stacked.tolist(), strict=True):
                point[3] = value
        if bad:
            points[:] = [p for p in points if id(p) not in bad]

    def _check_key(self, key: Any) -> bool:
        if type(key) is str and 1 <= len(key) <= wire.MAX_KEY_LENGTH and key.isprintable():
            if len(self._known_keys) < MAX_KNOWN_KEYS:
                self._known_keys.add(key)
            return True
        self.stats.drop("invalid_key", 1)
        self._warn(
            "invalid_key",
            f"metric key {key!r:.80} dropped: keys are strings of 1-{wire.MAX_KEY_LENGTH} "
            "printable characters",
        )
        return False

    def _enqueue(self, points: list[list[Any]]) -> None:
        seq = self._next_seq()
        frame = msgpack.packb(
            {"rank": self.rank, "seq": seq, "heartbeat": time.time(), "points": points}
        )
        if self._spool:
            self._to_spool(seq, frame, len(points))
            return
        self._outbox.append((seq, frame, len(points)))
        self._outbox_bytes += len(frame)
        if self._outbox_bytes > OUTBOX_MAX_BYTES:
            self._spill()

    def _next_seq(self) -> int:
        seq = self._seq
        self._seq += 1
        return seq

    # -- delivering ---------------------------------------------------------------------------
    def _deliver(self, final: bool) -> None:
        assert self.run_id is not None
        started = time.monotonic()
        while (self._outbox or self._spool) and time.monotonic() >= self._retry_at:
            now = time.monotonic()
            if (not final and now - started > DELIVER_SLICE) or now >= self._deadline:
                return
            from_spool = bool(self._spool)
            if from_spool:
                assert self._spool is not None
                frame = self._spool.peek()
                if self._spool.unreadable_segments:
                    self._warn("spool_error", f"spool segments in {self._spool_dir} vanished")
                if frame is None:
                    continue
                n = -1
            else:
                _, frame, n = self._outbox[0]
            outcome = self._transport.ingest(
                with_run(frame, self.run_id), timeout=self._time_left()
            )
            if outcome.retry:
                self._failed(outcome, time.monotonic())
                return
            if outcome.ok:  # before the batch leaves: a flush that returns has seen the commands
                self._receive(outcome)
            if from_spool:
                assert self._spool is not None
                self._spool.pop()
                n = point_count(frame)
            else:
                self._outbox.popleft()
                self._outbox_bytes -= len(frame)
            if outcome.ok:
                self.stats.batches_sent += 1
                self.stats.points_sent += n
                self._succeeded()
            else:
                self.stats.drop(outcome.reason, n)
                detail = f"collector refused a batch of {n} points: {outcome.detail}"
                self._warn(outcome.reason, detail)

    def _heartbeat(self) -> None:
        """An empty batch: tells the collector this rank is alive even if no step completes."""
        assert self.run_id is not None
        frame = msgpack.packb(
            {"rank": self.rank, "seq": self._next_seq(), "heartbeat": time.time(), "points": []}
        )
        timeout = min(self._time_left(), self.options.heartbeat_interval)
        outcome = self._transport.ingest(with_run(frame, self.run_id), timeout=timeout)
        if outcome.ok:
            self._succeeded()
            self._receive(outcome)
        elif outcome.retry:
            self._failed(outcome, time.monotonic())

    # -- control channel ----------------------------------------------------------------------
    def _receive(self, outcome: Outcome) -> None:
        """Hand the commands of an ingest reply to the control channel."""
        if self.control is not None and isinstance(outcome.reply, dict):
            self.control.receive(outcome.reply.get("commands"))

    def _send_acks(self) -> None:
        """Post queued acknowledgements (see :meth:`_send_queued`)."""
        control, run = self.control, self.run_id
        assert control is not None and run is not None
        self._send_queued(
            control.next_ack,
            lambda ack: self._transport.ack(
                ack.command, ack.body(run, self.rank), timeout=self._time_left()
            ),
            control.ack_done,
            refused=lambda ack: (
                "ack_refused",
                f"collector refused the acknowledgement of command {ack.command}",
            ),
        )

    def _send_registrations(self) -> None:
        """Register saved checkpoints (see :meth:`_send_queued`); the reply's ``prune`` list
        goes to the registration's ``on_reply`` (which deletes files)."""
        control, run = self.control, self.run_id
        assert control is not None and run is not None
        self._send_queued(
            control.next_registration,
            lambda registration: self._transport.register_checkpoint(
                run, registration.body, timeout=self._time_left()
            ),
            control.registration_done,
            refused=lambda registration: (
                "checkpoint_refused",
                f"collector refused checkpoint {registration.body.get('path')}",
            ),
            delivered=self._registered,
        )

    def _registered(self, registration: Registration, reply: Any) -> None:
        if registration.on_reply is not None:
            with swallow_internal("checkpoint retention", self.faults):
                registration.on_reply(reply)

    def _send_queued(
        self,
        peek: Callable[[], Q | None],
        post: Callable[[Q], Outcome],
        done: Callable[[Q], None],
        *,
        refused: Callable[[Q], tuple[str, str]],
        delivered: Callable[[Q, Any], None] | None = None,
    ) -> None:
        """Post the items of a control queue, oldest first: ``peek`` the oldest, ``post`` it,
        take it off (``done``) once delivered (``delivered(item, reply)``) or refused for good
        (warned once per ``refused(item)`` reason). A retryable failure backs off as a batch
        does and keeps the rest queued; past :meth:`close`'s deadline nothing is posted."""
        while (item := peek()) is not None:
            now = time.monotonic()
            if now < self._retry_at or now >= self._deadline:
                return
            outcome = post(item)
            if outcome.retry:
                self._failed(outcome, time.monotonic())
                return
            done(item)
            if outcome.ok:
                self._failing_since = None
                self._backoff = BACKOFF_START
                if delivered is not None:
                    delivered(item, outcome.reply)
            else:
                reason, detail = refused(item)
                self._warn(reason, f"{detail}: {outcome.detail}")

    def _succeeded(self) -> None:
        self._failing_since = None
        self._backoff = BACKOFF_START
        self._retry_at = 0.0
        self._last_send = time.monotonic()

    def _failed(self, outcome: Outcome, now: float) -> None:
        """Back off exponentially with full jitter, or as long as the collector asked."""
        if self._failing_since is None:
            self._failing_since = now
            log.info("runwatch agent: collector unavailable (%s), retrying", outcome.detail)
        wait = outcome.wait if outcome.wait is not None else random.uniform(0, self._backoff)
        self._backoff = min(BACKOFF_MAX, self._backoff * 2)
        self._retry_at = now + wait

    # -- spool -----------------------------------------------------------------------------
    def _spill(self) -> None:
        """Move the outbox to the spool (keeping order) so it survives the process."""
        while self._outbox:
            seq, frame, n = self._outbox.popleft()
            self._outbox_bytes -= len(frame)
            self._to_spool(seq, frame, n)

    def _to_spool(self, seq: int, frame: bytes, n: int) -> None:
        try:
            if self._spool is None:
                self._spool = Spool(self._spool_dir, self.options.spool_bytes)
            before = self._spool.dropped_points
            self._spool.append(seq, frame)
            self.stats.batches_spooled += 1
            if self._spool.dropped_points > before:
                self.stats.drop("spool_full", self._spool.dropped_points - before)
        except OSError as exc:  # disk full, read-only home: the batch is lost, training goes on
            self.stats.drop("spool_error", n)
            self._warn("spool_error", f"cannot write the spool in {self._spool_dir}: {exc}")

    def open_spool(self) -> None:
        """Pick up batches a previous process of this run left behind, to replay them first."""
        try:
            if self._spool_dir.is_dir() and any(self._spool_dir.iterdir()):
                self._spool = Spool(self._spool_dir, self.options.spool_bytes)
        except OSError as exc:
            self._warn("spool_error", f"cannot read the spool in {self._spool_dir}: {exc}")

    def _discard(self, records: list[Record]) -> None:
        self.stats.drop(self._gave_up or "rejected", sum(r.size for r in records))
        self.buffer.settle()

    def _warn(self, reason: str, message: str) -> None:
        if reason not in self._warned:
            self._warned.add(reason)
            log.warning("runwatch agent: %s (further %s losses are only counted)", message, reason)


def _as_float(value: Any) -> float | None:
    """Ints, bools and numpy scalars as a float; None for strings, None, 10**400 and the like."""
    if isinstance(value, str | bytes):
        return None
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _as_step(step: Any) -> int | None:
    try:
        value = int(step)
    except (TypeError, ValueError, OverflowError):
        return None
    return value if 0 <= value <= wire.MAX_INT64 else None


def _safe(name: str) -> str:
    """A path component from a project or run name (names may hold '/'), unique per name."""
    readable = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:96]
    return f"{readable}-{hashlib.sha256(name.encode()).hexdigest()[:10]}"
