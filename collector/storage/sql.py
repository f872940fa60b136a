"""Small SQL helpers whose spelling differs between SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Connection, Table, literal_column
from sqlalchemy.dialects import postgresql, sqlite


def insert_or_ignore(conn: Connection, table: Table, values: dict[str, Any]) -> bool:
    """Insert one row unless it collides with a unique key; True when it was inserted.

    ``RETURNING`` tells the two cases apart on both databases; ``rowcount`` does
    not (psycopg reports -1 for an INSERT ... ON CONFLICT DO NOTHING here).
    """
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    stmt = dialect.insert(table).values(**values).on_conflict_do_nothing()
    return conn.execute(stmt.returning(literal_column("1"))).first() is not None


IN_CHUNK = 500
"""Values per ``IN (...)``: well under SQLite's and PostgreSQL's parameter limits."""


def chunks(values: Sequence[Any]) -> Iterable[Sequence[Any]]:
    """``values`` in slices of at most :data:`IN_CHUNK`."""
    for i in range(0, len(values), IN_CHUNK):
        yield values[i : i + IN_CHUNK]
