"""The notification outbox, its delivery log, and receipts of signed inbound requests.

One ``notifications`` row per message to one target of one channel, written by the
dispatcher in the transaction that advances an escalation, claimed and finished by the
delivery workers (:mod:`runwatch.collector.delivery`); ``delivery_attempts`` logs every
attempt; ``notification_alerts`` names the alerts each message is about.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, insert, select, update

from runwatch.collector.storage.sql import IN_CHUNK, chunks, insert_or_ignore
from runwatch.collector.storage.tables import (
    delivery_attempts,
    notification_alerts,
    notifications,
    webhook_receipts,
)

ATTENTION_EVENTS = ("firing", "escalated", "repeat")


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
    for chunk in chunks(list(notification_ids)):
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
    for chunk in chunks(ids):
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
            notification_alerts.c.alert_id.in_(list(alert_ids)[:IN_CHUNK]),
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
    for chunk in chunks(list(alert_ids)):
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


def notification_channel_type(conn: Connection, notification_id: int) -> str | None:
    return conn.execute(
        select(notifications.c.channel_type).where(notifications.c.id == notification_id)
    ).scalar()


def first_receipt(conn: Connection, provider: str, nonce: str, now: float) -> bool:
    """Remember a signed inbound request; False when it was seen before (a replay)."""
    return insert_or_ignore(
        conn, webhook_receipts, {"provider": provider, "nonce": nonce[:128], "at": now}
    )


def forget_receipts(conn: Connection, before: float) -> None:
    """Receipts older than any request the signatures still accept are not needed."""
    conn.execute(webhook_receipts.delete().where(webhook_receipts.c.at < before))
