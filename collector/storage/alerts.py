"""Alerts and their events, as rows.

The rules (what fires, when an escalation steps on, who gets what) live in
:mod:`runwatch.collector.alerts`; this module and its siblings
:mod:`~runwatch.collector.storage.notifications` (the outbox and the delivery log) and
:mod:`~runwatch.collector.storage.silences` only read and write. Every state change is a
compare-and-set on the row (``WHERE state = ...``), so two collectors, or a collector and an
operator, never both act on one alert.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, insert, select, update

from runwatch.alerting.message import AlertView
from runwatch.collector.errors import NotFound
from runwatch.collector.storage.sql import chunks
from runwatch.collector.storage.tables import alert_events, alerts, projects, runs

ALERT_STATES = ("firing", "acknowledged", "resolved")


OPEN_ALERT_STATES = ("firing", "acknowledged")


MAX_SUMMARY_LENGTH = 2000


def fingerprint(run_id: int, kind: str, key: str) -> str:
    """The dedup key of an alert: its run, its kind and its series."""
    return hashlib.sha256(f"{run_id}\0{kind}\0{key}".encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class AlertRecord:
    id: int
    project_id: int
    project: str
    run_id: int
    run_name: str
    fingerprint: str
    kind: str
    key: str
    severity: str
    summary: str
    source: str
    state: str
    count: int
    first_seen_at: float
    last_seen_at: float
    first_step: int | None
    last_step: int | None
    acknowledged_at: float | None
    acknowledged_by: str | None
    resolved_at: float | None
    resolved_by: str | None
    route: str
    escalation: str | None
    esc_round: int
    esc_step: int
    base_at: float | None
    next_at: float | None
    notified_at: float | None
    resolve_after: float | None
    resolve_at: float | None
    silenced_by: int | None

    def view(self) -> AlertView:
        return AlertView(
            id=self.id,
            project=self.project,
            run_id=self.run_id,
            run_name=self.run_name,
            kind=self.kind,
            key=self.key,
            severity=self.severity,
            state=self.state,
            summary=self.summary,
            count=self.count,
            first_seen_at=self.first_seen_at,
            last_seen_at=self.last_seen_at,
            step=self.last_step,
            acknowledged_by=self.acknowledged_by,
            resolved_by=self.resolved_by,
        )


@dataclass(frozen=True, slots=True)
class AlertEventRecord:
    id: int
    alert_id: int
    at: float
    type: str
    by: str
    detail: str


@dataclass(frozen=True, slots=True)
class AlertFilter:
    """What ``GET /api/v1/alerts`` filters on; None means any. Newest first; ``before`` is a
    cursor (only alerts with a smaller id)."""

    project_id: int | None = None
    run_id: int | None = None
    state: str | None = None
    severity: str | None = None
    kind: str | None = None
    before: int | None = None
    limit: int = 100


@dataclass(slots=True)
class NewAlert:
    """An alert about to be inserted (the dispatcher fills in route and timer)."""

    project_id: int
    run_id: int
    fingerprint: str
    kind: str
    key: str
    severity: str
    summary: str
    source: str
    count: int
    first_seen_at: float
    last_seen_at: float
    first_step: int | None
    last_step: int | None
    route: str
    escalation: str | None
    base_at: float | None
    next_at: float | None
    resolve_after: float | None


def _alert_query():  # type: ignore[no-untyped-def]
    return select(
        alerts, projects.c.name.label("project_name"), runs.c.name.label("run_name")
    ).select_from(
        alerts.join(projects, projects.c.id == alerts.c.project_id).join(
            runs, runs.c.id == alerts.c.run_id
        )
    )


def _alert(row: Any) -> AlertRecord:
    m = row._mapping
    return AlertRecord(
        id=m["id"],
        project_id=m["project_id"],
        project=m["project_name"],
        run_id=m["run_id"],
        run_name=m["run_name"],
        fingerprint=m["fingerprint"],
        kind=m["kind"],
        key=m["key"],
        severity=m["severity"],
        summary=m["summary"],
        source=m["source"],
        state=m["state"],
        count=m["count"],
        first_seen_at=m["first_seen_at"],
        last_seen_at=m["last_seen_at"],
        first_step=m["first_step"],
        last_step=m["last_step"],
        acknowledged_at=m["acknowledged_at"],
        acknowledged_by=m["acknowledged_by"],
        resolved_at=m["resolved_at"],
        resolved_by=m["resolved_by"],
        route=m["route"],
        escalation=m["escalation"],
        esc_round=m["esc_round"],
        esc_step=m["esc_step"],
        base_at=m["base_at"],
        next_at=m["next_at"],
        notified_at=m["notified_at"],
        resolve_after=m["resolve_after"],
        resolve_at=m["resolve_at"],
        silenced_by=m["silenced_by"],
    )


def get_alert(conn: Connection, alert_id: int, *, project_id: int | None = None) -> AlertRecord:
    """:class:`NotFound` unless it exists (in ``project_id``, when given)."""
    row = conn.execute(_alert_query().where(alerts.c.id == alert_id)).first()
    if row is None or (project_id is not None and row.project_id != project_id):
        raise NotFound(f"unknown alert {alert_id}")
    return _alert(row)


def get_alerts(conn: Connection, alert_ids: Iterable[int]) -> list[AlertRecord]:
    """The alerts among ``alert_ids`` that exist, in id order."""
    ids = sorted(set(alert_ids))
    found: list[AlertRecord] = []
    for chunk in chunks(ids):
        rows = conn.execute(_alert_query().where(alerts.c.id.in_(chunk)).order_by(alerts.c.id))
        found += [_alert(r) for r in rows]
    return found


def list_alerts(conn: Connection, where: AlertFilter) -> list[AlertRecord]:
    query = _alert_query()
    for column, value in (
        (alerts.c.project_id, where.project_id),
        (alerts.c.run_id, where.run_id),
        (alerts.c.state, where.state),
        (alerts.c.severity, where.severity),
        (alerts.c.kind, where.kind),
    ):
        if value is not None:
            query = query.where(column == value)
    if where.before is not None:
        query = query.where(alerts.c.id < where.before)
    rows = conn.execute(query.order_by(alerts.c.id.desc()).limit(where.limit))
    return [_alert(r) for r in rows]


def due_alerts(conn: Connection, now: float, limit: int) -> list[AlertRecord]:
    """Firing alerts whose timer has come, the most overdue first."""
    rows = conn.execute(
        _alert_query()
        .where(alerts.c.next_at <= now, alerts.c.state == "firing")
        .order_by(alerts.c.next_at, alerts.c.run_id, alerts.c.id)
        .limit(limit)
    )
    found = [_alert(r) for r in rows]
    if len(found) == limit and found[0].run_id != found[-1].run_id:
        # The limit may cut the last run's alerts in two, and so its message: leave them all
        # to the next tick.
        last = found[-1].run_id
        found = [a for a in found if a.run_id != last]
    return found


def open_alerts_by_fingerprint(
    conn: Connection, fingerprints: Sequence[str]
) -> dict[str, AlertRecord]:
    found: dict[str, AlertRecord] = {}
    for chunk in chunks(list(fingerprints)):
        rows = conn.execute(_alert_query().where(alerts.c.open_fingerprint.in_(chunk)))
        for r in rows:
            found[r.fingerprint] = _alert(r)
    return found


def open_alerts_of_runs(conn: Connection, run_ids: Sequence[int]) -> list[AlertRecord]:
    found: list[AlertRecord] = []
    for chunk in chunks(sorted(set(run_ids))):
        rows = conn.execute(
            _alert_query().where(alerts.c.run_id.in_(chunk), alerts.c.state.in_(OPEN_ALERT_STATES))
        )
        found += [_alert(r) for r in rows]
    return found


def insert_alert(conn: Connection, new: NewAlert, now: float) -> int:
    values = {
        k: getattr(new, k)
        for k in (
            "project_id",
            "run_id",
            "fingerprint",
            "kind",
            "key",
            "severity",
            "summary",
            "source",
            "count",
            "first_seen_at",
            "last_seen_at",
            "first_step",
            "last_step",
            "route",
            "escalation",
            "base_at",
            "next_at",
            "resolve_after",
        )
    }
    values["summary"] = values["summary"][:MAX_SUMMARY_LENGTH]
    alert_id = conn.execute(
        insert(alerts).values(
            **values,
            open_fingerprint=new.fingerprint,
            state="firing",
            esc_round=0,
            esc_step=0,
            resolve_at=None if new.resolve_after is None else new.last_seen_at + new.resolve_after,
        )
    ).inserted_primary_key[0]
    add_event(conn, alert_id, now, "fired", new.source, new.summary[:MAX_SUMMARY_LENGTH])
    return int(alert_id)


def add_event(
    conn: Connection, alert_id: int, at: float, type_: str, by: str, detail: str = ""
) -> None:
    conn.execute(
        insert(alert_events).values(alert_id=alert_id, at=at, type=type_, by=by, detail=detail)
    )


def events_of(conn: Connection, alert_id: int) -> list[AlertEventRecord]:
    rows = conn.execute(
        select(alert_events).where(alert_events.c.alert_id == alert_id).order_by(alert_events.c.id)
    )
    return [AlertEventRecord(r.id, r.alert_id, r.at, r.type, r.by, r.detail) for r in rows]


def set_state(
    conn: Connection,
    alert_id: int,
    *,
    to: str,
    by: str,
    now: float,
    expect: Sequence[str],
    detail: str = "",
    quiet_until: float | None = None,
) -> bool:
    """Move an alert to ``acknowledged`` or ``resolved`` if it is in one of ``expect`` (and,
    with ``quiet_until``, has been quiet until then); stops its escalation. False when it was
    not (someone else moved it first, or it fired again)."""
    values: dict[str, Any] = {"state": to, "next_at": None}
    if to == "acknowledged":
        values |= {"acknowledged_at": now, "acknowledged_by": by}
    else:
        values |= {
            "resolved_at": now,
            "resolved_by": by,
            "open_fingerprint": None,
            "resolve_at": None,
        }
    query = update(alerts).where(alerts.c.id == alert_id, alerts.c.state.in_(expect))
    if quiet_until is not None:
        query = query.where(alerts.c.resolve_at <= quiet_until)
    done = conn.execute(query.values(**values)).rowcount
    if done:
        add_event(conn, alert_id, now, to, by, detail)
    return bool(done)
