"""Projects: the unit API keys are bound to. Created on first use."""

from __future__ import annotations

import re
import time

from sqlalchemy import Connection, select

from runwatch.collector.errors import InvalidInput
from runwatch.collector.storage.sql import insert_or_ignore
from runwatch.collector.storage.tables import projects

PROJECT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_project_name(name: str) -> str:
    """Return ``name`` if it is a valid project name, else raise :class:`InvalidInput`."""
    if not PROJECT_NAME.fullmatch(name):
        raise InvalidInput(
            f"invalid project name {name[:64]!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def get_or_create_project(conn: Connection, name: str) -> int:
    """Id of project ``name``, creating it if needed (safe under concurrent creation)."""
    check_project_name(name)
    insert_or_ignore(conn, projects, {"name": name, "created_at": time.time()})
    return conn.execute(select(projects.c.id).where(projects.c.name == name)).scalar_one()


def find_project(conn: Connection, name: str) -> int | None:
    """Id of project ``name``, or None."""
    return conn.execute(select(projects.c.id).where(projects.c.name == name)).scalar_one_or_none()
