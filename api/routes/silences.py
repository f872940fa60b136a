"""Silences: hold back notifications about matching alerts for a while (maintenance, a
known problem someone is already fixing).

A silenced alert is still recorded, deduplicated and resolved as usual; only its messages
wait. Matching and the release of held messages when a silence ends belong to the alerting
service (:mod:`runwatch.collector.alerts`); these routes create, list and end silences.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Path, Query
from starlette.concurrency import run_in_threadpool

from runwatch.api.alert_schemas import CreateSilence, SilenceOut, silence_out, silence_window
from runwatch.api.auth import Principal
from runwatch.api.deps import AlerterDep, OperateAuth, ReadAuth, StoreDep
from runwatch.collector.errors import Forbidden, InvalidInput, NotFound
from runwatch.collector.storage.projects import find_project
from runwatch.collector.storage.runs import run_project_id
from runwatch.collector.storage.silences import get_silence, list_silences
from runwatch.collector.storage.store import Store
from runwatch.wire import MAX_ID

router = APIRouter(prefix="/api/v1/silences", tags=["silences"])

SilenceId = Annotated[int, Path(ge=1, le=MAX_ID, description="Silence id.")]
MAX_LIMIT = 1000


def silence_project(store: Store, principal: Principal, body: CreateSilence) -> int:
    """The project a new silence applies to: the key's, else the one named, else its run's.

    A ``run_id`` matcher must name a run of that project: 404 for a key's other project
    (as everywhere), 422 on an open server where the body names both."""
    key, run_id = principal.key, body.matchers.run_id
    if key is not None:
        if body.project is not None and body.project != key.project:
            raise Forbidden(f"this key belongs to project {key.project!r}, not {body.project!r}")
        if run_id is not None:
            principal.check_run(store, run_id)
        return key.project_id
    with store.read() as conn:
        run_project = None if run_id is None else run_project_id(conn, run_id)
        if run_id is not None and run_project is None:
            raise NotFound(f"unknown run {run_id}")
        if body.project is None:
            if run_project is None:
                raise InvalidInput(
                    "give the silence's project: this server has no API key to take it from"
                )
            return run_project
        project_id = find_project(conn, body.project)
    if project_id is None:
        raise NotFound(f"unknown project {body.project!r}")
    if run_project is not None and run_project != project_id:
        raise InvalidInput(f"run {run_id} is not in project {body.project!r}")
    return project_id


@router.post(
    "",
    response_model=SilenceOut,
    status_code=201,
    summary="Silence matching alerts for a while",
    description="Needs the `operate` scope. `matchers`: at least one of `run` (run name "
    "glob), `run_id`, `kind`, `key`, `severity` (globs); an alert must match all given. "
    "The window: `starts_at` (default now) and either `ends_at` or `duration` (`2h`, "
    "`90m`, seconds), at most 90 days, ending in the future.",
    responses={403: {}, 404: {}, 422: {}},
)
async def create(
    body: Annotated[CreateSilence, Body()],
    principal: OperateAuth,
    store: StoreDep,
    alerter: AlerterDep,
) -> SilenceOut:
    def make() -> SilenceOut:
        project_id = silence_project(store, principal, body)
        now = alerter.clock()
        starts_at, ends_at = silence_window(body, now)
        record = alerter.create_silence(
            project_id=project_id,
            matchers=body.matchers.given(),
            starts_at=starts_at,
            ends_at=ends_at,
            created_by=principal.source,
            comment=body.comment,
        )
        return silence_out(record, now)

    return await run_in_threadpool(make)


@router.get(
    "",
    response_model=list[SilenceOut],
    summary="List silences, newest first",
    description="Only the key's project. `active=true`: those in force now; `active=false`: "
    "those not (over, or not started yet); absent: all.",
    responses={422: {}},
)
async def silences(
    principal: ReadAuth,
    store: StoreDep,
    alerter: AlerterDep,
    active: Annotated[bool | None, Query(description="In force now, or not.")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
) -> list[SilenceOut]:
    def query() -> list[SilenceOut]:
        now = alerter.clock()
        with store.read() as conn:
            found = list_silences(
                conn,
                project_id=principal.project_id,
                now=now,
                active_only=active is True,
                limit=limit if active is not False else MAX_LIMIT,
            )
        if active is False:
            found = [s for s in found if not s.active(now)][:limit]
        return [silence_out(s, now) for s in found]

    return await run_in_threadpool(query)


@router.get("/{silence_id}", response_model=SilenceOut, summary="One silence", responses={404: {}})
async def silence(
    silence_id: SilenceId, principal: ReadAuth, store: StoreDep, alerter: AlerterDep
) -> SilenceOut:
    def query() -> SilenceOut:
        with store.read() as conn:
            found = get_silence(conn, silence_id, project_id=principal.project_id)
        return silence_out(found, alerter.clock())

    return await run_in_threadpool(query)


@router.delete(
    "/{silence_id}",
    response_model=SilenceOut,
    summary="End a silence now",
    description="Needs the `operate` scope. Held messages about alerts still firing go out. "
    "A silence that has ended answers 409.",
    responses={404: {}, 409: {}},
)
async def expire(silence_id: SilenceId, principal: OperateAuth, alerter: AlerterDep) -> SilenceOut:
    record = await run_in_threadpool(
        alerter.expire_silence, silence_id, by=principal.source, project_id=principal.project_id
    )
    return silence_out(record, alerter.clock())
