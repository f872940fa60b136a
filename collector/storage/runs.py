"""Runs: create or resume by (project, name), read, list with filters, finish."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import Connection, and_, select, update

from runwatch.collector.errors import InvalidInput, NotFound
from runwatch.collector.storage.projects import get_or_create_project
from runwatch.collector.storage.sql import insert_or_ignore
from runwatch.collector.storage.tables import projects, run_tags, runs
from runwatch.wire import generated_run_name

RUN_STATES = ("running", "finished", "failed", "crashed")
"""``running`` until the agent says otherwise; ``crashed`` is for a trainer that died."""
FINAL_STATES = RUN_STATES[1:]
MAX_TAG_LENGTH = 128
MAX_TAGS = 64


@dataclass(frozen=True, slots=True)
class RunRecord:
    id: int
    project: str
    project_id: int
    name: str
    state: str
    tags: tuple[str, ...]
    config: dict[str, Any]
    created_at: float
    updated_at: float
    heartbeat_at: float | None
    finished_at: float | None
    world_size: int | None = None


@dataclass(frozen=True, slots=True)
class RunFilter:
    """What ``GET /api/v1/runs`` may filter on; None means any."""

    project_id: int | None = None
    name: str | None = None
    state: str | None = None
    tag: str | None = None
    limit: int = 100
    offset: int = 0


def check_run_name(name: str) -> str:
    if not 1 <= len(name) <= 256 or not name.isprintable():
        raise InvalidInput("run name must be 1-256 printable characters")
    return name


def check_tags(tags: list[str]) -> list[str]:
    if len(tags) > MAX_TAGS:
        raise InvalidInput(f"at most {MAX_TAGS} tags per run, got {len(tags)}")
    for tag in tags:
        if not 1 <= len(tag) <= MAX_TAG_LENGTH or not tag.isprintable():
            raise InvalidInput(f"tag {tag[:64]!r}: must be 1-{MAX_TAG_LENGTH} printable characters")
    return sorted(set(tags))


def create_or_resume(
    conn: Connection,
    project: str,
    name: str | None,
    *,
    config: dict[str, Any] | None = None,
    tags: list[str] | None = None,
    world_size: int | None = None,
) -> tuple[RunRecord, bool]:
    """Create run ``name`` in ``project``, or resume it; returns ``(run, resumed)``.

    Resuming sets the state back to ``running``, merges ``config`` into the
    stored one (new values win), adds ``tags`` and takes ``world_size`` when given
    (a restarted job may run on fewer or more processes). Two ranks creating the same
    run at once both get the same id.
    """
    project_id = get_or_create_project(conn, project)
    name = check_run_name(name) if name is not None else generated_run_name()
    clean_tags = check_tags(tags or [])
    now = time.time()
    created = insert_or_ignore(
        conn,
        runs,
        {
            "project_id": project_id,
            "name": name,
            "state": "running",
            "config": _config_json(config or {}),
            "world_size": world_size,
            "created_at": now,
            "updated_at": now,
        },
    )
    run_id, stored_config = conn.execute(
        select(runs.c.id, runs.c.config).where(
            and_(runs.c.project_id == project_id, runs.c.name == name)
        )
    ).one()
    if not created:
        merged = orjson.loads(stored_config) | (config or {})
        conn.execute(
            update(runs)
            .where(runs.c.id == run_id)
            .values(
                state="running",
                finished_at=None,
                updated_at=now,
                config=_config_json(merged),
                **({} if world_size is None else {"world_size": world_size}),
            )
        )
    for tag in clean_tags:
        insert_or_ignore(conn, run_tags, {"run_id": run_id, "tag": tag})
    return get_run(conn, run_id), not created


def finish_run(conn: Connection, run_id: int, state: str) -> RunRecord:
    """Mark a run as ended in ``state`` (one of :data:`FINAL_STATES`)."""
    if state not in FINAL_STATES:
        raise InvalidInput(f"state must be one of {', '.join(FINAL_STATES)}, not {state!r}")
    now = time.time()
    result = conn.execute(
        update(runs).where(runs.c.id == run_id).values(state=state, finished_at=now, updated_at=now)
    )
    if result.rowcount != 1:
        raise NotFound(f"unknown run {run_id}")
    return get_run(conn, run_id)


def get_run(conn: Connection, run_id: int, *, project_id: int | None = None) -> RunRecord:
    """The run with ``run_id``; :class:`NotFound` if absent or outside ``project_id``."""
    query = _run_query().where(runs.c.id == run_id)
    if project_id is not None:
        query = query.where(runs.c.project_id == project_id)
    row = conn.execute(query).one_or_none()
    if row is None:
        raise NotFound(f"unknown run {run_id}")
    return _record(row, _tags_of(conn, [run_id]).get(run_id, ()))


def list_runs(conn: Connection, where: RunFilter) -> list[RunRecord]:
    """Runs matching ``where``, newest first."""
    query = _run_query()
    if where.project_id is not None:
        query = query.where(runs.c.project_id == where.project_id)
    if where.name is not None:
        query = query.where(runs.c.name == where.name)
    if where.state is not None:
        query = query.where(runs.c.state == where.state)
    if where.tag is not None:
        query = query.where(
            runs.c.id.in_(select(run_tags.c.run_id).where(run_tags.c.tag == where.tag))
        )
    query = query.order_by(runs.c.created_at.desc(), runs.c.id.desc())
    rows = conn.execute(query.limit(where.limit).offset(where.offset)).all()
    tags = _tags_of(conn, [r.id for r in rows])
    return [_record(r, tags.get(r.id, ())) for r in rows]


def run_project_id(conn: Connection, run_id: int) -> int | None:
    """Project id of the run, None when the run does not exist."""
    return conn.execute(select(runs.c.project_id).where(runs.c.id == run_id)).scalar_one_or_none()


def _run_query():  # type: ignore[no-untyped-def]
    return select(runs, projects.c.name.label("project_name")).join(
        projects, projects.c.id == runs.c.project_id
    )


def _tags_of(conn: Connection, run_ids: list[int]) -> dict[int, tuple[str, ...]]:
    if not run_ids:
        return {}
    found: dict[int, list[str]] = {}
    rows = conn.execute(
        select(run_tags.c.run_id, run_tags.c.tag)
        .where(run_tags.c.run_id.in_(run_ids))
        .order_by(run_tags.c.tag)
    )
    for run_id, tag in rows:
        found.setdefault(run_id, []).append(tag)
    return {k: tuple(v) for k, v in found.items()}


def _record(row: Any, tags: tuple[str, ...]) -> RunRecord:
    return RunRecord(
        id=row.id,
        project=row.project_name,
        project_id=row.project_id,
        name=row.name,
        state=row.state,
        tags=tags,
        config=orjson.loads(row.config),
        created_at=row.created_at,
        updated_at=row.updated_at,
        heartbeat_at=row.heartbeat_at,
        finished_at=row.finished_at,
        world_size=row.world_size,
    )


def _config_json(config: dict[str, Any]) -> str:
    try:
        return orjson.dumps(config).decode()
    except orjson.JSONEncodeError as exc:
        raise InvalidInput(f"config cannot be stored as JSON: {exc}") from None
