"""The checkpoint registry: what the agent saved, how trustworthy it is, what may go.

**Labels** are computed when read, from the run's anomalies and progress, never
stored (an anomaly found later changes them)::

    suspect     an anomaly of a training-signal kind (SUSPECT_KINDS, any severity) at a
                step in [step - before, step + after]
    unverified  not suspect, and the run (still running) has not yet gone ``after``
                steps past the checkpoint
    good        otherwise

``before`` and ``after`` are the collector's ``checkpoint_suspect_before`` and
``checkpoint_verify_steps`` (a :class:`Window`).

**Steps go back after a rollback**: the run repeats steps it already made, so the
step alone does not say whether something happened before or after a save. Two
rules use the wall times (both on the trainer's clock) to stay on the right branch:

- an anomaly observed *before* the checkpoint was saved, at a *later* step than
  the checkpoint, belongs to a branch a rollback abandoned (the run cannot have
  been past the checkpoint's step before saving it) and does not count;
- "the run went ``after`` steps past it" means a point at a step of at least
  ``step + after`` written after the save, in the rank-0 series with the most
  points (the one logged every step, in effect: one index range scan, where all
  the run's series would cost one per series). The points keep this evidence; the
  series' ``last_step`` does not (it follows the latest point, so it goes back with
  the run), and a verified checkpoint stays verified after a rollback to it.

A checkpoint whose branch was abandoned before it was verified becomes good when
the new branch passes its step: the collector does not follow lineage further.

**Retention** runs on each registration that carries ``keep`` (K): it never drops
the newest checkpoint (highest id), the K newest good ones, unverified ones, or the
target of a pending or delivered rollback; it drops older good ones beyond K and
suspect ones older than the newest good one. Dropped checkpoints are marked deleted
(``deleted_at``, and ``pruned_by`` the registration that dropped them) and returned,
so that the agent removes the files it wrote; a retried registration gets the same
list back. A new checkpoint at the path of a live one means the file was overwritten:
the old record is marked deleted without being returned (its path is the new file's).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Connection,
    Select,
    exists,
    or_,
    select,
    true,
    update,
)

from runwatch.collector.errors import Conflict, InvalidInput
from runwatch.collector.storage.commands import OPEN_STATES, command_run
from runwatch.collector.storage.runs import get_run
from runwatch.collector.storage.sql import insert_or_ignore
from runwatch.collector.storage.tables import anomalies, checkpoints, commands, points, series
from runwatch.wire import MAX_INT64

SUSPECT_KINDS = (
    "nonfinite_loss",
    "nonfinite_grad_norm",
    "nonfinite_activations",
    "loss_spike",
    "loss_spike_sustained",
    "grad_norm_spike",
    "grad_norm_spike_sustained",
    "divergence",
    "activation_drift",
    "update_ratio_high",
    "lr_loss_jump",
)
"""Anomaly kinds that say the training signal was bad; a hang or a slow rank does not."""
LABELS = ("good", "suspect", "unverified")
MAX_WINDOW_STEPS = 10**9
"""Largest ``before``/``after`` (the settings' bound)."""
MAX_STEP = MAX_INT64 - MAX_WINDOW_STEPS
"""Largest step of a checkpoint: ``step + after`` must not overflow a 64-bit integer."""
DEFAULT_LR_FACTOR = 1.0
DEFAULT_LR_STEPS = 200


@dataclass(frozen=True, slots=True)
class Window:
    """Steps before and after a checkpoint in which a training-signal anomaly makes it suspect."""

    before: int = 50
    after: int = 100


DEFAULT_WINDOW = Window()


@dataclass(frozen=True, slots=True)
class CheckpointRecord:
    id: int
    run_id: int
    step: int
    path: str
    size_bytes: int
    wall_time: float
    reason: str
    command: int | None
    label: str
    label_detail: str
    created_at: float
    deleted_at: float | None


@dataclass(frozen=True, slots=True)
class Registered:
    checkpoint: CheckpointRecord
    prune: list[CheckpointRecord]
    """Checkpoints the retention pass of this registration deleted, newest first."""
    new: bool
    """False when this (path, step, wall_time) was already registered (a retry)."""


@dataclass(frozen=True, slots=True)
class CheckpointFilter:
    """What ``GET /api/v1/runs/{id}/checkpoints`` may filter on."""

    label: str | None = None
    include_deleted: bool = False
    limit: int = 100


def register_checkpoint(
    conn: Connection,
    run_id: int,
    *,
    step: int,
    path: str,
    size_bytes: int,
    wall_time: float,
    reason: str,
    command_id: int | None,
    keep: int | None,
    window: Window,
    now: float,
) -> Registered:
    """Store a checkpoint (idempotent on its path, step and wall time), then apply retention."""
    if command_id is not None and command_run(conn, command_id) != run_id:
        raise InvalidInput(f"command {command_id} is not a command of run {run_id}")
    key = path_key(path)
    same = (
        checkpoints.c.run_id == run_id,
        checkpoints.c.path_key == key,
        checkpoints.c.step == step,
        checkpoints.c.wall_time == wall_time,
    )
    existing = conn.execute(select(checkpoints.c.id).where(*same)).scalar_one_or_none()
    new = existing is None
    if new:  # (a retry inserts nothing: on PostgreSQL even a refused insert spends an id)
        # "Or ignore": a retry racing the first attempt finds its row instead of failing.
        new = insert_or_ignore(
            conn,
            checkpoints,
            {
                "run_id": run_id,
                "step": step,
                "path": path,
                "path_key": key,
                "size_bytes": size_bytes,
                "wall_time": wall_time,
                "reason": reason,
                "command_id": command_id,
                "created_at": now,
            },
        )
        existing = conn.execute(select(checkpoints.c.id).where(*same)).scalar_one()
    if new:
        # The file at this path was overwritten: its older records describe nothing any more.
        # After the insert, and never this record: a racing retry must not delete its own row.
        conn.execute(
            update(checkpoints)
            .where(
                checkpoints.c.run_id == run_id,
                checkpoints.c.path_key == key,
                checkpoints.c.id != existing,
                checkpoints.c.deleted_at.is_(None),
            )
            .values(deleted_at=now)
        )
    if keep is not None:
        _apply_retention(conn, run_id, keep, window, by=existing, now=now)
    pruned = _query(conn, run_id, window, where=[checkpoints.c.pruned_by == existing])
    live_paths = set(
        conn.execute(
            select(checkpoints.c.path).where(
                checkpoints.c.run_id == run_id, checkpoints.c.deleted_at.is_(None)
            )
        ).scalars()
    )
    (record,) = _query(conn, run_id, window, where=[checkpoints.c.id == existing])
    # Never ask the agent to delete a file a live checkpoint has since been saved to.
    return Registered(record, [p for p in pruned if p.path not in live_paths], new)


def list_checkpoints(
    conn: Connection, run_id: int, where: CheckpointFilter, window: Window
) -> list[CheckpointRecord]:
    """Checkpoints of the run with their labels, newest (highest id) first."""
    conditions = [] if where.include_deleted else [checkpoints.c.deleted_at.is_(None)]
    return _query(conn, run_id, window, where=conditions, label=where.label, limit=where.limit)


def last_good(conn: Connection, run_id: int, window: Window) -> CheckpointRecord | None:
    """The most recently registered good checkpoint that is not deleted; None if none is."""
    found = list_checkpoints(conn, run_id, CheckpointFilter(label="good", limit=1), window)
    return found[0] if found else None


def resolve_rollback(
    conn: Connection, run_id: int, args: dict[str, Any], window: Window
) -> dict[str, Any]:
    """Rollback ``args`` as the agent needs them: the checkpoint's id, path and step.

    ``args["checkpoint"]`` is ``"last_good"`` or a checkpoint id; :class:`Conflict` when
    there is no good checkpoint, or the id is unknown, another run's or deleted. An id
    names the checkpoint whatever its label: an operator may knowingly pick a suspect one.
    """
    target = args.get("checkpoint", "last_good")
    if target == "last_good":
        found = last_good(conn, run_id, window)
        if found is None:
            raise Conflict(f"run {run_id} has no good checkpoint to roll back to")
    elif type(target) is int:
        matches = _query(conn, run_id, window, where=[checkpoints.c.id == target])
        if not matches:
            raise Conflict(f"checkpoint {target} is not a checkpoint of run {run_id}")
        found = matches[0]
        if found.deleted_at is not None:
            raise Conflict(
                f"checkpoint {target} of run {run_id} was deleted (retention or an overwrite)"
            )
    else:
        raise InvalidInput(f"checkpoint must be 'last_good' or a checkpoint id, not {target!r}")
    return {
        "checkpoint": found.id,
        "path": found.path,
        "step": found.step,
        "skip_batches": args.get("skip_batches", 0),
        "lr_factor": args.get("lr_factor", DEFAULT_LR_FACTOR),
        "lr_steps": args.get("lr_steps", DEFAULT_LR_STEPS),
    }


def path_key(path: str) -> str:
    """The digest that stands for ``path`` in the unique key."""
    return hashlib.sha256(path.encode()).hexdigest()


def _apply_retention(
    conn: Connection, run_id: int, keep: int, window: Window, *, by: int, now: float
) -> None:
    """Mark what the retention policy drops as deleted by registration ``by``."""
    live = _query(conn, run_id, window, where=[checkpoints.c.deleted_at.is_(None)])
    if not live:
        return
    good = [c for c in live if c.label == "good"]
    kept = {live[0].id} | {c.id for c in good[:keep]} | _pinned(conn, run_id, now)
    newest_good = good[0].id if good else None
    drop = [
        c.id
        for c in live
        if c.id not in kept
        and (
            c.label == "good"
            or (c.label == "suspect" and newest_good is not None and c.id < newest_good)
        )
    ]
    if drop:
        conn.execute(
            update(checkpoints)
            .where(checkpoints.c.id.in_(drop), checkpoints.c.deleted_at.is_(None))
            .values(deleted_at=now, pruned_by=by)
        )


def _pinned(conn: Connection, run_id: int, now: float) -> set[int]:
    """Checkpoints named by the run's pending or delivered rollbacks that have not expired."""
    rows = conn.execute(
        select(commands.c.args).where(
            commands.c.run_id == run_id,
            commands.c.type == "rollback",
            commands.c.state.in_(OPEN_STATES),
            commands.c.expires_at > now,
        )
    ).scalars()
    return {args["checkpoint"] for args in rows if type(args.get("checkpoint")) is int}


def _query(
    conn: Connection,
    run_id: int,
    window: Window,
    *,
    where: list[Any],
    label: str | None = None,
    limit: int | None = None,
) -> list[CheckpointRecord]:
    run = get_run(conn, run_id)
    pace = None
    if run.state == "running":
        pace = conn.execute(
            select(series.c.id)
            .where(series.c.run_id == run_id, series.c.rank == 0)
            .order_by(series.c.n_points.desc(), series.c.id)
            .limit(1)
        ).scalar_one_or_none()
    inner = _labelled(run_id, window, running=run.state == "running", pace=pace)
    inner = inner.where(*where).subquery()
    query = select(inner)
    if label == "suspect":
        query = query.where(inner.c.suspect_id.is_not(None))
    elif label in ("good", "unverified"):
        query = query.where(
            inner.c.suspect_id.is_(None), inner.c.reached if label == "good" else ~inner.c.reached
        )
    elif label is not None:
        raise InvalidInput(f"label must be one of {', '.join(LABELS)}, not {label!r}")
    rows = conn.execute(query.order_by(inner.c.id.desc()).limit(limit)).all()
    ids = [r.suspect_id for r in rows if r.suspect_id is not None]
    found = {
        a.id: a
        for a in conn.execute(
            select(anomalies.c.id, anomalies.c.kind, anomalies.c.step).where(
                anomalies.c.id.in_(ids)
            )
        )
    }
    return [_record(r, found, window, run.state) for r in rows]


def _labelled(run_id: int, window: Window, *, running: bool, pace: int | None) -> Select[Any]:
    """The run's checkpoints with ``suspect_id`` (the first anomaly that makes each one
    suspect, or NULL) and ``reached`` (whether the run went ``after`` steps past it:
    always once it has ended; else judged by the points of series ``pace``)."""
    c, a = checkpoints, anomalies
    suspect_id = (
        select(a.c.id)
        .where(
            a.c.run_id == run_id,
            a.c.kind.in_(SUSPECT_KINDS),
            a.c.step >= c.c.step - window.before,
            a.c.step <= c.c.step + window.after,
            # Seen before the save at a later step: on a branch a rollback abandoned.
            or_(a.c.step <= c.c.step, a.c.wall_time >= c.c.wall_time),
        )
        .order_by(a.c.id)
        .limit(1)
        .correlate(c)
        .scalar_subquery()
    )
    reached: Any = true()
    if running:
        reached = exists(
            select(points.c.step)
            .where(
                points.c.series_id == pace,
                points.c.step >= c.c.step + window.after,
                points.c.wall_time >= c.c.wall_time,
            )
            .correlate(c)
        )
    return select(c, suspect_id.label("suspect_id"), reached.label("reached")).where(
        c.c.run_id == run_id
    )


def _record(row: Any, found: dict[int, Any], window: Window, state: str) -> CheckpointRecord:
    lo, hi = max(0, row.step - window.before), row.step + window.after
    if row.suspect_id is not None:
        a = found[row.suspect_id]
        label, detail = "suspect", f"{a.kind} at step {a.step} (anomaly {a.id})"
    elif row.reached:
        label = "good"
        detail = f"no training-signal anomaly in steps {lo}-{hi}"
        if state != "running":
            detail += f" (the run is {state})"
    else:
        label = "unverified"
        detail = f"the run has not reached step {hi} since this checkpoint was saved"
    return CheckpointRecord(
        id=row.id,
        run_id=row.run_id,
        step=row.step,
        path=row.path,
        size_bytes=row.size_bytes,
        wall_time=row.wall_time,
        reason=row.reason,
        command=row.command_id,
        label=label,
        label_detail=detail,
        created_at=row.created_at,
        deleted_at=row.deleted_at,
    )
