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
    """Which parts of the agent failed, and how often; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self.reraise = False
        """Tests set this to see internal errors instead of having them swallowed."""

    def record(self, part: str, exc: BaseException) -> None:
        with self._lock:
            self._counts[part] += 1
            first = self._counts[part] == 1
        if first:
            log.warning("runwatch agent: %s failed and is switched off", part, exc_info=exc)

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
