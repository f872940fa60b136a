"""Commands: operators issue and cancel them, agents poll and acknowledge them.

The ingest reply carries the same pending commands as the long poll here; see
:mod:`runwatch.collector.control` for delivery, ``at_step`` and the audit log.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Body, Path, Query
from starlette.concurrency import run_in_threadpool

from runwatch.api.deps import ControlDep, IngestAuth, OperateAuth, Rank, ReadAuth, RunId, StoreDep
from runwatch.api.schemas import (
    AckCommand,
    AckReply,
    CommandOut,
    IssueCommand,
    PendingOut,
    command_out,
    wire_command,
)
from runwatch.collector.control import MAX_WAIT_SECONDS
from runwatch.collector.storage.commands import CommandFilter
from runwatch.wire import MAX_ID

router = APIRouter(prefix="/api/v1", tags=["commands"])

CommandId = Annotated[int, Path(ge=1, le=MAX_ID, description="Command id.")]
MAX_LIMIT = 1000


@router.post(
    "/runs/{run_id}/commands",
    response_model=CommandOut,
    status_code=201,
    summary="Issue a command to every rank of a run",
    description="Needs the `operate` scope. `type` is one of `lr_scale` {factor, steps}, "
    "`clip` {max_norm} or {mode: adaptive, z?, alpha?}, `skip_step` {}, `checkpoint` "
    "{reason}, `rollback` {checkpoint: last_good | id, skip_batches, lr_factor, lr_steps}, "
    "`stop` {reason}. A rollback is stored resolved, with the checkpoint's id, path and step "
    "(409 when the run has no good checkpoint, or the id is unknown, deleted or another "
    "run's). Without `at_step` the collector picks the run's latest step plus ~5 s of steps "
    "at its pace, so that every rank holds the command before that step. Only running runs "
    "(409).",
    responses={404: {}, 409: {}, 422: {}},
)
async def issue(
    run_id: RunId,
    body: Annotated[IssueCommand, Body()],
    principal: OperateAuth,
    store: StoreDep,
    control: ControlDep,
) -> CommandOut:
    def create() -> CommandOut:
        principal.check_run(store, run_id)
        record = control.issue(
            run_id,
            body.type,
            body.args.model_dump(exclude_none=True),
            source=principal.source,
            at_step=body.at_step,
            expires_in=body.expires_in,
        )
        return command_out(record)

    return await run_in_threadpool(create)


@router.get(
    "/runs/{run_id}/commands",
    response_model=list[CommandOut],
    summary="Commands of a run with every rank's outcome, oldest first (the audit log)",
    responses={404: {}, 422: {}},
)
async def commands(
    run_id: RunId,
    principal: ReadAuth,
    store: StoreDep,
    control: ControlDep,
    state: Annotated[
        Literal["pending", "delivered", "applied", "failed", "expired", "cancelled"] | None,
        Query(description="Only commands in this state."),
    ] = None,
    after: Annotated[
        int | None, Query(ge=0, le=MAX_ID, description="Only commands with a larger id.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
) -> list[CommandOut]:
    def query() -> list[CommandOut]:
        principal.check_run(store, run_id)
        found = control.commands(run_id, CommandFilter(state, after, limit))
        return [command_out(c) for c in found]

    return await run_in_threadpool(query)


@router.get(
    "/runs/{run_id}/commands/pending",
    response_model=PendingOut,
    summary="Commands this rank has not acknowledged (a long poll)",
    description="What the next ingest reply would carry for this rank. With `wait` > 0 and "
    "nothing pending, the reply waits up to `wait` seconds for a new command.",
    responses={404: {}, 422: {}},
)
async def pending(
    run_id: RunId,
    principal: IngestAuth,
    store: StoreDep,
    control: ControlDep,
    rank: Rank = 0,
    wait: Annotated[
        float, Query(ge=0, le=MAX_WAIT_SECONDS, description="Seconds to wait for a command.")
    ] = 0.0,
) -> PendingOut:
    await run_in_threadpool(principal.check_run, store, run_id)
    found = await control.wait_pending(run_id, rank, wait)
    return PendingOut(commands=[wire_command(c) for c in found])


@router.post(
    "/commands/{command_id}/ack",
    response_model=AckReply,
    summary="Report what a rank did with a command",
    description="Idempotent per (command, rank): the first report counts, a repeat answers "
    "200 with the command's state. Rank 0's report sets the command's state.",
    responses={404: {}, 422: {}},
)
async def ack(
    command_id: CommandId, body: AckCommand, principal: IngestAuth, control: ControlDep
) -> AckReply:
    record = await run_in_threadpool(
        control.ack,
        command_id,
        run_id=body.run,
        rank=body.rank,
        status=body.status,
        detail=body.detail,
        step=body.step,
        project_id=principal.project_id,
    )
    return AckReply(id=record.id, state=record.state)


@router.post(
    "/commands/{command_id}/cancel",
    response_model=CommandOut,
    summary="Cancel a pending or delivered command",
    description="Needs the `operate` scope. Stops delivery; a rank that already holds the "
    "command may still apply it, and its report then shows in the command's state. "
    "A command that has ended answers 409.",
    responses={404: {}, 409: {}},
)
async def cancel(command_id: CommandId, principal: OperateAuth, control: ControlDep) -> CommandOut:
    record = await run_in_threadpool(
        control.cancel, command_id, by=principal.source, project_id=principal.project_id
    )
    return command_out(record)
