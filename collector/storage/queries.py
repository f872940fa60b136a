"""Reading points back: series summaries and ranges of one series, raw or downsampled."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import Connection, Integer, and_, cast, func, select

from runwatch.collector.errors import NotFound
from runwatch.collector.storage.tables import points, series
from runwatch.wire import MAX_INT64

Axis = Literal["step", "time"]


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
    if axis == "step" and (hi - lo + 1) * max_points <= MAX_INT64:
        # Integer arithmetic: (step - lo) * n // span is exact on both databases.
        bucket = ((x - lo) * max_points) // (hi - lo + 1)
    elif axis == "step":
        # Steps spread over most of int64: the product would overflow, so scale in
        # floating point, a hair below n / span so that x == hi stays in bucket n - 1.
        ratio = max_points / (hi - lo + 1) * (1 - 1e-9)
        bucket = cast(func.floor((x - lo) * ratio), Integer)
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
        .where(*where, x.between(lo, hi))  # points that arrived since the count stay out
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
