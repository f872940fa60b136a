"""Run lifecycle as the agent drives it: create or resume, then finish."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from runwatch.api.deps import IngestAuth, RunId, StoreDep
from runwatch.api.schemas import CreateRun, FinishRun, RunCreated, RunOut, run_out
from runwatch.collector.errors import Forbidden
from runwatch.collector.storage.runs import create_or_resume, finish_run

router = APIRouter(prefix="/api/v1/runs", tags=["runs"])


@router.post("", response_model=RunCreated, summary="Create a run, or resume it by name")
async def create_run(body: CreateRun, principal: IngestAuth, store: StoreDep) -> RunCreated:
    if principal.key is not None and body.project != principal.key.project:
        raise Forbidden(
            f"this key belongs to project {principal.key.project!r}, not {body.project!r}"
        )

    def create() -> RunCreated:
        with store.write() as conn:
            record, resumed = create_or_resume(
                conn,
                body.project,
                body.name,
                config=body.config,
                tags=body.tags,
                world_size=body.world_size,
            )
        store.remember_run_project(record.id, record.project_id)
        return RunCreated(**run_out(record).model_dump(), resumed=resumed)

    return await run_in_threadpool(create)


@router.post("/{run_id}/finish", response_model=RunOut, summary="Mark a run as ended")
async def finish(run_id: RunId, body: FinishRun, principal: IngestAuth, store: StoreDep) -> RunOut:
    def end() -> RunOut:
        principal.check_run(store, run_id)
        with store.write() as conn:
            return run_out(finish_run(conn, run_id, body.state))

    return await run_in_threadpool(end)
