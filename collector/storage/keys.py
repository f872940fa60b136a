"""API keys: random secrets shown once, stored as SHA-256 digests, bound to one project.

A key is 32 random bytes, so a fast digest is enough: there is nothing to
brute-force that a slow password hash would protect.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

from sqlalchemy import Connection, select, update

from runwatch.collector.errors import InvalidInput, NotFound
from runwatch.collector.storage.projects import find_project, get_or_create_project
from runwatch.collector.storage.tables import api_keys, projects

SCOPES = ("ingest", "read", "operate", "admin")
"""``ingest``: create runs and send points; ``read``: query; ``operate``: issue
commands; ``admin``: everything in its project."""
KEY_PREFIX = "rw_"


@dataclass(frozen=True, slots=True)
class KeyInfo:
    id: int
    project: str
    project_id: int
    name: str
    prefix: str
    scopes: frozenset[str]
    created_at: float
    revoked_at: float | None

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes


def check_scopes(scopes: list[str]) -> frozenset[str]:
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown:
        raise InvalidInput(
            f"unknown scope(s) {', '.join(unknown)}; choose from {', '.join(SCOPES)}"
        )
    if not scopes:
        raise InvalidInput(f"give at least one scope: {', '.join(SCOPES)}")
    return frozenset(scopes)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(
    conn: Connection, project: str, scopes: list[str], name: str = ""
) -> tuple[str, KeyInfo]:
    """Create a key; returns the secret (never stored) and the key's record."""
    granted = check_scopes(scopes)
    if len(name) > 128:
        raise InvalidInput("key name must be at most 128 characters")
    project_id = get_or_create_project(conn, project)
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    key_id = conn.execute(
        api_keys.insert()
        .values(
            project_id=project_id,
            name=name,
            prefix=secret[:11],
            key_hash=digest(secret),
            scopes=" ".join(s for s in SCOPES if s in granted),
            created_at=time.time(),
        )
        .returning(api_keys.c.id)
    ).scalar_one()
    return secret, _one(conn, api_keys.c.id == key_id)


def lookup_key(conn: Connection, secret: str) -> KeyInfo | None:
    """The live key whose secret this is, or None."""
    found = _select(conn, api_keys.c.key_hash == digest(secret))
    return found[0] if found and found[0].revoked_at is None else None


def any_active_key(conn: Connection) -> bool:
    """True when at least one unrevoked key exists (the server is then closed)."""
    row = conn.execute(select(api_keys.c.id).where(api_keys.c.revoked_at.is_(None)).limit(1))
    return row.first() is not None


def list_keys(conn: Connection, project: str | None = None) -> list[KeyInfo]:
    if project is None:
        return _select(conn, None)
    project_id = find_project(conn, project)
    return [] if project_id is None else _select(conn, api_keys.c.project_id == project_id)


def revoke_key(conn: Connection, key_id: int) -> KeyInfo:
    result = conn.execute(
        update(api_keys)
        .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
        .values(revoked_at=time.time())
    )
    if result.rowcount != 1 and not _select(conn, api_keys.c.id == key_id):
        raise NotFound(f"unknown key {key_id}")
    return _one(conn, api_keys.c.id == key_id)


def _one(conn: Connection, where: object) -> KeyInfo:
    return _select(conn, where)[0]


def _select(conn: Connection, where: object) -> list[KeyInfo]:
    query = select(api_keys, projects.c.name.label("project_name")).join(
        projects, projects.c.id == api_keys.c.project_id
    )
    if where is not None:
        query = query.where(where)  # type: ignore[arg-type]
    return [
        KeyInfo(
            id=r.id,
            project=r.project_name,
            project_id=r.project_id,
            name=r.name,
            prefix=r.prefix,
            scopes=frozenset(r.scopes.split()),
            created_at=r.created_at,
            revoked_at=r.revoked_at,
        )
        for r in conn.execute(query.order_by(api_keys.c.id))
    ]
