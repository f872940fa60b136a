"""The detector protocol: one observation in, an :class:`Anomaly` or nothing out.

Pure code: no HTTP, no database, no clock of its own (time arrives with the
observation or as an argument), so that every detector is unit-tested on
arrays and evaluated offline on recorded runs.

Two shapes, both snapshotable to bytes and restorable:

- :class:`SeriesDetector` watches one series (one key of one rank of one run).
  O(1) state; learns during ``warmup`` observations and stays quiet meanwhile.
- :class:`RunDetector` watches several series of one run (train against
  validation loss, one rank against the others, the system-metric vector) and
  may also be asked at a point in time (:meth:`RunDetector.check`), for the
  findings that are an *absence* of data: a hang, a silent agent.

A detector reports the start of a finding, not every step of it: a sustained
condition yields one anomaly when it begins and may yield another once it has
cleared and begins again.
"""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

Severity = Literal["info", "warning", "critical"]
SEVERITIES: tuple[Severity, ...] = ("info", "warning", "critical")


@dataclass(frozen=True, slots=True)
class Anomaly:
    """A finding a human can act on.

    ``key`` and ``rank`` name the series the finding is about (for a run-level finding, the
    series that showed it); ``score`` is the detector's own measure (a z-score, a ratio; always
    finite), and ``evidence`` the numbers behind the message (NaN and infinities allowed).
    """

    kind: str
    severity: Severity
    key: str
    rank: int
    step: int
    score: float
    detector: str
    message: str
    evidence: dict[str, float] = field(default_factory=dict)


class Snapshotable:
    """``snapshot()``/``restore()`` by pickling the instance's state.

    Constructor parameters are stored verbatim as public attributes and learned state in
    private ones (river's convention); both travel in the snapshot, so a restored detector
    makes exactly the decisions the original would have. Snapshots are written and read by
    the collector's own database only.
    """

    def snapshot(self) -> bytes:
        return pickle.dumps(self.__dict__, protocol=pickle.HIGHEST_PROTOCOL)

    def restore(self, data: bytes) -> None:
        self.__dict__.update(pickle.loads(data))  # the collector's own database: trusted


class SeriesDetector(Snapshotable):
    """Base of the one-series detectors; subclasses implement :meth:`update`."""

    name: ClassVar[str]

    def update(self, step: int, value: float, wall_time: float) -> Anomaly | None:
        """Learn from one observation; the finding it completes, if any."""
        raise NotImplementedError

    def bind(self, key: str, rank: int) -> None:
        """Tell the detector which series it watches (used in its messages)."""
        self.key = key
        self.rank = rank

    def anomaly(
        self,
        kind: str,
        severity: Severity,
        step: int,
        score: float,
        message: str,
        **evidence: float,
    ) -> Anomaly:
        key, rank = getattr(self, "key", ""), getattr(self, "rank", 0)
        return _anomaly(self.name, kind, severity, key, rank, step, score, message, evidence)


class RunDetector(Snapshotable):
    """Base of the detectors that watch several series of one run."""

    name: ClassVar[str]
    patterns: ClassVar[tuple[str, ...]]
    """``fnmatch`` patterns of the keys this detector is fed."""

    def update(
        self, key: str, rank: int, step: int, value: float, wall_time: float
    ) -> Anomaly | None:
        """Learn from one observation of one of the watched series."""
        raise NotImplementedError

    def check(self, now: float, heartbeats: dict[int, float]) -> list[Anomaly]:
        """Findings made of time passing (``now``, and each rank's last heartbeat)."""
        return []

    def anomaly(
        self,
        kind: str,
        severity: Severity,
        key: str,
        rank: int,
        step: int,
        score: float,
        message: str,
        **evidence: float,
    ) -> Anomaly:
        return _anomaly(self.name, kind, severity, key, rank, step, score, message, evidence)


def _anomaly(
    detector: str,
    kind: str,
    severity: Severity,
    key: str,
    rank: int,
    step: int,
    score: float,
    message: str,
    evidence: dict[str, float],
) -> Anomaly:
    return Anomaly(
        kind=kind,
        severity=severity,
        key=key,
        rank=rank,
        step=step,
        score=_finite_or(score, 0.0),
        detector=detector,
        message=message,
        evidence=evidence,
    )


def _finite_or(value: Any, default: float) -> float:
    value = float(value)
    return value if math.isfinite(value) else default


def check_choice(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    """``ValueError`` naming the allowed values: detectors validate in ``__init__``."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, not {value!r}")


def check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0, not {value!r}")
