"""Commands of the control channel: stored, delivered per rank, acknowledged, expired.

The ``commands`` table is the audit log of every intervention: who issued it
(``source``: ``api:<key prefix>``, ``api:open`` on a keyless loopback server,
``policy:<name>``), when, when a rank first received it, how it ended, who
cancelled it; ``command_acks`` holds what each rank reported. A command's
``state`` follows rank 0, the primary::

    pending --first delivery--> delivered --rank 0's ack--> applied | failed | expired
    pending | delivered --an operator--> cancelled
    pending | delivered --expires_at passes without rank 0's ack--> expired

Expiry is checked lazily (:func:`expire_due`, called on delivery, reads and
acks), not by a timer. Rank 0's ``applied`` or ``failed`` is the truth about
the trainer and wins even over ``expired`` or ``cancelled`` (a cancel cannot
recall a command a rank already holds; ``cancelled_by`` keeps the cancel in the
log). The first ack of each rank is kept; a repeated one changes nothing.

A command is *deliverable* to a rank while it is neither cancelled nor expired,
its ``expires_at`` lies ahead, and that rank has not acknowledged it: rank 0's
ack does not stop delivery to the other ranks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, and_, case, exists, func, insert, select, update

from runwatch.collector.errors import Conflict, NotFound
from runwatch.collector.storage.runs import RunRecord
from runwatch.collector.storage.sql import insert_or_ignore
from runwatch.collector.storage.tables import command_acks, commands, series
from runwatch.wire import ACK_STATUSES, MAX_INT64, Command

COMMAND_STATES = ("pending", "delivered", "applied", "failed", "expired", "cancelled")
OPEN_STATES = ("pending", "delivered")
"""States an operator may cancel and in which a command may still expire."""
UNDELIVERABLE_STATES = ("expired", "cancelled")
MAX_DETAIL_LENGTH = 2000

STEP_TIME_KEY = "train/step_time"
"""Seconds per step, as the agent's hooks record it; sets the lead of :func:`next_safe_step`."""
DELIVERY_LEAD_SECONDS = 5.0
"""How long every rank needs to receive a command: its next ingest reply or long poll."""
MAX_LEAD_STEPS = 1_000_000
"""Upper bound of the lead in steps (a step time of microseconds would ask for millions)."""


@dataclass(frozen=True, slots=True)
class AckRecord:
    rank: int
    status: str
    detail: str
    step: int | None
    acked_at: float


@dataclass(frozen=True, slots=True)
class CommandRecord:
    id: int
    run_id: int
    type: str
    args: dict[str, Any]
    at_step: int | None
    source: str
    state: str
    created_at: float
    delivered_at: float | None
    finished_at: float | None
    expires_at: float
    cancelled_by: str | None
    acks: tuple[AckRecord, ...]

    def wire(self) -> Command:
        """The command as an agent receives it."""
        return Command(self.id, self.type, self.args, self.at_step, self.source)


@dataclass(frozen=True, slots=True)
class CommandFilter:
    """What ``GET /api/v1/runs/{id}/commands`` may filter on; ``after`` is an id cursor."""

    state: str | None = None
    after: int | None = None
    limit: int = 100


def insert_command(
    conn: Connection,
    *,
    run_id: int,
    type: str,
    args: dict[str, Any],
    at_step: int | None,
    source: str,
    now: float,
    expires_at: float,
) -> int:
    """Store a new ``pending`` command; returns its id."""
    return conn.execute(
        insert(commands)
        .values(
            run_id=run_id,
            type=type,
            args=args,
            at_step=at_step,
            source=source,
            state="pending",
            created_at=now,
            expires_at=expires_at,
        )
        .returning(commands.c.id)
    ).scalar_one()


def get_command(conn: Connection, command_id: int) -> CommandRecord:
    """The command with its acks; :class:`NotFound` if absent."""
    found = _records(conn, conn.execute(select(commands).where(commands.c.id == command_id)))
    if not found:
        raise NotFound(f"unknown command {command_id}")
    return found[0]


def command_run(conn: Connection, command_id: int) -> int | None:
    """Run id of the command, None when the command does not exist."""
    return conn.execute(
        select(commands.c.run_id).where(commands.c.id == command_id)
    ).scalar_one_or_none()


def list_commands(conn: Connection, run_id: int, where: CommandFilter) -> list[CommandRecord]:
    """Commands of the run matching ``where`` with their acks, oldest first."""
    query = select(commands).where(commands.c.run_id == run_id)
    if where.state is not None:
        query = query.where(commands.c.state == where.state)
    if where.after is not None:
        query = query.where(commands.c.id > where.after)
    return _records(conn, conn.execute(query.order_by(commands.c.id).limit(where.limit)))


def deliverable(conn: Connection, run_id: int, rank: int, now: float) -> list[CommandRecord]:
    """Commands of the run ``rank`` should receive now, oldest first (acks left out)."""
    acked = exists().where(
        and_(command_acks.c.command_id == commands.c.id, command_acks.c.rank == rank)
    )
    rows = conn.execute(
        select(commands)
        .where(
            commands.c.run_id == run_id,
            commands.c.state.not_in(UNDELIVERABLE_STATES),
            commands.c.expires_at > now,
            ~acked,
        )
        .order_by(commands.c.id)
    )
    return [_record(r, ()) for r in rows]


def mark_delivered(conn: Connection, command_ids: Iterable[int], now: float) -> None:
    """Record the first delivery: ``delivered_at``, and ``pending`` becomes ``delivered``."""
    ids = list(command_ids)
    if not ids:
        return
    conn.execute(
        update(commands)
        .where(commands.c.id.in_(ids), commands.c.delivered_at.is_(None))
        .values(
            delivered_at=now,
            state=case((commands.c.state == "pending", "delivered"), else_=commands.c.state),
        )
    )


def expire_due(conn: Connection, now: float, *, run_id: int | None = None) -> int:
    """Mark open commands past their ``expires_at`` as expired; returns how many."""
    query = update(commands).where(commands.c.state.in_(OPEN_STATES), commands.c.expires_at <= now)
    if run_id is not None:
        query = query.where(commands.c.run_id == run_id)
    return conn.execute(query.values(state="expired", finished_at=commands.c.expires_at)).rowcount


def record_ack(
    conn: Connection,
    command_id: int,
    *,
    rank: int,
    status: str,
    detail: str,
    step: int | None,
    now: float,
) -> bool:
    """Store the first ack of ``rank``; True when it was new (a repeat changes nothing)."""
    if status not in ACK_STATUSES:
        raise ValueError(f"status must be one of {', '.join(ACK_STATUSES)}, not {status!r}")
    new = insert_or_ignore(
        conn,
        command_acks,
        {
            "command_id": command_id,
            "rank": rank,
            "status": status,
            "detail": detail[:MAX_DETAIL_LENGTH],
            "step": step,
            "acked_at": now,
        },
    )
    if not new:
        return False
    # An ack proves the command was delivered, even if no reply of ours said so.
    mark_delivered(conn, [command_id], now)
    if rank == 0:
        # Rank 0's applied/failed is what happened to the trainer: it wins over a lazy
        # expiry or a late cancel. Its "expired" (arrived after at_step) only ends an open one.
        settles = ("pending", "delivered", "expired", "cancelled")
        conn.execute(
            update(commands)
            .where(
                commands.c.id == command_id,
                commands.c.state.in_(settles if status != "expired" else OPEN_STATES),
            )
            .values(state=status, finished_at=now)
        )
    return True


def cancel_command(conn: Connection, command_id: int, *, by: str, now: float) -> None:
    """Cancel an open command; :class:`Conflict` once it has ended."""
    done = conn.execute(
        update(commands)
        .where(commands.c.id == command_id, commands.c.state.in_(OPEN_STATES))
        .values(state="cancelled", finished_at=now, cancelled_by=by)
    ).rowcount
    if done != 1:
        state = conn.execute(
            select(commands.c.state).where(commands.c.id == command_id)
        ).scalar_one_or_none()
        if state is None:
            raise NotFound(f"unknown command {command_id}")
        raise Conflict(
            f"command {command_id} is {state}; only a pending or delivered command can be cancelled"
        )


def live_runs(conn: Connection, now: float) -> dict[int, float]:
    """Runs with a deliverable command, each with the latest ``expires_at`` among them."""
    rows = conn.execute(
        select(commands.c.run_id, func.max(commands.c.expires_at))
        .where(commands.c.state.not_in(UNDELIVERABLE_STATES), commands.c.expires_at > now)
        .group_by(commands.c.run_id)
    )
    return {run_id: until for run_id, until in rows}


def next_safe_step(conn: Connection, run: RunRecord, *, lead: float = DELIVERY_LEAD_SECONDS) -> int:
    """The step at which every rank can apply a command issued now.

    The run's latest step (the step of its most recently written point: the
    ``last_step`` of the series with the latest ``last_wall_time``, any rank; 0
    before any) plus the steps the run makes in ``lead`` seconds at its pace:
    ``ceil(lead / step_time)`` with rank 0's latest ``train/step_time``, or 1 step
    when the run does not report one (or reports a non-positive or non-finite one).
    A run whose agent said it is a single process (``run.world_size`` 1) gets the
    next step: there are no other ranks to keep in step, and its agent applies a
    command that arrives after its ``at_step`` at once instead of expiring it.

    Not the largest ``last_step``: after a rollback the run repeats steps, and a
    series it no longer writes (an eval metric, a marker) still holds a later step.
    """
    latest = conn.execute(
        select(series.c.last_step)
        .where(series.c.run_id == run.id, series.c.last_wall_time.is_not(None))
        .order_by(series.c.last_wall_time.desc(), series.c.last_step.desc())
        .limit(1)
    ).scalar_one_or_none()
    row = conn.execute(
        select(series.c.last_value, series.c.n_points).where(
            series.c.run_id == run.id, series.c.key == STEP_TIME_KEY, series.c.rank == 0
        )
    ).one_or_none()
    step_time = math.nan  # NULL in last_value is a NaN (see storage.tables)
    if row is not None and row.n_points and row.last_value is not None:
        step_time = float(row.last_value)
    single = run.world_size == 1
    steps = 1
    if not single and math.isfinite(step_time) and step_time > 0:
        steps = max(1, min(MAX_LEAD_STEPS, math.ceil(lead / step_time)))
    return min((latest or 0) + steps, MAX_INT64)


def _records(conn: Connection, rows: Iterable[Any]) -> list[CommandRecord]:
    rows = list(rows)
    acks: dict[int, list[AckRecord]] = {}
    if rows:
        found = conn.execute(
            select(command_acks)
            .where(command_acks.c.command_id.in_([r.id for r in rows]))
            .order_by(command_acks.c.command_id, command_acks.c.rank)
        )
        for a in found:
            acks.setdefault(a.command_id, []).append(
                AckRecord(a.rank, a.status, a.detail, a.step, a.acked_at)
            )
    return [_record(r, tuple(acks.get(r.id, ()))) for r in rows]


def _record(row: Any, acks: tuple[AckRecord, ...]) -> CommandRecord:
    return CommandRecord(
        id=row.id,
        run_id=row.run_id,
        type=row.type,
        args=row.args,
        at_step=row.at_step,
        source=row.source,
        state=row.state,
        created_at=row.created_at,
        delivered_at=row.delivered_at,
        finished_at=row.finished_at,
        expires_at=row.expires_at,
        cancelled_by=row.cancelled_by,
        acks=acks,
    )
