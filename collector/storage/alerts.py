"""Alerts, their events, silences and the notification outbox, as rows.

The rules (what fires, when an escalation steps on, who gets what) live in
:mod:`runwatch.collector.alerts`; this module only reads and writes. Every state change
is a compare-and-set on the row (``WHERE state = ...`` / ``WHERE esc_step = ...``), so two
collectors, or a collector and an operator, never both act on one alert.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, func, insert, select, update

from runwatch.alerting.message import AlertView
from runwatch.collector.errors import Conflict, NotFound
from runwatch.collector.storage.sql import insert_or_ignore
from runwatch.collector.storage.tables import (
    alert_events,
    alerts,
    delivery_attempts,
    notification_alerts,
    notifications,
    projects,
    runs,
    silences,
    webhook_receipts,
)

ALERT_STATES = ("firing", "acknowledged", "resolved")
OPEN_ALERT_STATES = ("firing", "acknowledged")
NOTIFICATION_STATES = ("pending", "sending", "sent", "failed", "cancelled")
ATTENTION_EVENTS = ("firing", "escalated", "repeat")
MAX_SUMMARY_LENGTH = 2000
SILENCE_FIELDS = ("run", "run_id", "kind", "key", "severity")
"""What a silence's matchers may name: run (name glob), run_id (exact), kind, key, severity."""
_IN_CHUNK = 500
"""Ids per ``IN (...)``: well under SQLite's and PostgreSQL's parameter limits."""


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
class AttemptRecord:
    attempt: int
    at: float
    status: str
    error: str | None
    duration: float


@dataclass(frozen=True, slots=True)
class NotificationRecord:
    id: int
    project_id: int
    run_id: int
    channel: str
    channel_type: str
    target: str
    event: str
    esc_step: int | None
    state: str
    attempts: int
    created_at: float
    next_attempt_at: float
    lease_until: float | None
    sent_at: float | None
    last_error: str | None
    provider_ref: str | None
    alert_ids: tuple[int, ...] = ()
    log: tuple[AttemptRecord, ...] = ()


@dataclass(frozen=True, slots=True)
class SilenceRecord:
    id: int
    project_id: int
    matchers: dict[str, Any]
    starts_at: float
    ends_at: float
    created_by: str
    comment: str
    created_at: float
    expired_by: str | None

    def active(self, now: float) -> bool:
        return self.starts_at <= now < self.ends_at


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
    extra: dict[str, Any] = field(default_factory=dict)


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


def _chunks(ids: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for i in range(0, len(ids), _IN_CHUNK):
        yield ids[i : i + _IN_CHUNK]


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
    for chunk in _chunks(ids):
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
    for chunk in _chunks(list(fingerprints)):
        rows = conn.execute(_alert_query().where(alerts.c.open_fingerprint.in_(chunk)))
        for r in rows:
            found[r.fingerprint] = _alert(r)
    return found


def open_alerts_of_runs(conn: Connection, run_ids: Sequence[int]) -> list[AlertRecord]:
    found: list[AlertRecord] = []
    for chunk in _chunks(sorted(set(run_ids))):
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


def add_events(conn: Connection, rows: list[dict[str, Any]]) -> None:
    if rows:
        conn.execute(insert(alert_events), rows)


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


# -- notifications ------------------------------------------------------------------------


def insert_notification(
    conn: Connection,
    *,
    project_id: int,
    run_id: int,
    channel: str,
    channel_type: str,
    target: str,
    event: str,
    esc_step: int | None,
    alert_ids: Iterable[int],
    now: float,
) -> int:
    notification_id = int(
        conn.execute(
            insert(notifications).values(
                project_id=project_id,
                run_id=run_id,
                channel=channel,
                channel_type=channel_type,
                target=target,
                event=event,
                esc_step=esc_step,
                state="pending",
                attempts=0,
                created_at=now,
                next_attempt_at=now,
            )
        ).inserted_primary_key[0]
    )
    conn.execute(
        insert(notification_alerts),
        [{"notification_id": notification_id, "alert_id": a} for a in sorted(set(alert_ids))],
    )
    return notification_id


def _notification(row: Any, alert_ids: tuple[int, ...] = (), log: tuple[AttemptRecord, ...] = ()):  # type: ignore[no-untyped-def]
    m = row._mapping
    return NotificationRecord(
        **{
            k: m[k]
            for k in NotificationRecord.__dataclass_fields__
            if k not in ("alert_ids", "log")
        },
        alert_ids=alert_ids,
        log=log,
    )


def _alert_ids_of(conn: Connection, notification_ids: Sequence[int]) -> dict[int, tuple[int, ...]]:
    found: dict[int, list[int]] = {}
    for chunk in _chunks(list(notification_ids)):
        rows = conn.execute(
            select(notification_alerts.c.notification_id, notification_alerts.c.alert_id)
            .where(notification_alerts.c.notification_id.in_(chunk))
            .order_by(notification_alerts.c.alert_id)
        )
        for r in rows:
            found.setdefault(r.notification_id, []).append(r.alert_id)
    return {k: tuple(v) for k, v in found.items()}


def due_notifications(conn: Connection, now: float, limit: int) -> list[NotificationRecord]:
    rows = list(
        conn.execute(
            select(notifications)
            .where(notifications.c.state == "pending", notifications.c.next_attempt_at <= now)
            .order_by(notifications.c.next_attempt_at, notifications.c.id)
            .limit(limit)
        )
    )
    ids = _alert_ids_of(conn, [r.id for r in rows])
    return [_notification(r, ids.get(r.id, ())) for r in rows]


def claim_notification(conn: Connection, notification_id: int, lease_until: float) -> bool:
    """Take a pending notification for sending; False if another worker took it first."""
    return bool(
        conn.execute(
            update(notifications)
            .where(notifications.c.id == notification_id, notifications.c.state == "pending")
            .values(state="sending", lease_until=lease_until)
        ).rowcount
    )


def defer_notification(
    conn: Connection, notification_id: int, until: float, *, claimed: bool = False
) -> None:
    """Not before ``until``, without spending an attempt; ``claimed``: handed back by the
    worker that claimed it."""
    conn.execute(
        update(notifications)
        .where(
            notifications.c.id == notification_id,
            notifications.c.state == ("sending" if claimed else "pending"),
        )
        .values(state="pending", next_attempt_at=until, lease_until=None)
    )


def finish_attempt(
    conn: Connection,
    notification_id: int,
    *,
    attempt: int,
    at: float,
    status: str,
    error: str | None,
    duration: float,
    state: str,
    next_attempt_at: float | None = None,
    provider_ref: str | None = None,
) -> None:
    """Log one attempt and move the notification to ``state`` (pending again to retry)."""
    conn.execute(
        insert(delivery_attempts).values(
            notification_id=notification_id,
            attempt=attempt,
            at=at,
            status=status,
            error=error,
            duration=duration,
        )
    )
    values: dict[str, Any] = {"state": state, "attempts": attempt, "lease_until": None}
    if error is not None:
        values["last_error"] = error
    if next_attempt_at is not None:
        values["next_attempt_at"] = next_attempt_at
    if state == "sent":
        values |= {"sent_at": at, "provider_ref": provider_ref}
    conn.execute(
        update(notifications).where(notifications.c.id == notification_id).values(**values)
    )


def cancel_notification(conn: Connection, notification_id: int, why: str) -> None:
    conn.execute(
        update(notifications)
        .where(
            notifications.c.id == notification_id, notifications.c.state.in_(("pending", "sending"))
        )
        .values(state="cancelled", last_error=why, lease_until=None)
    )


def release_expired_leases(conn: Connection, now: float) -> int:
    """Notifications a dead worker was sending go back to pending (sent at least once)."""
    return conn.execute(
        update(notifications)
        .where(notifications.c.state == "sending", notifications.c.lease_until < now)
        .values(state="pending", lease_until=None, next_attempt_at=now)
    ).rowcount


def notifications_of(conn: Connection, alert_id: int) -> list[NotificationRecord]:
    """Every notification about an alert with its delivery log, oldest first."""
    rows = list(
        conn.execute(
            select(notifications)
            .join(notification_alerts, notification_alerts.c.notification_id == notifications.c.id)
            .where(notification_alerts.c.alert_id == alert_id)
            .order_by(notifications.c.id)
        )
    )
    ids = [r.id for r in rows]
    logs: dict[int, list[AttemptRecord]] = {}
    for chunk in _chunks(ids):
        for a in conn.execute(
            select(delivery_attempts)
            .where(delivery_attempts.c.notification_id.in_(chunk))
            .order_by(delivery_attempts.c.id)
        ):
            logs.setdefault(a.notification_id, []).append(
                AttemptRecord(a.attempt, a.at, a.status, a.error, a.duration)
            )
    alert_ids = _alert_ids_of(conn, ids)
    return [_notification(r, alert_ids.get(r.id, ()), tuple(logs.get(r.id, ()))) for r in rows]


def first_ref(conn: Connection, alert_ids: Sequence[int], channel: str, target: str) -> str | None:
    """The provider reference of the first sent message about any of ``alert_ids`` on this
    channel and target: the thread later messages about them go into."""
    if not alert_ids:
        return None
    row = conn.execute(
        select(notifications.c.provider_ref)
        .join(notification_alerts, notification_alerts.c.notification_id == notifications.c.id)
        .where(
            notification_alerts.c.alert_id.in_(list(alert_ids)[:_IN_CHUNK]),
            notifications.c.channel == channel,
            notifications.c.target == target,
            notifications.c.state == "sent",
            notifications.c.provider_ref.is_not(None),
        )
        .order_by(notifications.c.id)
        .limit(1)
    ).first()
    return None if row is None else row.provider_ref


def paged_alerts(conn: Connection, alert_ids: Sequence[int], channel: str, target: str) -> set[int]:
    """The alerts among ``alert_ids`` that a message asking for attention was sent about to
    this channel and target."""
    found: set[int] = set()
    for chunk in _chunks(list(alert_ids)):
        found.update(
            conn.execute(
                select(notification_alerts.c.alert_id)
                .join(notifications, notification_alerts.c.notification_id == notifications.c.id)
                .where(
                    notification_alerts.c.alert_id.in_(chunk),
                    notifications.c.channel == channel,
                    notifications.c.target == target,
                    notifications.c.event.in_(ATTENTION_EVENTS),
                    notifications.c.state == "sent",
                )
            ).scalars()
        )
    return found


def reached(conn: Connection, alert_id: int) -> list[tuple[str, str]]:
    """(channel, target) pairs that were sent, or are sending, a message asking for attention
    about the alert: who gets told when its state changes."""
    rows = conn.execute(
        select(notifications.c.channel, notifications.c.target)
        .join(notification_alerts, notification_alerts.c.notification_id == notifications.c.id)
        .where(
            notification_alerts.c.alert_id == alert_id,
            notifications.c.event.in_(ATTENTION_EVENTS),
            notifications.c.state.in_(("sent", "sending")),
        )
        .distinct()
    )
    return [(r.channel, r.target) for r in rows]


def count_notifications(conn: Connection, *, state: str | None = None) -> int:
    query = select(func.count()).select_from(notifications)
    if state is not None:
        query = query.where(notifications.c.state == state)
    return int(conn.execute(query).scalar_one())


# -- silences ------------------------------------------------------------------------------


def _silence(row: Any) -> SilenceRecord:
    return SilenceRecord(
        id=row.id,
        project_id=row.project_id,
        matchers=dict(row.matchers),
        starts_at=row.starts_at,
        ends_at=row.ends_at,
        created_by=row.created_by,
        comment=row.comment,
        created_at=row.created_at,
        expired_by=row.expired_by,
    )


def create_silence(
    conn: Connection,
    *,
    project_id: int,
    matchers: dict[str, Any],
    starts_at: float,
    ends_at: float,
    created_by: str,
    comment: str,
    now: float,
) -> SilenceRecord:
    silence_id = conn.execute(
        insert(silences).values(
            project_id=project_id,
            matchers=matchers,
            starts_at=starts_at,
            ends_at=ends_at,
            created_by=created_by,
            comment=comment,
            created_at=now,
        )
    ).inserted_primary_key[0]
    return get_silence(conn, int(silence_id))


def get_silence(
    conn: Connection, silence_id: int, *, project_id: int | None = None
) -> SilenceRecord:
    row = conn.execute(select(silences).where(silences.c.id == silence_id)).first()
    if row is None or (project_id is not None and row.project_id != project_id):
        raise NotFound(f"unknown silence {silence_id}")
    return _silence(row)


def list_silences(
    conn: Connection,
    *,
    project_id: int | None,
    now: float,
    active_only: bool = False,
    limit: int = 1000,
) -> list[SilenceRecord]:
    query = select(silences)
    if project_id is not None:
        query = query.where(silences.c.project_id == project_id)
    if active_only:
        query = query.where(silences.c.starts_at <= now, silences.c.ends_at > now)
    rows = conn.execute(query.order_by(silences.c.id.desc()).limit(limit))
    return [_silence(r) for r in rows]


def active_silences(
    conn: Connection, project_ids: Iterable[int], now: float
) -> list[SilenceRecord]:
    ids = sorted(set(project_ids))
    found: list[SilenceRecord] = []
    for chunk in _chunks(ids):
        rows = conn.execute(
            select(silences).where(
                silences.c.project_id.in_(chunk),
                silences.c.starts_at <= now,
                silences.c.ends_at > now,
            )
        )
        found += [_silence(r) for r in rows]
    return found


def expire_silence(
    conn: Connection, silence_id: int, *, by: str, now: float, project_id: int | None = None
) -> SilenceRecord:
    """End a silence now; :class:`Conflict` when it has ended already."""
    found = get_silence(conn, silence_id, project_id=project_id)
    if found.ends_at <= now:
        raise Conflict(f"silence {silence_id} has ended already")
    conn.execute(
        update(silences)
        .where(silences.c.id == silence_id)
        .values(ends_at=max(now, found.starts_at), expired_by=by)
    )
    return get_silence(conn, silence_id)


# -- inbound requests -----------------------------------------------------------------------


def first_receipt(conn: Connection, provider: str, nonce: str, now: float) -> bool:
    """Remember a signed inbound request; False when it was seen before (a replay)."""
    return insert_or_ignore(
        conn, webhook_receipts, {"provider": provider, "nonce": nonce[:128], "at": now}
    )


def forget_receipts(conn: Connection, before: float) -> None:
    """Receipts older than any request the signatures still accept are not needed."""
    conn.execute(webhook_receipts.delete().where(webhook_receipts.c.at < before))


def notification_channel_type(conn: Connection, notification_id: int) -> str | None:
    return conn.execute(
        select(notifications.c.channel_type).where(notifications.c.id == notification_id)
    ).scalar()
