"""Snapshots of each run's detection engine: one row per run, replaced on every save."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import Connection, select
from sqlalchemy.dialects import postgresql, sqlite

from runwatch.collector.storage.tables import detector_state


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A run's engine as bytes, with the last step it had seen when it was taken."""

    run_id: int
    state: bytes
    step: int | None
    updated_at: float


def save_states(conn: Connection, snapshots: Iterable[Snapshot]) -> int:
    """Insert or replace the snapshot of each run; returns how many were written."""
    rows = [
        {"run_id": s.run_id, "state": s.state, "step": s.step, "updated_at": s.updated_at}
        for s in snapshots
    ]
    if not rows:
        return 0
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    stmt = dialect.insert(detector_state)
    stmt = stmt.on_conflict_do_update(
        index_elements=[detector_state.c.run_id],
        set_={
            "state": stmt.excluded.state,
            "step": stmt.excluded.step,
            "updated_at": stmt.excluded.updated_at,
        },
    )
    conn.execute(stmt, rows)
    return len(rows)


def load_state(conn: Connection, run_id: int) -> Snapshot | None:
    """The run's last snapshot, None if it has none."""
    row = conn.execute(
        select(detector_state).where(detector_state.c.run_id == run_id)
    ).one_or_none()
    if row is None:
        return None
    return Snapshot(row.run_id, bytes(row.state), row.step, row.updated_at)
