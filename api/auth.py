"""Who is calling, and what they may touch.

With at least one live key in the database every request needs a key
(``Authorization: Bearer rw_...``) carrying the endpoint's scope, and sees only
its own project; a run of another project answers 404, as if it did not exist.
With no keys the server is open, which the CLI only allows on loopback; the
check is repeated per request so that revoking the last key of a server bound
to a public address closes it rather than opening it.

What the database says about a key is remembered for ``key_cache_seconds``
(:class:`KeyCache`), so that ingest does not read the keys table per batch; a
revoked key therefore keeps working for at most that long.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from runwatch.collector.errors import Forbidden, NotFound, Unauthorized
from runwatch.collector.storage.keys import KeyInfo, any_active_key, digest, lookup_key
from runwatch.collector.storage.runs import run_project_id
from runwatch.collector.storage.store import Store

MAX_CACHED_KEYS = 10_000


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller: a key, or nobody in particular on an open loopback server."""

    key: KeyInfo | None

    @property
    def project_id(self) -> int | None:
        """The only project this caller may see; None on an open server (all of them)."""
        return None if self.key is None else self.key.project_id

    @property
    def source(self) -> str:
        """The caller as the audit log names it: ``api:<key prefix>``, or ``api:open``."""
        return "api:open" if self.key is None else f"api:{self.key.prefix}"

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


@dataclass(frozen=True, slots=True)
class KeyState:
    """What the database says about one presented secret (or about none)."""

    any_active: bool
    key: KeyInfo | None


def bearer_secret(authorization: str | None) -> str | None:
    """The secret of an ``Authorization: Bearer`` header; :class:`Unauthorized` if malformed."""
    if authorization is None:
        return None
    kind, _, secret = authorization.partition(" ")
    if kind.lower() != "bearer" or not secret.strip():
        raise Unauthorized("malformed Authorization header: expected 'Bearer <key>'")
    return secret.strip()


def lookup_state(store: Store, secret: str | None) -> KeyState:
    """Read the keys table for ``secret``."""
    with store.read() as conn:
        key = None if secret is None else lookup_key(conn, secret)
        return KeyState(any_active=key is not None or any_active_key(conn), key=key)


def authorize(state: KeyState, secret: str | None, scope: str, *, loopback: bool) -> Principal:
    """Decide, from what the database said, whether the caller may use ``scope``."""
    if state.key is None:
        if loopback and not state.any_active:
            return Principal(key=None)
        if secret is not None:
            raise Unauthorized("unknown or revoked API key")
        raise Unauthorized(
            "this server requires an API key: send 'Authorization: Bearer <key>'"
            if loopback
            else "no API keys are configured and the server is not on loopback: "
            "create one with 'runwatch keys create'"
        )
    if not state.key.allows(scope):
        raise Forbidden(
            f"this key has scope(s) {', '.join(sorted(state.key.scopes))}; "
            f"the request needs {scope!r}"
        )
    return Principal(key=state.key)


class KeyCache:
    """:class:`KeyState` per presented secret for ``ttl`` seconds (0: no caching).

    Entries are keyed by the secret's digest, never the secret itself. The cache
    is cleared when full rather than managed: it only ever saves a lookup.
    """

    def __init__(self, ttl: float, max_entries: int = MAX_CACHED_KEYS) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, KeyState]] = {}
        self._lock = threading.Lock()

    def get(self, secret: str | None, now: float) -> KeyState | None:
        if self.ttl <= 0:
            return None
        entry = self._entries.get(_slot(secret))
        if entry is None or entry[0] <= now:
            return None
        return entry[1]

    def put(self, secret: str | None, state: KeyState, now: float) -> None:
        """Remember ``state``; unknown secrets are not kept, so random keys cannot flush it."""
        if self.ttl <= 0 or (secret is not None and state.key is None):
            return
        with self._lock:
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
            self._entries[_slot(secret)] = (now + self.ttl, state)


def _slot(secret: str | None) -> str:
    return "" if secret is None else digest(secret)
