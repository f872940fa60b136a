"""Who is calling, and what they may touch.

With at least one live key in the database every request needs a key
(``Authorization: Bearer rw_...``) carrying the endpoint's scope, and sees only
its own project; a run of another project answers 404, as if it did not exist.
With no keys the server is open, which the CLI only allows on loopback; the
check is repeated per request so that revoking the last key of a server bound
to a public address closes it rather than opening it.
"""

from __future__ import annotations

from dataclasses import dataclass

from runwatch.collector.errors import Forbidden, NotFound, Unauthorized
from runwatch.collector.storage.keys import KeyInfo, any_active_key, lookup_key
from runwatch.collector.storage.runs import run_project_id
from runwatch.collector.storage.store import Store


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller: a key, or nobody in particular on an open loopback server."""

    key: KeyInfo | None

    @property
    def project_id(self) -> int | None:
        """The only project this caller may see; None on an open server (all of them)."""
        return None if self.key is None else self.key.project_id

    def check_run(self, store: Store, run_id: int) -> None:
        """:class:`NotFound` unless the run exists and lies in the caller's project."""
        project_id = store.run_project(run_id)
        if project_id is None:
            with store.read() as conn:
                project_id = run_project_id(conn, run_id)
            if project_id is None:
                raise NotFound(f"unknown run {run_id}")
            store.remember_run_project(run_id, project_id)
        if self.key is not None and project_id != self.key.project_id:
            raise NotFound(f"unknown run {run_id}")


def authenticate(
    store: Store, authorization: str | None, scope: str, *, loopback: bool
) -> Principal:
    """Resolve the Authorization header into a :class:`Principal` allowed ``scope``."""
    with store.read() as conn:
        if authorization is None:
            if not loopback or any_active_key(conn):
                raise Unauthorized(
                    "this server requires an API key: send 'Authorization: Bearer <key>'"
                    if loopback
                    else "no API keys are configured and the server is not on loopback: "
                    "create one with 'runwatch keys create'"
                )
            return Principal(key=None)
        kind, _, secret = authorization.partition(" ")
        if kind.lower() != "bearer" or not secret.strip():
            raise Unauthorized("malformed Authorization header: expected 'Bearer <key>'")
        key = lookup_key(conn, secret.strip())
        if key is None:
            if loopback and not any_active_key(conn):
                return Principal(key=None)
            raise Unauthorized("unknown or revoked API key")
    if not key.allows(scope):
        raise Forbidden(
            f"this key has scope(s) {', '.join(sorted(key.scopes))}; the request needs {scope!r}"
        )
    return Principal(key=key)
