"""The checkpoint registry: agents register what they saved; anyone may read the labels.

Labels (good, suspect, unverified) and retention are described in
:mod:`runwatch.collector.storage.checkpoints`.
"""

from __future__ import annotations

import logging
import time
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from runwatch.api.deps import IngestAuth, ReadAuth, RunId, SettingsDep, StoreDep
from runwatch.api.schemas import (
    CheckpointList,
    CheckpointOut,
    CheckpointRegistered,
    RegisterCheckpoint,
    checkpoint_out,
)
from runwatch.collector.errors import NotFound
from runwatch.collector.storage.checkpoints import (
    CheckpointFilter,
    Window,
    last_good,
    list_checkpoints,
    register_checkpoint,
)
from runwatch.settings import Settings

log = logging.getLogger("runwatch.collector.checkpoints")

router = APIRouter(prefix="/api/v1/runs/{run_id}/checkpoints", tags=["checkpoints"])

MAX_LIMIT = 1000


def window_of(settings: Settings) -> Window:
    """The steps around a checkpoint that decide its label, from the collector's settings."""
    return Window(settings.checkpoint_suspect_before, settings.checkpoint_verify_steps)


@router.post(
    "",
    response_model=CheckpointRegistered,
    status_code=201,
    summary="Register a checkpoint the agent saved",
    description="Needs the `ingest` scope. Idempotent: the same (path, step, wall_time) again "
    "answers the first registration (and its `prune` list). With `keep`, the retention pass "
    "marks the checkpoints it drops as deleted and lists them in `prune`.",
    responses={404: {}, 422: {}},
)
async def register(
    run_id: RunId,
    body: RegisterCheckpoint,
    principal: IngestAuth,
    store: StoreDep,
    settings: SettingsDep,
) -> CheckpointRegistered:
    def write() -> CheckpointRegistered:
        principal.check_run(store, run_id)
        with store.write() as conn:
            done = register_checkpoint(
                conn,
                run_id,
                step=body.step,
                path=body.path,
                size_bytes=body.size_bytes,
                wall_time=body.wall_time,
                reason=body.reason,
                command_id=body.command,
                keep=body.keep,
                window=window_of(settings),
                now=time.time(),
            )
        if done.new:
            log.info(
                "run %d: checkpoint %d at step %d registered (%s); %d pruned",
                run_id,
                done.checkpoint.id,
                body.step,
                done.checkpoint.label,
                len(done.prune),
            )
        return CheckpointRegistered(
            checkpoint=checkpoint_out(done.checkpoint),
            prune=[checkpoint_out(c) for c in done.prune],
        )

    return await run_in_threadpool(write)


@router.get(
    "",
    response_model=CheckpointList,
    summary="Checkpoints of a run with their labels, newest first",
    responses={404: {}, 422: {}},
)
async def checkpoints(
    run_id: RunId,
    principal: ReadAuth,
    store: StoreDep,
    settings: SettingsDep,
    label: Annotated[
        Literal["good", "suspect", "unverified"] | None, Query(description="Only this label.")
    ] = None,
    include_deleted: Annotated[
        bool, Query(description="Also those retention or an overwrite dropped.")
    ] = False,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
) -> CheckpointList:
    def query() -> CheckpointList:
        principal.check_run(store, run_id)
        where = CheckpointFilter(label, include_deleted, limit)
        with store.read() as conn:
            found = list_checkpoints(conn, run_id, where, window_of(settings))
        return CheckpointList(checkpoints=[checkpoint_out(c) for c in found])

    return await run_in_threadpool(query)


@router.get(
    "/last-good",
    response_model=CheckpointOut,
    summary="The most recently registered good checkpoint that is not deleted",
    responses={404: {}},
)
async def get_last_good(
    run_id: RunId, principal: ReadAuth, store: StoreDep, settings: SettingsDep
) -> CheckpointOut:
    def query() -> CheckpointOut:
        principal.check_run(store, run_id)
        with store.read() as conn:
            found = last_good(conn, run_id, window_of(settings))
        if found is None:
            raise NotFound(f"run {run_id} has no good checkpoint")
        return checkpoint_out(found)

    return await run_in_threadpool(query)
