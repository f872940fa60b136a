"""API keys: who may call, what they may touch, and when the server may be exposed.

Keys are made with ``create_key`` on the running collector's own store (and
once through the CLI); the server checks them per request, so no restart is
needed between creating a key and using it.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from sqlalchemy import select

from runwatch import wire
from runwatch.api.auth import Principal, authorize, bearer_secret, lookup_state
from runwatch.api.deps import get_settings
from runwatch.cli import main as cli
from runwatch.collector.errors import Unauthorized
from runwatch.collector.server import RefusedToStart, check_exposure
from runwatch.collector.storage import migrate
from runwatch.collector.storage.keys import KEY_PREFIX, create_key, revoke_key
from runwatch.collector.storage.store import Store
from runwatch.collector.storage.tables import api_keys
from runwatch.db import make_engine
from runwatch.settings import Settings
from tests.api.replies import ok, refused
from tests.conftest import Collector, start_collector

INGEST = "/api/v1/ingest"
MISSING_RUN = 999_999
MISSING_COMMAND = 888_888
SCOPES = ("ingest", "read", "operate", "admin")
PROJECTS = ("alpha", "beta")

_seqs = itertools.count(1000)


# -- a server with two projects, each with a key of every scope --------------------
@dataclass
class World:
    """The collector, one run (with a command) per project, and a secret per (project, scope)."""

    collector: Collector
    runs: dict[str, int]
    commands: dict[str, int]
    keys: dict[tuple[str, str], str] = field(default_factory=dict)
    key_ids: dict[tuple[str, str], int] = field(default_factory=dict)

    def http(self, project: str | None = None, scope: str = "admin") -> httpx.Client:
        """A client sending the key of ``project`` with ``scope``; no header when None."""
        secret = None if project is None else self.keys[project, scope]
        headers = {} if secret is None else {"Authorization": f"Bearer {secret}"}
        return httpx.Client(base_url=self.collector.url, headers=headers, timeout=30)

    def view(self, project: str) -> dict[str, Any]:
        """What ``project``'s admin key sees of its project: runs, series, points."""
        with self.http(project) as http:
            run = self.runs[project]
            return {
                "runs": ok(http.get("/api/v1/runs")),
                "run": ok(http.get(f"/api/v1/runs/{run}")),
                "series": ok(http.get(f"/api/v1/runs/{run}/series")),
                "points": ok(http.get(f"/api/v1/runs/{run}/metrics", params={"key": "loss"})),
                "commands": ok(http.get(f"/api/v1/runs/{run}/commands")),
            }


def add_key(collector: Collector, project: str, scopes: list[str]) -> tuple[str, int]:
    with collector.store.write() as conn:
        secret, info = create_key(conn, project, scopes, name=f"{project}-{'+'.join(scopes)}")
    return secret, info.id


def revoke(collector: Collector, key_id: int) -> None:
    with collector.store.write() as conn:
        revoke_key(conn, key_id)


@pytest.fixture
def collector(db_url: str) -> Iterator[Collector]:
    """Key lookups uncached, so that every key change shows at once (the cache has its test)."""
    yield from start_collector(db_url, key_cache_seconds=0)


@pytest.fixture
def world(collector: Collector) -> World:
    """Runs in alpha and beta seeded while the server is open, then keys for both."""
    runs, commands = {}, {}
    with collector.client() as client:
        for project in PROJECTS:
            run = client.create_run(project, f"{project}-run", tags=["shared-tag"])["id"]
            client.ingest(run, [(s, 1000.0 + s, "loss", 1.0 / (s + 1)) for s in range(5)], seq=0)
            client.ingest(run, [(0, 1000.0, "grad_norm", math.nan)], seq=0, rank=1)
            runs[project] = run
            commands[project] = client.issue_command(run, "checkpoint", reason="seed")["id"]
    found = World(collector, runs, commands)
    for project in PROJECTS:
        for scope in SCOPES:
            found.keys[project, scope], found.key_ids[project, scope] = add_key(
                collector, project, [scope]
            )
    return found


# -- the endpoints, as requests a key of some project makes against some run --------
@dataclass(frozen=True)
class Call:
    """One API request and the scope it needs; ``batch_for`` makes it an ingest into that run.

    ``missing``: the 404 detail when its run (or command) is absent or another project's.
    """

    name: str
    scope: str
    method: str
    path: str
    missing: str
    params: dict[str, Any] = field(default_factory=dict)
    json: Any = None
    batch_for: int | None = None
    status: int = 200

    def send(self, http: httpx.Client) -> httpx.Response:
        if self.batch_for is not None:
            body = wire.encode_batch(self.batch_for, 0, next(_seqs), [(99, 2000.0, "loss", 0.5)])
            return http.post(self.path, content=body, headers={"Content-Type": wire.MSGPACK})
        return http.request(self.method, self.path, params=self.params, json=self.json)


def calls_on(run: int, project: str, command: int = MISSING_COMMAND) -> list[Call]:
    """Every API endpoint, aimed at ``run`` in ``project`` (and ``command``, one of its own)."""
    no_run, no_command = f"unknown run {run}", f"unknown command {command}"
    ack = {"run": run, "rank": 0, "status": "applied", "detail": "", "step": 7}
    return [
        Call("ingest", "ingest", "POST", INGEST, no_run, batch_for=run),
        Call("list", "read", "GET", "/api/v1/runs", no_run, params={"project": project}),
        Call("get", "read", "GET", f"/api/v1/runs/{run}", no_run),
        Call("series", "read", "GET", f"/api/v1/runs/{run}/series", no_run),
        Call("latest", "read", "GET", f"/api/v1/runs/{run}/latest", no_run),
        Call("metrics", "read", "GET", f"/api/v1/runs/{run}/metrics", no_run, {"key": "loss"}),
        Call("anomalies", "read", "GET", f"/api/v1/runs/{run}/anomalies", no_run),
        Call("commands", "read", "GET", f"/api/v1/runs/{run}/commands", no_run),
        Call("alerts", "read", "GET", "/api/v1/alerts", no_run, {"run": run}),
        Call(
            "raise",
            "ingest",
            "POST",
            "/api/v1/alerts",
            no_run,
            json={"run": run, "kind": "manual"},
            status=201,
        ),
        Call(
            "pending", "ingest", "GET", f"/api/v1/runs/{run}/commands/pending", no_run, {"rank": 1}
        ),
        Call(
            "issue",
            "operate",
            "POST",
            f"/api/v1/runs/{run}/commands",
            no_run,
            json={"type": "skip_step", "args": {}},
            status=201,
        ),
        # Cancel before the ack: rank 0's ack ends the command, which then cannot be cancelled.
        Call("cancel", "operate", "POST", f"/api/v1/commands/{command}/cancel", no_command),
        Call("ack", "ingest", "POST", f"/api/v1/commands/{command}/ack", no_command, json=ack),
        Call(
            "create",
            "ingest",
            "POST",
            "/api/v1/runs",
            no_run,
            json={"project": project, "name": "new"},
        ),
        Call(
            "finish",
            "ingest",
            "POST",
            f"/api/v1/runs/{run}/finish",
            no_run,
            json={"state": "failed"},
        ),
    ]


# -- open mode ---------------------------------------------------------------------
def test_open_loopback_server_without_keys_needs_no_header(collector: Collector) -> None:
    assert collector.thread.settings.is_loopback
    http = collector.http
    run = ok(http.post("/api/v1/runs", json={"project": "alpha", "name": "r"}))["id"]
    command = ok(http.post(f"/api/v1/runs/{run}/commands", json={"type": "stop"}), 201)["id"]
    for call in calls_on(run, "alpha", command):
        ok(call.send(http), call.status)
    assert sorted(r["id"] for r in ok(http.get("/api/v1/runs"))) == [run, run + 1]


# -- no key, bad keys --------------------------------------------------------------
def test_once_a_key_exists_every_api_request_without_one_is_401(world: World) -> None:
    before = {p: world.view(p) for p in PROJECTS}
    with world.http() as anonymous:
        for project, run in world.runs.items():
            for call in calls_on(run, project, world.commands[project]):
                reply = call.send(anonymous)
                refused(reply, 401, "unauthorized", "this server requires an API key")
                assert reply.headers["www-authenticate"] == "Bearer"
        # Probes and the collector's own metrics stay open to monitoring.
        for path in ("/healthz", "/readyz", "/metrics"):
            assert anonymous.get(path).status_code == 200
    assert {p: world.view(p) for p in PROJECTS} == before


# fmt: off
BAD_HEADERS = [
    # another scheme
    pytest.param("Token {key}", "malformed Authorization header: expected 'Bearer <key>'", id="scheme-token"),  # noqa: E501
    # HTTP basic auth
    pytest.param("Basic dXNlcjpwYXNz", "malformed Authorization header", id="scheme-basic"),
    # the key without a scheme
    pytest.param("{key}", "malformed Authorization header", id="no-scheme"),
    # the scheme without a key
    pytest.param("Bearer", "malformed Authorization header", id="no-key"),
    # a key nobody issued
    pytest.param("Bearer rw_" + "A" * 43, "unknown or revoked API key", id="unknown-key"),
    # a real key with one character more
    pytest.param("Bearer {key}x", "unknown or revoked API key", id="key-plus-one-char"),
    # a real key cut to its shown prefix
    pytest.param("Bearer {prefix}", "unknown or revoked API key", id="key-prefix-only"),
]
# fmt: on


@pytest.mark.parametrize(("header", "fragment"), BAD_HEADERS)
def test_malformed_or_unknown_key_is_401_everywhere(
    world: World, header: str, fragment: str
) -> None:
    key = world.keys["alpha", "admin"]
    header = header.format(key=key, prefix=key[:11])
    before = {p: world.view(p) for p in PROJECTS}
    with httpx.Client(base_url=world.collector.url, headers={"Authorization": header}) as http:
        for project, run in world.runs.items():
            for call in calls_on(run, project, world.commands[project]):
                reply = call.send(http)
                refused(reply, 401, "unauthorized", fragment)
                assert reply.headers["www-authenticate"] == "Bearer"
    assert {p: world.view(p) for p in PROJECTS} == before


def test_the_scheme_is_case_insensitive(world: World) -> None:
    headers = {"Authorization": f"bearer {world.keys['alpha', 'read']}"}
    with httpx.Client(base_url=world.collector.url, headers=headers) as http:
        assert [r["id"] for r in ok(http.get("/api/v1/runs"))] == [world.runs["alpha"]]


def test_a_revoked_key_is_refused_at_once(world: World) -> None:
    run = world.runs["alpha"]
    with world.http("alpha", "read") as http:
        ok(http.get(f"/api/v1/runs/{run}"))
        revoke(world.collector, world.key_ids["alpha", "read"])
        refused(http.get(f"/api/v1/runs/{run}"), 401, "unauthorized", "unknown or revoked")
        refused(http.get("/api/v1/runs"), 401, "unauthorized", "unknown or revoked")
    with world.http("alpha", "admin") as http:
        ok(http.get(f"/api/v1/runs/{run}"))


# -- project isolation -------------------------------------------------------------
@pytest.mark.parametrize(("own", "other"), [("alpha", "beta"), ("beta", "alpha")])
def test_a_key_cannot_see_or_touch_another_project(world: World, own: str, other: str) -> None:
    theirs = world.runs[other]
    before = world.view(other)
    nowhere = {c.name: c for c in calls_on(MISSING_RUN, other)}
    for scope in ("read", "ingest", "operate", "admin"):
        with world.http(own, scope) as http:
            for call in calls_on(theirs, other, world.commands[other]):
                if scope != "admin" and call.scope != scope:
                    continue
                reply = call.send(http)
                if call.name in ("list", "create"):
                    # Naming the other project outright is refused, not answered empty.
                    refused(reply, 403, "forbidden", f"belongs to project {own!r}, not {other!r}")
                    continue
                # Another project's run answers exactly like a run that does not exist.
                refused(reply, 404, "not_found", call.missing)
                assert nowhere[call.name].send(http).json() == {
                    "error": "not_found",
                    "detail": nowhere[call.name].missing,
                }
            if scope in ("ingest", "operate"):
                continue
            # The other project's runs are in no listing this key can get.
            for params in ({"limit": 1000}, {"tag": "shared-tag"}, {"state": "running"}):
                listed = ok(http.get("/api/v1/runs", params=params))
                assert [(r["id"], r["project"]) for r in listed] == [(world.runs[own], own)]
    assert world.view(other) == before
    assert [(r["name"], r["state"]) for r in before["runs"]] == [(f"{other}-run", "running")]


# -- scopes ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("scope", "allowed"),
    [
        # read: queries only
        pytest.param("read", {"read"}, id="read"),
        # ingest: runs and points, no queries
        pytest.param("ingest", {"ingest"}, id="ingest"),
        # admin: everything in its project
        pytest.param("admin", {"read", "ingest", "operate"}, id="admin"),
        # operate: issue and cancel commands, nothing else
        pytest.param("operate", {"operate"}, id="operate"),
    ],
)
def test_scopes_decide_what_a_key_may_do(world: World, scope: str, allowed: set[str]) -> None:
    run = world.runs["alpha"]
    with world.http("alpha", scope) as http:
        for call in calls_on(run, "alpha", world.commands["alpha"]):
            reply = call.send(http)
            if call.scope in allowed:
                ok(reply, call.status)
            else:
                refused(
                    reply,
                    403,
                    "forbidden",
                    f"this key has scope(s) {scope}; the request needs {call.scope!r}",
                )
    state = world.view("alpha")["run"]["state"]
    assert state == ("failed" if "ingest" in allowed else "running")


# -- exposure ----------------------------------------------------------------------
@contextmanager
def store_of(db_url: str) -> Iterator[Store]:
    store = Store(make_engine(db_url))
    migrate.upgrade(store.engine)
    try:
        yield store
    finally:
        store.dispose()


@pytest.mark.parametrize(
    ("host", "keys", "open_server"),
    [
        # every interface, no keys: refused
        pytest.param("0.0.0.0", "none", None, id="any-no-keys"),
        # a routable address, no keys: refused
        pytest.param("192.0.2.10", "none", None, id="public-no-keys"),
        # every interface, only a revoked key: refused
        pytest.param("0.0.0.0", "revoked", None, id="any-revoked-key"),
        # every interface with a live key: allowed, closed
        pytest.param("0.0.0.0", "live", False, id="any-live-key"),
        # loopback without keys: allowed, open
        pytest.param("127.0.0.1", "none", True, id="loopback-no-keys"),
        # IPv6 loopback without keys: allowed, open
        pytest.param("::1", "none", True, id="ipv6-loopback-no-keys"),
        # loopback with a live key: allowed, closed
        pytest.param("127.0.0.1", "live", False, id="loopback-live-key"),
    ],
)
def test_check_exposure_refuses_an_unprotected_public_bind(
    db_url: str, host: str, keys: str, open_server: bool | None
) -> None:
    with store_of(db_url) as store, store.write() as conn:
        if keys != "none":
            _, info = create_key(conn, "alpha", ["admin"])
            if keys == "revoked":
                revoke_key(conn, info.id)
    settings = Settings(db=db_url, host=host, port=0)
    if open_server is None:
        with pytest.raises(RefusedToStart, match=f"refusing to bind {host}: no API keys"):
            check_exposure(settings)
    else:
        assert check_exposure(settings) is open_server


def authenticate(store: Store, header: str | None, scope: str, *, loopback: bool) -> Principal:
    """What the request dependency decides, without its cache."""
    secret = bearer_secret(header)
    return authorize(lookup_state(store, secret), secret, scope, loopback=loopback)


def test_authenticate_off_loopback_without_keys_rejects_every_request(db_url: str) -> None:
    with store_of(db_url) as store:
        for header in (None, "Bearer rw_" + "A" * 43):
            for scope in SCOPES:
                with pytest.raises(Unauthorized, match=r"not on loopback|unknown or revoked"):
                    authenticate(store, header, scope, loopback=False)
        with pytest.raises(Unauthorized, match="no API keys are configured"):
            authenticate(store, None, "read", loopback=False)
        # The same store on loopback is open.
        assert authenticate(store, None, "read", loopback=True).key is None
        with store.write() as conn:
            secret, _ = create_key(conn, "alpha", ["read"])
        principal = authenticate(store, f"Bearer {secret}", "read", loopback=False)
        assert principal.key is not None and principal.key.project == "alpha"
        with pytest.raises(Unauthorized, match="requires an API key"):
            authenticate(store, None, "read", loopback=True)


def test_a_server_that_believes_it_is_public_stays_closed_without_keys(
    collector: Collector,
) -> None:
    # The server is bound to loopback; its settings say otherwise, as in a container.
    app = collector.thread.app
    public = collector.thread.settings.model_copy(update={"host": "0.0.0.0"})
    app.dependency_overrides[get_settings] = lambda: public
    try:
        http = collector.http
        for call in calls_on(MISSING_RUN, "alpha"):
            refused(call.send(http), 401, "unauthorized", "server is not on loopback")
        secret, key_id = add_key(collector, "alpha", ["admin"])
        headers = {"Authorization": f"Bearer {secret}"}
        run = ok(http.post("/api/v1/runs", json={"project": "alpha"}, headers=headers))["id"]
        # Revoking the last key closes the server rather than opening it.
        revoke(collector, key_id)
        refused(http.get(f"/api/v1/runs/{run}", headers=headers), 401, "unauthorized", "")
        refused(http.get(f"/api/v1/runs/{run}"), 401, "unauthorized", "not on loopback")
    finally:
        app.dependency_overrides.clear()


# -- secrets -----------------------------------------------------------------------
def test_only_a_digest_and_an_11_character_prefix_are_stored(collector: Collector) -> None:
    secrets = [add_key(collector, "alpha", [scope])[0] for scope in SCOPES]
    with collector.store.read() as conn:
        rows = [r._asdict() for r in conn.execute(select(api_keys).order_by(api_keys.c.id))]
    assert set(rows[0]) == {
        "id",
        "project_id",
        "name",
        "prefix",
        "key_hash",
        "scopes",
        "created_at",
        "revoked_at",
    }
    for secret, row in zip(secrets, rows, strict=True):
        assert secret.startswith(KEY_PREFIX) and len(secret) > 40
        assert row["prefix"] == secret[:11] and len(row["prefix"]) == 11
        assert row["key_hash"] == hashlib.sha256(secret.encode()).hexdigest()
        for value in row.values():
            assert secret[11:] not in str(value)
            assert secret[11:19] not in str(value)


def test_a_key_made_with_the_cli_works_and_is_never_shown_again(
    collector: Collector, db_url: str
) -> None:
    mine = ok(collector.http.post("/api/v1/runs", json={"project": "gamma", "name": "g"}))
    ok(collector.http.post("/api/v1/runs", json={"project": "delta", "name": "d"}))
    runner = CliRunner()
    made = runner.invoke(
        cli, ["keys", "create", "--db", db_url, "--project", "gamma", "--scope", "read,ingest"]
    )
    assert made.exit_code == 0, made.output
    secret = made.stdout.strip().splitlines()[-1]
    assert secret.startswith(KEY_PREFIX)
    headers = {"Authorization": f"Bearer {secret}"}
    assert [r["id"] for r in ok(collector.http.get("/api/v1/runs", headers=headers))] == [
        mine["id"]
    ]
    refused(collector.http.get("/api/v1/runs"), 401, "unauthorized", "requires an API key")
    listed = runner.invoke(cli, ["keys", "list", "--db", db_url])
    assert listed.exit_code == 0, listed.output
    assert "gamma" in listed.output
    assert secret not in listed.output and secret[11:19] not in listed.output


# -- the key cache -----------------------------------------------------------------
def test_key_changes_take_effect_within_the_cache_lifetime(db_url: str) -> None:
    ttl = 0.3
    for collector in start_collector(db_url, key_cache_seconds=ttl):
        http = collector.http
        assert http.get("/api/v1/runs").status_code == 200  # open, and remembered
        secret, key_id = add_key(collector, "alpha", ["admin"])
        headers = {"Authorization": f"Bearer {secret}"}
        deadline = time.monotonic() + 5 * ttl
        while http.get("/api/v1/runs").status_code == 200:
            assert time.monotonic() < deadline, "the first key did not close the server"
            time.sleep(ttl / 5)
        assert http.get("/api/v1/runs", headers=headers).status_code == 200
        add_key(collector, "beta", ["read"])  # keeps the server closed once alpha's key goes
        revoke(collector, key_id)
        deadline = time.monotonic() + 5 * ttl
        while http.get("/api/v1/runs", headers=headers).status_code == 200:
            assert time.monotonic() < deadline, "the revoked key kept working"
            time.sleep(ttl / 5)
        refused(http.get("/api/v1/runs", headers=headers), 401, "unauthorized", "revoked")
