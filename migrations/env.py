"""Alembic environment: the target is runwatch's own metadata, the connection is passed in.

``runwatch.collector.storage.migrate`` hands over an open connection in
``config.attributes["connection"]``; the ``alembic`` command line (developers
making a new revision, see alembic.ini) gets one from ``sqlalchemy.url``.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

import runwatch.collector.storage.tables  # noqa: F401  (registers the tables)
from runwatch.db import make_engine, metadata

config = context.config


def run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=metadata)
    with context.begin_transaction():
        context.run_migrations()
elif (conn := config.attributes.get("connection")) is not None:
    run(conn)
else:
    engine = make_engine(config.get_main_option("sqlalchemy.url") or "")
    with engine.begin() as connection:
        run(connection)
    engine.dispose()
