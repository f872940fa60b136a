"""Reading runs: list with filters, and one run in detail."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from runwatch.api.deps import ReadAuth, RunId, StoreDep
from runwatch.api.schemas import RunOut, run_out
from runwatch.collector.errors import Forbidden
from runwatch.collector.storage.projects import find_project
from runwatch.collector.storage.runs import RunFilter, get_run, list_runs
from runwatch.wire import MAX_ID

router = APIRouter(prefix="/api/v1/runs", tags=["runs"])


@router.get("", response_model=list[RunOut], summary="List runs, newest first")
async def runs(
    principal: ReadAuth,
    store: StoreDep,
    project: str | None = None,
    name: str | None = None,
    state: Literal["running", "finished", "failed", "crashed"] | None = None,
    tag: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
) -> list[RunOut]:
    key = principal.key
    if key is not None and project is not None and project != key.project:
        raise Forbidden(f"this key belongs to project {key.project!r}, not {project!r}")

    def query() -> list[RunOut]:
        with store.read() as conn:
            if key is not None:
                project_id: int | None = key.project_id
            elif project is not None:
                project_id = find_project(conn, project)
                if project_id is None:
                    return []
            else:
                project_id = None
            where = RunFilter(project_id, name, state, tag, limit, offset)
            return [run_out(r) for r in list_runs(conn, where)]

    return await run_in_threadpool(query)


@router.get("/{run_id}", response_model=RunOut, summary="One run", responses={404: {}})
async def run(run_id: RunId, principal: ReadAuth, store: StoreDep) -> RunOut:
    def query() -> RunOut:
        with store.read() as conn:
            return run_out(get_run(conn, run_id, project_id=principal.project_id))

    return await run_in_threadpool(query)
