"""Writing batches of points and reading them back, raw or downsampled.

A batch is stored in one transaction: its ``(run, rank, seq)`` row in
``batches`` first (a replay collides with it and stores nothing), then the
series rows it needs, the points (executemany on SQLite, binary COPY on
PostgreSQL), and the per-series summary (count, first/last step, last value).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Literal

from runwatch.collector.batch import Batch
from runwatch.collector.errors import NotFound
from runwatch.collector.storage.sql import insert_or_ignore
from runwatch.collector.storage.store import Store
from runwatch.collector.storage.tables import batches, points, runs, series
from sqlalchemy import Connection, Integer, and_, cast, func, select, text, update

Axis = Literal["step", "time"]

_UPDATE_SUMMARY = text(
    """
    UPDATE series SET
      n_points = n_points + :n,
      first_step = CASE WHEN first_step IS NULL OR first_step > :first_step
                   THEN :first_step ELSE first_step END,
      last_step = CASE WHEN last_wall_time IS NULL OR last_wall_time <= :wall_time
                  THEN :last_step ELSE last_step END,
      last_value = CASE WHEN last_wall_time IS NULL OR last_wall_time <= :wall_time
                   THEN CAST(:value AS DOUBLE PRECISION) ELSE last_value END,
      last_wall_time = CASE WHEN last_wall_time IS NULL OR last_wall_time <= :wall_time
                       THEN :wall_time ELSE last_wall_time END
    WHERE id = :id
    """
)


@dataclass(frozen=True, slots=True)
class WriteResult:
    """``stored`` is False when the batch was a replay of one already stored."""

    stored: bool
    n_points: int


@dataclass(frozen=True, slots=True)
class SeriesInfo:
    id: int
    key: str
    rank: int
    n_points: int
    first_step: int | None
    last_step: int | None
    last_wall_time: float | None
    last_value: float | None


@dataclass(frozen=True, slots=True)
class Bucket:
    """Aggregate of the points whose x falls in one bucket; NaN values are only counted."""

    step_min: int
    step_max: int
    time_min: float
    time_max: float
    count: int
    nan_count: int
    min: float
    max: float
    mean: float


@dataclass(frozen=True, slots=True)
class MetricRange:
    """Either ``points`` (step, wall_time, value) or ``buckets``, never both."""

    downsampled: bool
    total: int
    points: list[tuple[int, float, float]]
    buckets: list[Bucket]


def write_batch(store: Store, batch: Batch) -> WriteResult:
    """Store ``batch`` exactly once; the run must exist (checked by the caller)."""
    new_ids: dict[str, int] = {}
    now = time.time()
    with store.write() as conn:
        first = insert_or_ignore(
            conn,
            batches,
            {
                "run_id": batch.run,
                "rank": batch.rank,
                "seq": batch.seq,
                "received_at": now,
                "n_points": len(batch),
            },
        )
        if not first:
            return WriteResult(stored=False, n_points=0)
        conn.execute(update(runs).where(runs.c.id == batch.run).values(heartbeat_at=now))
        if batch.steps:
            ids = _series_ids(store, conn, batch, new_ids)
            rows = [
                (ids[k], s, t, v)
                for s, t, k, v in zip(
                    batch.steps, batch.wall_times, batch.keys, batch.values, strict=True
                )
            ]
            _insert_points(conn, rows)
            conn.execute(_UPDATE_SUMMARY, _summaries(rows))
    # Only ids of committed series rows may be cached.
    store.remember_series_ids(batch.run, batch.rank, new_ids)
    return WriteResult(stored=True, n_points=len(batch))


def _series_ids(
    store: Store, conn: Connection, batch: Batch, new_ids: dict[str, int]
) -> dict[str, int]:
    ids: dict[str, int] = {}
    missing: list[str] = []
    for key in set(batch.keys):
        cached = store.cached_series_id(batch.run, batch.rank, key)
        if cached is None:
            missing.append(key)
        else:
            ids[key] = cached
    if missing:
        for key in missing:
            insert_or_ignore(conn, series, {"run_id": batch.run, "key": key, "rank": batch.rank})
        found = conn.execute(
            select(series.c.key, series.c.id).where(
                and_(
                    series.c.run_id == batch.run,
                    series.c.rank == batch.rank,
                    series.c.key.in_(missing),
                )
            )
        )
        fresh = {key: series_id for key, series_id in found}
        new_ids.update(fresh)
        ids.update(fresh)
    return ids


def _insert_points(conn: Connection, rows: list[tuple[int, int, float, float | None]]) -> None:
    if conn.dialect.name == "postgresql":
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        with (
            cursor,
            cursor.copy(
                "COPY points (series_id, step, wall_time, value) FROM STDIN (FORMAT BINARY)"
            ) as copy,
        ):
            copy.set_types(["int4", "int8", "float8", "float8"])
            for row in rows:
                copy.write_row(row)
    else:
        conn.exec_driver_sql(
            "INSERT INTO points (series_id, step, wall_time, value) VALUES (?, ?, ?, ?)", rows
        )


def _summaries(rows: list[tuple[int, int, float, float | None]]) -> list[dict[str, Any]]:
    acc: dict[int, list[Any]] = {}
    for series_id, step, wall_time, value in rows:
        entry = acc.get(series_id)
        if entry is None:
            acc[series_id] = [1, step, step, wall_time, value]
            continue
        entry[0] += 1
        if step < entry[1]:
            entry[1] = step
        if wall_time >= entry[3]:
            entry[2], entry[3], entry[4] = step, wall_time, value
    return [
        {"id": sid, "n": n, "first_step": lo, "last_step": s, "wall_time": t, "value": v}
        for sid, (n, lo, s, t, v) in acc.items()
    ]


def list_series(conn: Connection, run_id: int) -> list[SeriesInfo]:
    """Every series of a run with its summary, ordered by key then rank."""
    return _series_infos(conn, series.c.run_id == run_id)


def _series_infos(conn: Connection, where: Any) -> list[SeriesInfo]:
    rows = conn.execute(select(series).where(where).order_by(series.c.key, series.c.rank))
    return [
        SeriesInfo(
            id=r.id,
            key=r.key,
            rank=r.rank,
            n_points=r.n_points,
            first_step=r.first_step,
            last_step=r.last_step,
            last_wall_time=r.last_wall_time,
            last_value=_from_db(r.last_value) if r.n_points else None,
        )
        for r in rows
    ]


def get_series(conn: Connection, run_id: int, key: str, rank: int) -> SeriesInfo:
    """The series ``key`` of ``rank`` in the run; :class:`NotFound` if it has none."""
    found = _series_infos(
        conn,
        and_(series.c.run_id == run_id, series.c.key == key, series.c.rank == rank),
    )
    if not found:
        raise NotFound(f"run {run_id} has no series {key!r} for rank {rank}")
    return found[0]


def metric_range(
    conn: Connection,
    series_id: int,
    *,
    axis: Axis = "step",
    start: float | None = None,
    end: float | None = None,
    max_points: int = 1000,
) -> MetricRange:
    """Points of one series with x in ``[start, end]``, or ``max_points`` buckets of them.

    Downsampling happens in the database: a GROUP BY over bucket numbers
    returns at most ``max_points`` rows whatever the series length.
    """
    x = points.c.step if axis == "step" else points.c.wall_time
    where = [points.c.series_id == series_id]
    if start is not None:
        where.append(x >= start)
    if end is not None:
        where.append(x <= end)
    total, lo, hi = conn.execute(select(func.count(), func.min(x), func.max(x)).where(*where)).one()
    if total <= max_points:
        rows = conn.execute(
            select(points.c.step, points.c.wall_time, points.c.value)
            .where(*where)
            .order_by(x, points.c.wall_time)
        )
        return MetricRange(
            downsampled=False,
            total=total,
            points=[(s, t, _from_db(v)) for s, t, v in rows],
            buckets=[],
        )
    if axis == "step":
        # Integer arithmetic: (step - lo) * n // (span) is exact on both databases.
        bucket = ((x - lo) * max_points) // (hi - lo + 1)
    else:
        # Widen a hair so that x == hi lands in the last bucket, not one past it.
        # floor() first: PostgreSQL's CAST rounds where SQLite's truncates.
        width = ((hi - lo) / max_points or 1.0) * (1 + 1e-9)
        bucket = cast(func.floor((x - lo) / width), Integer)
    bucket = bucket.label("bucket")
    query = (
        select(
            bucket,
            func.min(points.c.step),
            func.max(points.c.step),
            func.min(points.c.wall_time),
            func.max(points.c.wall_time),
            func.count(),
            func.count(points.c.value),
            func.min(points.c.value),
            func.max(points.c.value),
            func.avg(points.c.value),
        )
        .where(*where)
        .group_by(bucket)
        .order_by(bucket)
    )
    buckets = [
        Bucket(
            step_min=r[1],
            step_max=r[2],
            time_min=r[3],
            time_max=r[4],
            count=r[5],
            nan_count=r[5] - r[6],
            min=_from_db(r[7]),
            max=_from_db(r[8]),
            mean=_from_db(r[9]),
        )
        for r in conn.execute(query)
    ]
    return MetricRange(downsampled=True, total=total, points=[], buckets=buckets)


def _from_db(value: Any) -> float:
    """NULL in a value column means NaN (SQLite cannot store NaN)."""
    return math.nan if value is None else float(value)
