"""Containment of the agent's own failures: the trainer never sees them.

Every hook body, sampler tick and public entry point runs inside
:func:`swallow_internal`. An exception there is logged once per part (with its
traceback, at WARNING on the ``runwatch.agent`` logger), counted, and the part
is switched off so that a broken hook does not cost a traceback on every step.
The trainer's own exceptions are never caught: only code inside the ``with``
block is guarded, and hooks call back into user code nowhere.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("runwatch.agent")


class Faults:
    """Which parts of the agent failed, and how often; thread-safe.

    Each run has its own (a part switched off in one run is not off in the next run of the
    same process), counted also in its ``parent``, the process-wide :data:`FAULTS`.
    """

    def __init__(self, parent: Faults | None = None) -> None:
        self.parent = parent
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._reraise = False

    @property
    def reraise(self) -> bool:
        """Tests set this (here or on the parent) to see internal errors instead."""
        return self._reraise or (self.parent is not None and self.parent.reraise)

    @reraise.setter
    def reraise(self, value: bool) -> None:
        self._reraise = value

    def record(self, part: str, exc: BaseException) -> None:
        with self._lock:
            self._counts[part] += 1
            first = self._counts[part] == 1
        if first:
            log.warning("runwatch agent: %s failed and is switched off", part, exc_info=exc)
        if self.parent is not None:
            self.parent.tally(part)

    def tally(self, part: str) -> None:
        """Count a failure recorded (and logged) by a child."""
        with self._lock:
            self._counts[part] += 1

    def failed(self, part: str) -> bool:
        """Whether ``part`` has failed before (and should stay off)."""
        return self._counts[part] > 0

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


FAULTS = Faults()


@contextmanager
def swallow_internal(part: str, faults: Faults = FAULTS) -> Iterator[None]:
    """Run the block; an ``Exception`` inside it is recorded against ``part`` and dropped.

    ``KeyboardInterrupt`` and ``SystemExit`` pass through: they are the user's.
    """
    try:
        yield
    except Exception as exc:
        faults.record(part, exc)
        if faults.reraise:
            raise
