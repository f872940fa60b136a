"""``POST /api/v1/ingest``: one batch of points from one rank, stored exactly once."""

from __future__ import annotations

import asyncio
import logging
import time

from fastapi import APIRouter, Request
from sqlalchemy.exc import DBAPIError
from starlette.concurrency import run_in_threadpool

from runwatch.api.auth import Principal
from runwatch.api.deps import (
    ControlDep,
    IngestAuth,
    PipelineDep,
    SettingsDep,
    StoreDep,
    TelemetryDep,
    WriterDep,
)
from runwatch.api.schemas import IngestReply, WireCommand, wire_command
from runwatch.collector.batch import Batch, decode_body, parse_batch
from runwatch.collector.control import ControlChannel
from runwatch.collector.storage.points import Prepared, prepare
from runwatch.collector.storage.store import Store
from runwatch.collector.storage.writer import TRANSIENT_ERRORS
from runwatch.wire import JSON, MSGPACK

log = logging.getLogger("runwatch.collector")

router = APIRouter(prefix="/api/v1", tags=["ingest"])

BATCH_DOC = f"""Body: a map ``{{run, rank, seq, points, heartbeat?}}`` in {MSGPACK} or {JSON};
``points`` is an array of ``[step, wall_time, key, value]``. In JSON, NaN and
infinities are the strings "NaN", "Infinity", "-Infinity". A batch whose
``(run, rank, seq)`` was already stored is acknowledged with ``duplicate: true``
and stores nothing. Stored points are then fed to the run's detectors, off the
request: their anomalies appear under ``/api/v1/runs/{{run_id}}/anomalies``.
The reply (a replay's too) carries the run's commands that this rank has not
acknowledged yet, oldest first: see ``POST /api/v1/commands/{{id}}/ack``."""


@router.post(
    "/ingest",
    response_model=IngestReply,
    summary="Store a batch of points",
    description=BATCH_DOC,
    responses={400: {}, 401: {}, 404: {}, 413: {}, 415: {}, 422: {}},
)
async def ingest(
    request: Request,
    principal: IngestAuth,
    store: StoreDep,
    writer: WriterDep,
    settings: SettingsDep,
    telemetry: TelemetryDep,
    pipeline: PipelineDep,
    control: ControlDep,
) -> IngestReply:
    started = time.perf_counter()
    body = await request.body()
    content_type = request.headers.get("content-type", "")
    batch, prepared = await run_in_threadpool(
        _checked_batch, body, content_type, principal, store, settings.max_points_per_batch
    )
    result = await asyncio.wrap_future(writer.submit(batch, prepared))
    if pipeline is not None:
        # Never blocks: a full detection queue drops the batch from detection and counts it.
        pipeline.submit(batch, stored=result.stored)
    if result.stored:
        telemetry.batches.labels("stored").inc()
        telemetry.points.inc(result.n_points)
    else:
        telemetry.batches.labels("duplicate").inc()
    # A dict lookup for runs without commands: no thread hop, no query.
    commands = (
        await run_in_threadpool(_pending, control, batch.run, batch.rank)
        if control.has_live(batch.run)
        else []
    )
    telemetry.ingest_latency.observe(time.perf_counter() - started)
    return IngestReply(accepted=result.n_points, duplicate=not result.stored, commands=commands)


def _pending(control: ControlChannel, run: int, rank: int) -> list[WireCommand]:
    """Commands for the reply; none this time if the database fails (the batch is stored)."""
    try:
        return [wire_command(c) for c in control.pending(run, rank)]
    except (*TRANSIENT_ERRORS, DBAPIError) as exc:
        log.warning("could not look up commands of run %d: %s", run, exc)
        return []


def _checked_batch(
    body: bytes, content_type: str, principal: Principal, store: Store, max_points: int
) -> tuple[Batch, Prepared | None]:
    batch = parse_batch(
        decode_body(body, content_type, max_points=max_points), max_points=max_points
    )
    principal.check_run(store, batch.run)
    return batch, prepare(store, batch)
