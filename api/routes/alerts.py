"""Alerts: list and inspect them, see who was told, acknowledge and resolve them.

What fires, how it is deduplicated and who gets paged when is decided by the alerting
service (:mod:`runwatch.collector.alerts`); these routes read its rows and hand it the
operators' decisions. Acknowledging stops the escalation at once: nobody further down the
escalation policy is paged about that alert.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Body, Path, Query
from starlette.concurrency import run_in_threadpool

from runwatch.api.alert_schemas import (
    AlertDetail,
    AlertOut,
    DeliveryOut,
    RaiseAlert,
    alert_detail,
    alert_out,
    delivery_out,
)
from runwatch.api.deps import AlerterDep, IngestAuth, OperateAuth, ReadAuth, StoreDep
from runwatch.collector.storage.alerts import AlertFilter, events_of, get_alert, list_alerts
from runwatch.collector.storage.notifications import notifications_of
from runwatch.wire import MAX_ID

router = APIRouter(prefix="/api/v1/alerts", tags=["alerts"])

AlertId = Annotated[int, Path(ge=1, le=MAX_ID, description="Alert id.")]
MAX_LIMIT = 1000


@router.get(
    "",
    response_model=list[AlertOut],
    summary="List alerts, newest first",
    description="Only the key's project. Page with `before`: the smallest `id` of the "
    "previous page. A `run` of another project answers 404.",
    responses={404: {}, 422: {}},
)
async def alerts(
    principal: ReadAuth,
    store: StoreDep,
    state: Annotated[
        Literal["firing", "acknowledged", "resolved"] | None,
        Query(description="Only alerts in this state."),
    ] = None,
    run: Annotated[int | None, Query(ge=1, le=MAX_ID, description="Only this run's.")] = None,
    severity: Annotated[Literal["info", "warning", "critical"] | None, Query()] = None,
    kind: Annotated[
        str | None, Query(max_length=80, description="Only this kind, e.g. `loss_spike`.")
    ] = None,
    before: Annotated[
        int | None, Query(ge=1, le=MAX_ID, description="Only alerts with a smaller id.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
) -> list[AlertOut]:
    def query() -> list[AlertOut]:
        if run is not None:
            principal.check_run(store, run)
        where = AlertFilter(principal.project_id, run, state, severity, kind, before, limit)
        with store.read() as conn:
            return [alert_out(a) for a in list_alerts(conn, where)]

    return await run_in_threadpool(query)


@router.post(
    "",
    response_model=AlertOut,
    status_code=201,
    summary="Raise an alert about a run",
    description="Needs the `ingest` scope: for trainer-side tools (the supervisor, a data "
    "loader's watchdog) to report trouble the metrics do not show. An open alert with the "
    "same run, kind and key is updated instead (its count goes up); the reply is the alert "
    "either way. It is routed and escalated like a detector's alert.",
    responses={404: {}, 422: {}},
)
async def raise_alert(
    body: Annotated[RaiseAlert, Body()],
    principal: IngestAuth,
    store: StoreDep,
    alerter: AlerterDep,
) -> AlertOut:
    def create() -> AlertOut:
        principal.check_run(store, body.run)
        record = alerter.raise_alert(
            run_id=body.run,
            kind=body.kind,
            key=body.key,
            severity=body.severity,
            summary=body.summary,
            source=principal.source,
            step=body.step,
        )
        return alert_out(record)

    return await run_in_threadpool(create)


@router.get(
    "/{alert_id}",
    response_model=AlertDetail,
    summary="One alert with its history",
    description="`events`: every transition (fired, escalated, acknowledged, resolved, "
    "silenced...), who made it and when.",
    responses={404: {}},
)
async def alert(alert_id: AlertId, principal: ReadAuth, store: StoreDep) -> AlertDetail:
    def query() -> AlertDetail:
        with store.read() as conn:
            found = get_alert(conn, alert_id, project_id=principal.project_id)
            return alert_detail(found, events_of(conn, alert_id))

    return await run_in_threadpool(query)


@router.get(
    "/{alert_id}/deliveries",
    response_model=list[DeliveryOut],
    summary="Messages about an alert and every attempt to deliver them, oldest first",
    description="One entry per notification (a channel and a target at one escalation step, "
    "or a state change); `log` holds each attempt with the provider's error, if any.",
    responses={404: {}},
)
async def deliveries(alert_id: AlertId, principal: ReadAuth, store: StoreDep) -> list[DeliveryOut]:
    def query() -> list[DeliveryOut]:
        with store.read() as conn:
            get_alert(conn, alert_id, project_id=principal.project_id)
            return [delivery_out(n) for n in notifications_of(conn, alert_id)]

    return await run_in_threadpool(query)


@router.post(
    "/{alert_id}/ack",
    response_model=AlertOut,
    summary="Acknowledge an alert: someone is on it",
    description="Needs the `operate` scope. Stops the escalation at once; channels that "
    "thread (Slack, webhooks, the log) are told. Acknowledging an acknowledged alert "
    "changes nothing and answers 200; a resolved one answers 409.",
    responses={404: {}, 409: {}},
)
async def acknowledge(alert_id: AlertId, principal: OperateAuth, alerter: AlerterDep) -> AlertOut:
    found = await run_in_threadpool(
        alerter.acknowledge, [alert_id], by=principal.source, project_id=principal.project_id
    )
    return alert_out(found[0])


@router.post(
    "/{alert_id}/resolve",
    response_model=AlertOut,
    summary="Resolve an alert: the trouble is over",
    description="Needs the `operate` scope. Stops the escalation; the next occurrence of "
    "the condition opens a new alert. Resolving a resolved alert changes nothing.",
    responses={404: {}},
)
async def resolve(alert_id: AlertId, principal: OperateAuth, alerter: AlerterDep) -> AlertOut:
    found = await run_in_threadpool(
        alerter.resolve, [alert_id], by=principal.source, project_id=principal.project_id
    )
    return alert_out(found[0])
