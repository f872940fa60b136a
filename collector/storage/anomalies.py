"""Anomalies the detectors found: stored in groups, read back oldest first with a cursor.

``evidence`` is a JSON column, so its non-finite numbers are stored as the
strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` (as on the wire) and
turned back into floats when read.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, func, insert, select

from runwatch.collector.storage.tables import anomalies
from runwatch.detectors.base import Anomaly
from runwatch.wire import NONFINITE_STRINGS, encode_float

MAX_KIND_LENGTH = 64
MAX_DETECTOR_LENGTH = 64
MAX_KEY_LENGTH = 256
MAX_EVIDENCE_TEXT = 200
"""Longest text kept for an evidence value that is not a number."""


@dataclass(frozen=True, slots=True)
class Found:
    """An anomaly of one run, with the wall time of the observation that showed it."""

    run_id: int
    wall_time: float
    anomaly: Anomaly


@dataclass(frozen=True, slots=True)
class AnomalyRecord:
    id: int
    run_id: int
    rank: int
    key: str
    kind: str
    severity: str
    step: int
    wall_time: float
    score: float
    detector: str
    message: str
    evidence: dict[str, float | int | str]
    created_at: float


@dataclass(frozen=True, slots=True)
class AnomalyFilter:
    """What ``GET /api/v1/runs/{id}/anomalies`` may filter on; None means any.

    ``after`` is a cursor: only anomalies with a larger id, oldest first.
    """

    kind: str | None = None
    severity: str | None = None
    rank: int | None = None
    after: int | None = None
    limit: int = 100


def insert_anomalies(conn: Connection, found: Iterable[Found], now: float) -> int:
    """Store every finding in one statement; returns how many rows were written."""
    rows = [
        {
            "run_id": f.run_id,
            "rank": f.anomaly.rank,
            "key": f.anomaly.key[:MAX_KEY_LENGTH],
            "kind": f.anomaly.kind[:MAX_KIND_LENGTH],
            "severity": f.anomaly.severity,
            "step": f.anomaly.step,
            "wall_time": f.wall_time,
            "score": _finite(f.anomaly.score),
            "detector": f.anomaly.detector[:MAX_DETECTOR_LENGTH],
            "message": f.anomaly.message,
            "evidence": evidence_json(f.anomaly.evidence),
            "created_at": now,
        }
        for f in found
    ]
    if rows:
        conn.execute(insert(anomalies), rows)
    return len(rows)


def list_anomalies(conn: Connection, run_id: int, where: AnomalyFilter) -> list[AnomalyRecord]:
    """Anomalies of the run matching ``where``, oldest first (by id)."""
    query = select(anomalies).where(anomalies.c.run_id == run_id)
    if where.after is not None:
        query = query.where(anomalies.c.id > where.after)
    if where.kind is not None:
        query = query.where(anomalies.c.kind == where.kind)
    if where.severity is not None:
        query = query.where(anomalies.c.severity == where.severity)
    if where.rank is not None:
        query = query.where(anomalies.c.rank == where.rank)
    rows = conn.execute(query.order_by(anomalies.c.id).limit(where.limit))
    return [
        AnomalyRecord(
            id=r.id,
            run_id=r.run_id,
            rank=r.rank,
            key=r.key,
            kind=r.kind,
            severity=r.severity,
            step=r.step,
            wall_time=r.wall_time,
            score=r.score,
            detector=r.detector,
            message=r.message,
            evidence=evidence_from_json(r.evidence),
            created_at=r.created_at,
        )
        for r in rows
    ]


def count_anomalies(conn: Connection, run_id: int) -> dict[tuple[str, str], int]:
    """Anomalies of the run per ``(kind, severity)``."""
    rows = conn.execute(
        select(anomalies.c.kind, anomalies.c.severity, func.count())
        .where(anomalies.c.run_id == run_id)
        .group_by(anomalies.c.kind, anomalies.c.severity)
    )
    return {(kind, severity): n for kind, severity, n in rows}


def evidence_json(evidence: Mapping[Any, Any]) -> dict[str, float | int | str]:
    """Evidence as JSON can hold it: non-finite floats as strings, anything else as text."""
    out: dict[str, float | int | str] = {}
    for name, value in evidence.items():
        if isinstance(value, int) and not isinstance(value, bool):
            out[str(name)] = value
            continue
        try:
            out[str(name)] = encode_float(float(value))
        except (TypeError, ValueError):
            out[str(name)] = str(value)[:MAX_EVIDENCE_TEXT]
    return out


def evidence_from_json(stored: Any) -> dict[str, float | int | str]:
    """Inverse of :func:`evidence_json`: the non-finite strings become floats again."""
    if not isinstance(stored, dict):
        return {}
    return {
        name: NONFINITE_STRINGS[value]
        if isinstance(value, str) and value in NONFINITE_STRINGS
        else value
        for name, value in stored.items()
    }


def _finite(value: float) -> float:
    """Scores are finite by the detector protocol; the column must never get NaN (SQLite)."""
    value = float(value)
    return value if value == value and abs(value) != float("inf") else 0.0
