"""Silences: matchers and a time window that hold back an alert's messages."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, insert, select, update

from runwatch.alerting.silence import silence_matches
from runwatch.collector.errors import Conflict, NotFound
from runwatch.collector.storage.alerts import AlertRecord
from runwatch.collector.storage.sql import chunks
from runwatch.collector.storage.tables import silences


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
    for chunk in chunks(ids):
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


def holding(silences: Iterable[SilenceRecord], alert: AlertRecord) -> list[SilenceRecord]:
    """The silences among ``silences`` (read as active) that hold ``alert``'s messages back."""
    return [
        s
        for s in silences
        if s.project_id == alert.project_id
        and silence_matches(
            s.matchers,
            run=alert.run_name,
            run_id=alert.run_id,
            kind=alert.kind,
            key=alert.key,
            severity=alert.severity,
        )
    ]
