"""Reading what the detectors found: the anomalies of a run, oldest first, with a cursor."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from runwatch.api.deps import ReadAuth, RunId, StoreDep
from runwatch.api.schemas import AnomalyOut, anomaly_out
from runwatch.collector.storage.anomalies import MAX_KIND_LENGTH, AnomalyFilter, list_anomalies
from runwatch.wire import MAX_ID

router = APIRouter(prefix="/api/v1/runs/{run_id}", tags=["anomalies"])

MAX_LIMIT = 1000


@router.get(
    "/anomalies",
    response_model=list[AnomalyOut],
    summary="Anomalies of a run, oldest first",
    description="Oldest first, so that a poller can pass the `id` of the last anomaly it has "
    "seen as `after` and get only newer ones (an empty list: nothing new). Anomalies appear "
    "shortly after the points that show them were ingested (detection runs off the request).",
    responses={404: {}, 422: {}},
)
async def anomalies(
    run_id: RunId,
    principal: ReadAuth,
    store: StoreDep,
    kind: Annotated[
        str | None,
        Query(min_length=1, max_length=MAX_KIND_LENGTH, description="Only this kind."),
    ] = None,
    severity: Annotated[
        Literal["info", "warning", "critical"] | None, Query(description="Only this severity.")
    ] = None,
    rank: Annotated[int | None, Query(ge=0, le=MAX_ID, description="Only this rank.")] = None,
    after: Annotated[
        int | None,
        Query(ge=0, le=MAX_ID, description="Only anomalies with a larger id (a cursor)."),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
) -> list[AnomalyOut]:
    def query() -> list[AnomalyOut]:
        principal.check_run(store, run_id)
        with store.read() as conn:
            found = list_anomalies(conn, run_id, AnomalyFilter(kind, severity, rank, after, limit))
        return [anomaly_out(a) for a in found]

    return await run_in_threadpool(query)
