"""Probes and the collector's own metrics; these need no key."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from runwatch.api.deps import StoreDep, TelemetryDep
from runwatch.collector.errors import Unavailable

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="The database answers", responses={503: {}})
async def readyz(store: StoreDep) -> dict[str, str]:
    def ping() -> None:
        try:
            with store.read() as conn:
                conn.execute(text("SELECT 1"))
        except SQLAlchemyError as exc:
            raise Unavailable(f"database unreachable: {type(exc).__name__}") from None

    await run_in_threadpool(ping)
    return {"status": "ready"}


@router.get("/metrics", summary="Prometheus exposition of the collector's own metrics")
async def metrics(telemetry: TelemetryDep) -> Response:
    return Response(generate_latest(telemetry.registry), media_type=CONTENT_TYPE_LATEST)
