"""The alert routes: raise, list, show, deliveries, acknowledge, resolve; scopes and projects.

Every test runs a real collector on SQLite and on PostgreSQL. Alerts are raised through
``POST /api/v1/alerts`` (what a trainer-side tool does); the delivery log is made by the
collector's own dispatcher sending to a webhook on loopback that fails once.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from runwatch.client import Client, ClientError
from tests.api.replies import key_acting_as, ok, refused
from tests.conftest import Collector, start_collector, wait_for

MISSING = 999_999


def keyed(collector: Collector, secret: str) -> httpx.Client:
    headers = {"Authorization": f"Bearer {secret}"}
    return httpx.Client(base_url=collector.url, headers=headers, timeout=30)


@pytest.fixture
def run(client: Client) -> int:
    return client.create_run("llm", "nightly")["id"]


# -- raise, list, show -------------------------------------------------------------------
def test_a_raised_alert_is_listed_and_shown_with_its_history(client: Client, run: int) -> None:
    raised = client.raise_alert(
        run, "supervisor:restart_loop", severity="critical", summary="3 restarts in 10 min"
    )
    assert raised["id"] >= 1
    assert (raised["project"], raised["run_id"], raised["run_name"]) == ("llm", run, "nightly")
    assert (raised["kind"], raised["key"], raised["severity"]) == (
        "supervisor:restart_loop",
        "",
        "critical",
    )
    assert (raised["state"], raised["source"], raised["count"]) == ("firing", "api:open", 1)
    assert raised["summary"] == "3 restarts in 10 min"
    assert raised["acknowledged_by"] is None and raised["resolved_by"] is None

    # The same run, kind and key is one alert whose count goes up.
    again = client.raise_alert(run, "supervisor:restart_loop", severity="critical", step=40)
    assert (again["id"], again["count"], again["last_step"]) == (raised["id"], 2, 40)
    other = client.raise_alert(run, "data:stall", key="loader/0", step=12, summary="stalled")
    assert other["id"] > raised["id"] and other["severity"] == "warning"

    assert [a["id"] for a in client.alerts()] == [other["id"], raised["id"]]  # newest first
    shown = client.alert(raised["id"])
    assert {k: v for k, v in shown.items() if k != "events"} == {
        k: v for k, v in client.alerts(kind="supervisor:restart_loop")[0].items()
    }
    assert shown["events"][0]["type"] == "fired"
    assert shown["events"][0]["by"] == "api:open"
    assert client.alert_deliveries(raised["id"]) == []  # the default policy: to the log later


def test_alerts_filter_and_page(client: Client, run: int) -> None:
    second_run = client.create_run("llm", "other")["id"]
    ids = [
        client.raise_alert(run, f"kind.{i}", severity=("info", "warning", "critical")[i % 3])["id"]
        for i in range(6)
    ]
    theirs = client.raise_alert(second_run, "kind.0")["id"]
    assert [a["id"] for a in client.alerts(run=run)] == ids[::-1]
    assert [a["id"] for a in client.alerts(run=second_run)] == [theirs]
    assert [a["id"] for a in client.alerts(severity="critical")] == [ids[5], ids[2]]
    assert [a["id"] for a in client.alerts(kind="kind.0")] == [theirs, ids[0]]
    page = client.alerts(limit=3)
    assert [a["id"] for a in page] == [theirs, ids[5], ids[4]]
    rest = client.alerts(before=page[-1]["id"], limit=1000)
    assert [a["id"] for a in rest] == ids[3::-1]
    client.ack_alert(ids[1])
    client.resolve_alert(ids[2])
    assert [a["id"] for a in client.alerts(state="acknowledged")] == [ids[1]]
    assert [a["id"] for a in client.alerts(state="resolved")] == [ids[2]]
    assert len(client.alerts(state="firing")) == 5


# -- acknowledge, resolve ----------------------------------------------------------------
def test_ack_is_idempotent_and_a_resolved_alert_cannot_be_acknowledged(
    client: Client, run: int
) -> None:
    alert = client.raise_alert(run, "hang", severity="critical")["id"]
    acked = client.ack_alert(alert)
    assert (acked["state"], acked["acknowledged_by"]) == ("acknowledged", "api:open")
    assert acked["next_escalation_at"] is None  # escalation stops at once
    again = client.ack_alert(alert)
    assert again["acknowledged_at"] == acked["acknowledged_at"]
    assert [e["type"] for e in client.alert(alert)["events"]] == ["fired", "acknowledged"]

    resolved = client.resolve_alert(alert)
    assert (resolved["state"], resolved["resolved_by"]) == ("resolved", "api:open")
    assert client.resolve_alert(alert)["resolved_at"] == resolved["resolved_at"]
    with pytest.raises(ClientError) as refused_ack:
        client.ack_alert(alert)
    assert refused_ack.value.status == 409 and refused_ack.value.reason == "conflict"
    assert f"alert {alert} is resolved" in refused_ack.value.detail
    shown = client.alert(alert)
    assert shown["state"] == "resolved"
    assert [e["type"] for e in shown["events"]] == ["fired", "acknowledged", "resolved"]

    # The condition coming back after resolution is a new alert.
    assert client.raise_alert(run, "hang", severity="critical")["id"] != alert


def test_a_firing_alert_can_be_resolved_directly(client: Client, run: int) -> None:
    alert = client.raise_alert(run, "hang")["id"]
    assert client.resolve_alert(alert)["state"] == "resolved"
    assert client.alert(alert)["acknowledged_by"] is None


def test_unknown_alerts_and_runs_are_404(collector: Collector, run: int) -> None:
    http = collector.http
    for method, path in [
        ("GET", f"/api/v1/alerts/{MISSING}"),
        ("GET", f"/api/v1/alerts/{MISSING}/deliveries"),
        ("POST", f"/api/v1/alerts/{MISSING}/ack"),
        ("POST", f"/api/v1/alerts/{MISSING}/resolve"),
    ]:
        refused(http.request(method, path), 404, "not_found", f"unknown alert {MISSING}")
    refused(
        http.post("/api/v1/alerts", json={"run": MISSING, "kind": "hang"}),
        404,
        "not_found",
        f"unknown run {MISSING}",
    )
    refused(
        http.get("/api/v1/alerts", params={"run": MISSING}),
        404,
        "not_found",
        f"unknown run {MISSING}",
    )
    assert ok(http.get("/api/v1/alerts")) == []


# fmt: off
BAD_BODIES = [
    # upper case in the kind
    pytest.param({"kind": "Hang"}, "body.kind", "lowercase letters", id="kind-case"),
    # a space in the kind
    pytest.param({"kind": "my kind"}, "body.kind", "must be 1-80 characters", id="kind-space"),
    # an empty kind
    pytest.param({"kind": ""}, "body.kind", "must be 1-80 characters", id="kind-empty"),
    # 81 characters
    pytest.param({"kind": "k" * 81}, "body.kind", "must be 1-80 characters", id="kind-long"),
    # no kind
    pytest.param({"kind": None}, "body.kind", "Field required", id="kind-missing"),
    # a severity that does not exist
    pytest.param({"severity": "fatal"}, "body.severity", "'info', 'warning' or 'critical'", id="severity"),  # noqa: E501
    # a summary over 2000 characters
    pytest.param({"summary": "x" * 2001}, "body.summary", "at most 2000 characters", id="summary-long"),  # noqa: E501
    # a NUL in the key
    pytest.param({"key": "a\x00b"}, "body.key", "NUL", id="key-nul"),
    # a negative step
    pytest.param({"step": -1}, "body.step", "greater than or equal to 0", id="step-negative"),
    # a run id of 0
    pytest.param({"run": 0}, "body.run", "greater than or equal to 1", id="run-zero"),
    # a run given as text
    pytest.param({"run": "nightly"}, "body.run", "valid integer", id="run-text"),
    # a field the API does not know
    pytest.param({"state": "resolved"}, "body.state", "Extra inputs", id="extra-field"),
]
# fmt: on


@pytest.mark.parametrize(("change", "where", "fragment"), BAD_BODIES)
def test_bad_alert_bodies_are_422_and_raise_nothing(
    collector: Collector, run: int, change: dict[str, Any], where: str, fragment: str
) -> None:
    body = {"run": run, "kind": "hang"} | change
    body = {k: v for k, v in body.items() if v is not None}
    reply = collector.http.post("/api/v1/alerts", json=body)
    refused(reply, 422, "invalid", where)
    assert fragment in reply.json()["detail"]
    assert ok(collector.http.get("/api/v1/alerts")) == []


@pytest.mark.parametrize(
    ("params", "where"),
    [
        ({"limit": 0}, "query.limit"),
        ({"limit": 1001}, "query.limit"),
        ({"state": "open"}, "query.state"),
        ({"severity": "fatal"}, "query.severity"),
        ({"before": 0}, "query.before"),
        ({"run": "nightly"}, "query.run"),
    ],
)
def test_bad_list_filters_are_422(collector: Collector, params: dict[str, Any], where: str) -> None:
    refused(collector.http.get("/api/v1/alerts", params=params), 422, "invalid", where)


def test_a_malformed_json_body_is_400(collector: Collector) -> None:
    reply = collector.http.post(
        "/api/v1/alerts", content=b'{"run": 1,', headers={"Content-Type": "application/json"}
    )
    refused(reply, 400, "malformed_body", "cannot decode")


# -- keys: scopes and projects -----------------------------------------------------------
@pytest.fixture
def keyed_collector(db_url: str) -> Iterator[Collector]:
    """Key lookups uncached, so that keys made after the first request count at once."""
    yield from start_collector(db_url, key_cache_seconds=0)


def test_keys_see_and_touch_only_their_project(keyed_collector: Collector) -> None:
    collector = keyed_collector
    with collector.client() as open_client:
        runs = {p: open_client.create_run(p, f"{p}-run")["id"] for p in ("alpha", "beta")}
        alerts = {p: open_client.raise_alert(runs[p], "hang")["id"] for p in ("alpha", "beta")}
    keys = {(p, s): key_acting_as(collector, p, s) for p in ("alpha", "beta") for s in SCOPES}
    alpha_alert, alpha_run = alerts["alpha"], runs["alpha"]
    before = ok(keyed(collector, keys["alpha", "read"][0]).get(f"/api/v1/alerts/{alpha_alert}"))

    with keyed(collector, keys["beta", "read"][0]) as beta:
        assert [a["id"] for a in ok(beta.get("/api/v1/alerts"))] == [alerts["beta"]]
        assert ok(beta.get("/api/v1/alerts", params={"kind": "hang", "limit": 1000})) == ok(
            beta.get("/api/v1/alerts")
        )
        for path in (f"/api/v1/alerts/{alpha_alert}", f"/api/v1/alerts/{alpha_alert}/deliveries"):
            refused(beta.get(path), 404, "not_found", f"unknown alert {alpha_alert}")
        refused(
            beta.get("/api/v1/alerts", params={"run": alpha_run}),
            404,
            "not_found",
            f"unknown run {alpha_run}",
        )
    with keyed(collector, keys["beta", "operate"][0]) as beta:
        for verb in ("ack", "resolve"):
            refused(
                beta.post(f"/api/v1/alerts/{alpha_alert}/{verb}"),
                404,
                "not_found",
                f"unknown alert {alpha_alert}",
            )
    with keyed(collector, keys["beta", "ingest"][0]) as beta:
        refused(
            beta.post("/api/v1/alerts", json={"run": alpha_run, "kind": "hang"}),
            404,
            "not_found",
            f"unknown run {alpha_run}",
        )
    with keyed(collector, keys["alpha", "read"][0]) as alpha:
        assert ok(alpha.get(f"/api/v1/alerts/{alpha_alert}")) == before
        assert [a["id"] for a in ok(alpha.get("/api/v1/alerts"))] == [alpha_alert]


SCOPES = ("read", "ingest", "operate")


def test_each_route_needs_its_scope(keyed_collector: Collector) -> None:
    collector = keyed_collector
    with collector.client() as open_client:
        run = open_client.create_run("alpha", "r")["id"]
        alert = open_client.raise_alert(run, "hang")["id"]
    keys = {s: key_acting_as(collector, "alpha", s) for s in (*SCOPES, "admin")}
    calls = {
        "list": ("read", "GET", "/api/v1/alerts", None),
        "get": ("read", "GET", f"/api/v1/alerts/{alert}", None),
        "deliveries": ("read", "GET", f"/api/v1/alerts/{alert}/deliveries", None),
        "raise": ("ingest", "POST", "/api/v1/alerts", {"run": run, "kind": "data:stall"}),
        "ack": ("operate", "POST", f"/api/v1/alerts/{alert}/ack", None),
        "resolve": ("operate", "POST", f"/api/v1/alerts/{alert}/resolve", None),
    }
    for scope, (secret, _) in keys.items():
        with keyed(collector, secret) as http:
            for name, (needs, method, path, body) in calls.items():
                if scope == "admin" and name in ("ack", "resolve"):
                    continue  # the operate key did: the alert is resolved now
                reply = http.request(method, path, json=body)
                if scope in (needs, "admin"):
                    assert reply.status_code in (200, 201), (scope, name, reply.text)
                else:
                    refused(reply, 403, "forbidden", f"the request needs {needs!r}")
    with keyed(collector, keys["read"][0]) as reader:
        events = ok(reader.get(f"/api/v1/alerts/{alert}"))["events"]
    # Only the operate and admin keys changed the alert, each under its own name.
    assert [(e["type"], e["by"]) for e in events] == [
        ("fired", "api:open"),
        ("acknowledged", keys["operate"][1]),
        ("resolved", keys["operate"][1]),
    ]
    with keyed(collector, keys["read"][0]) as reader:
        raised = [a for a in ok(reader.get("/api/v1/alerts")) if a["kind"] == "data:stall"]
    assert [(a["source"], a["count"]) for a in raised] == [(keys["ingest"][1], 2)]
    refused(collector.http.get("/api/v1/alerts"), 401, "unauthorized", "requires an API key")


# -- deliveries --------------------------------------------------------------------------
class Hook:
    """A webhook receiver on loopback that answers 500 to the first ``fail`` requests."""

    def __init__(self, fail: int) -> None:
        self.fail = fail
        self.received: list[dict[str, Any]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.received.append(json.loads(body))
                status = 500 if len(hook.received) <= hook.fail else 204
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hooked(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Collector, Hook]]:
    """A collector whose alerting policy posts every alert to a webhook at once."""
    hook = Hook(fail=1)
    monkeypatch.setenv("RUNWATCH_WEBHOOK_SECRET", "test-secret")
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "version: 1\n"
        "alerting:\n"
        "  group_wait: 0s\n"
        "  channels:\n"
        f"    hook: {{type: webhook, url: '{hook.url}', retries: 3, backoff: 0.1}}\n"
        "  escalations:\n"
        "    page: {steps: [{notify: [hook]}], then: stop}\n"
        "  routes:\n"
        "    - {escalation: page}\n"
    )
    try:
        for collector in start_collector(db_url, policy=str(policy), alert_tick_seconds=0.05):
            yield collector, hook
    finally:
        hook.close()


def test_deliveries_show_every_attempt(hooked: tuple[Collector, Hook]) -> None:
    collector, hook = hooked
    with collector.client() as client:
        run = client.create_run("llm", "nightly")["id"]
        alert = client.raise_alert(run, "hang", severity="critical", summary="no step")["id"]

        def sent() -> list[dict[str, Any]]:
            found = client.alert_deliveries(alert)
            return found if found and found[0]["state"] == "sent" else []

        (first,) = wait_for(sent)
        # The target is the hook's scheme and host: its path may hold a secret.
        origin = hook.url.removesuffix("/hook")
        assert (first["channel"], first["type"], first["target"]) == ("hook", "webhook", origin)
        assert (first["event"], first["step"], first["attempts"]) == ("firing", 1, 2)
        assert first["alert_ids"] == [alert]
        assert first["sent_at"] is not None and "500" in first["last_error"]
        assert [(a["attempt"], a["status"]) for a in first["log"]] == [(1, "failed"), (2, "sent")]
        assert "500" in first["log"][0]["error"] and first["log"][1]["error"] is None
        assert all(a["duration"] >= 0 for a in first["log"])

        # Acknowledging tells the webhook, which shows state.
        client.ack_alert(alert)
        state = wait_for(lambda: [d for d in client.alert_deliveries(alert)[1:] if d["sent_at"]])
        assert [(d["event"], d["step"], d["state"]) for d in state] == [
            ("acknowledged", None, "sent")
        ]
        assert client.alert(alert)["escalation"] == "page"
    assert [r["event"] for r in hook.received] == ["firing", "firing", "acknowledged"]
