"""The bounded, prioritised in-memory queue between the training step and the sender.

``put_*`` is what the training thread pays for, so it does the least work
that keeps the data correct: it stores a reference to the caller's values
(copied for mappings, since callers reuse dicts) with the step and the wall
time, and nothing else. Tensors stay tensors: the sender thread turns them
into floats, so reading a GPU value never stalls the step.

Capacity is counted in points. When a put would exceed it, the oldest
records of the lowest priority below the new record's are dropped first
(per-layer statistics before system metrics before loss); when nothing of
lower priority is queued the new record is dropped. Every dropped point is
counted by reason in :attr:`PointBuffer.dropped`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Protocol

CRITICAL = 0
"""What the user logs (loss, learning rate, validation): dropped last."""
SYSTEM = 1
"""Step timings and system metrics."""
DETAIL = 2
"""Per-layer norms and activation statistics: dropped first."""
PRIORITIES = (CRITICAL, SYSTEM, DETAIL)

DEFAULT_CAPACITY = 200_000
"""Points held in memory before dropping: about 40 MB of Python objects at most."""


class Record(NamedTuple):
    """One put: ``values`` is a mapping key -> number/tensor, or a 1-d tensor for ``keys``."""

    step: int
    wall_time: float
    keys: Sequence[str] | None
    values: Any
    size: int


class Sink(Protocol):
    """Where hooks and samplers put what they measure; implemented by :class:`PointBuffer`."""

    def put_scalars(
        self, step: int, values: Mapping[str, Any], priority: int = CRITICAL
    ) -> None: ...

    def put_vector(
        self, step: int, keys: Sequence[str], values: Any, priority: int = DETAIL
    ) -> None: ...


class PointBuffer:
    """Bounded multi-priority FIFO of :class:`Record`; ``put_*`` never blocks on I/O."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, not {capacity}")
        self.capacity = capacity
        self._queues: tuple[deque[Record], ...] = tuple(deque() for _ in PRIORITIES)
        self._size = 0
        self._in_flight = 0
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.ready_size = capacity
        """Once this many points are queued, :meth:`wait` returns early."""
        self.dropped: dict[str, int] = {"queue_overflow": 0}

    def __len__(self) -> int:
        return self._size

    def put_scalars(
        self, step: int, values: Mapping[str, Any], priority: int = CRITICAL, *, copy: bool = True
    ) -> None:
        """Queue ``values``; ``copy=False`` when the caller hands over a dict it will not reuse."""
        if values:
            owned = dict(values) if copy else values
            self._put(Record(step, time.time(), None, owned, len(values)), priority)

    def put_vector(
        self, step: int, keys: Sequence[str], values: Any, priority: int = DETAIL
    ) -> None:
        if keys:
            self._put(Record(step, time.time(), keys, values, len(keys)), priority)

    def _put(self, record: Record, priority: int) -> None:
        with self._lock:
            if self._size + record.size > self.capacity and not self._make_room(
                record.size, priority
            ):
                self.dropped["queue_overflow"] += record.size
                return
            self._queues[priority].append(record)
            self._size += record.size
            if self._size >= self.ready_size:
                self._ready.set()

    def _make_room(self, need: int, priority: int) -> bool:
        """Drop the oldest records of priorities below ``priority`` until ``need`` fits."""
        if need > self.capacity:
            return False
        for lower in reversed(PRIORITIES[priority + 1 :]):
            queue = self._queues[lower]
            while queue and self._size + need > self.capacity:
                victim = queue.popleft()
                self._size -= victim.size
                self.dropped["queue_overflow"] += victim.size
        return self._size + need <= self.capacity

    def drain(self) -> list[Record]:
        """Take every queued record, highest priority first, oldest first within a priority.

        The records count as :meth:`pending` until the taker calls :meth:`settle`, so that a
        flush does not see an empty queue while they are between the queue and the outbox.
        """
        with self._lock:
            taken = [record for queue in self._queues for record in queue]
            for queue in self._queues:
                queue.clear()
            self._in_flight += self._size
            self._size = 0
            self._ready.clear()
        return taken

    def settle(self) -> None:
        """The drained records are where the taker keeps them now (or counted as lost)."""
        with self._lock:
            self._in_flight = 0

    def pending(self) -> int:
        """Points queued or drained and not yet settled."""
        return self._size + self._in_flight

    def wait(self, timeout: float) -> bool:
        """Sleep until ``ready_size`` points are queued or ``timeout`` passes."""
        return self._ready.wait(timeout)

    def wake(self) -> None:
        """End a :meth:`wait` now (a flush or a stop was asked for)."""
        self._ready.set()

    def reset_after_fork(self) -> None:
        """A forked child inherits the lock in any state; start it afresh, empty."""
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._queues = tuple(deque() for _ in PRIORITIES)
        self._size = 0
        self._in_flight = 0
