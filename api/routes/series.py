"""Reading metrics: the series of a run, their latest values, and ranges of one series."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from runwatch.api.deps import Rank, ReadAuth, RunId, StoreDep
from runwatch.api.schemas import BucketOut, LatestOut, LatestValue, MetricRangeOut, SeriesOut
from runwatch.collector.errors import InvalidInput
from runwatch.collector.storage.queries import get_series, list_series, metric_range

router = APIRouter(prefix="/api/v1/runs/{run_id}", tags=["metrics"])


@router.get("/series", response_model=list[SeriesOut], summary="Series of a run with summaries")
async def series(run_id: RunId, principal: ReadAuth, store: StoreDep) -> list[SeriesOut]:
    def query() -> list[SeriesOut]:
        principal.check_run(store, run_id)
        with store.read() as conn:
            return [
                SeriesOut.model_validate(s, from_attributes=True) for s in list_series(conn, run_id)
            ]

    return await run_in_threadpool(query)


@router.get("/latest", response_model=LatestOut, summary="Latest value of every key of a rank")
async def latest(
    run_id: RunId,
    principal: ReadAuth,
    store: StoreDep,
    rank: Rank = 0,
    keys: Annotated[list[str] | None, Query(description="Only these keys (repeatable).")] = None,
) -> LatestOut:
    def query() -> LatestOut:
        principal.check_run(store, run_id)
        with store.read() as conn:
            found = list_series(conn, run_id)
        wanted = set(keys) if keys else None
        values = {
            s.key: LatestValue(step=s.last_step, wall_time=s.last_wall_time, value=s.last_value)
            for s in found
            if s.rank == rank
            and (wanted is None or s.key in wanted)
            and s.last_step is not None
            and s.last_wall_time is not None
            and s.last_value is not None
        }
        return LatestOut(run_id=run_id, rank=rank, values=values)

    return await run_in_threadpool(query)


@router.get(
    "/metrics",
    response_model=MetricRangeOut,
    summary="Points of one series in a range, downsampled on the server",
    description="Returns the raw points when the range holds at most `max_points` of them; "
    "otherwise at most `max_points` buckets with min/max/mean and a count of NaN values. "
    "`start`/`end` are steps when `x=step` and Unix seconds when `x=time` (both inclusive).",
    responses={404: {}, 422: {}},
)
async def metrics(
    run_id: RunId,
    principal: ReadAuth,
    store: StoreDep,
    key: Annotated[str, Query(min_length=1, max_length=256)],
    rank: Rank = 0,
    x: Literal["step", "time"] = "step",
    start: float | None = None,
    end: float | None = None,
    max_points: Annotated[int, Query(ge=1, le=100_000)] = 1000,
) -> MetricRangeOut:
    for name, bound in (("start", start), ("end", end)):
        if bound is not None and not math.isfinite(bound):
            raise InvalidInput(f"{name} must be a finite number, not {bound}")
    if start is not None and end is not None and start > end:
        raise InvalidInput(f"start ({start}) is after end ({end})")

    def query() -> MetricRangeOut:
        principal.check_run(store, run_id)
        with store.read() as conn:
            info = get_series(conn, run_id, key, rank)
            found = metric_range(conn, info.id, axis=x, start=start, end=end, max_points=max_points)
        return MetricRangeOut(
            run_id=run_id,
            key=key,
            rank=rank,
            axis=x,
            total=found.total,
            downsampled=found.downsampled,
            points=found.points,
            buckets=[BucketOut.model_validate(b, from_attributes=True) for b in found.buckets],
        )

    return await run_in_threadpool(query)
