"""The silence routes: create, list, show, expire; their validation, scopes and projects.

Every test runs a real collector on SQLite and on PostgreSQL. Whether a silence holds an
alert's messages back is the alerting service's part (tests/collector); here a silence's
own life is checked, and that the service sees it (``silenced_by`` on a matching alert).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from runwatch.client import Client, ClientError
from tests.api.replies import key_acting_as, ok, refused
from tests.conftest import Collector, start_collector

HOUR = 3600.0
DAY = 86400.0
MISSING = 999_999


@pytest.fixture
def run(client: Client) -> int:
    return client.create_run("llm", "sweep-3")["id"]


# -- create, list, show, expire ------------------------------------------------------------
def test_a_silence_lives_until_it_is_expired(client: Client, run: int) -> None:
    before = time.time()
    made = client.create_silence(
        {"run": "sweep-*", "kind": "hang"}, duration="2h", comment="maintenance", project="llm"
    )
    assert made["matchers"] == {"run": "sweep-*", "kind": "hang"}
    assert before <= made["starts_at"] <= time.time()
    assert made["ends_at"] == pytest.approx(made["starts_at"] + 2 * HOUR)
    assert (made["state"], made["created_by"], made["comment"]) == (
        "active",
        "api:open",
        "maintenance",
    )
    assert made["expired_by"] is None
    assert client.silence(made["id"]) == made
    assert client.silences() == [made]
    assert client.silences(active=True) == [made]
    assert client.silences(active=False) == []

    expired = client.expire_silence(made["id"])
    assert (expired["state"], expired["expired_by"]) == ("expired", "api:open")
    assert made["starts_at"] <= expired["ends_at"] <= time.time()
    assert client.silence(made["id"]) == expired
    assert client.silences(active=True) == []
    assert client.silences(active=False) == [expired]
    with pytest.raises(ClientError) as again:
        client.expire_silence(made["id"])
    assert again.value.status == 409 and "has ended already" in again.value.detail
    assert client.silence(made["id"]) == expired


def test_silences_start_later_end_at_a_time_and_list_newest_first(client: Client, run: int) -> None:
    now = time.time()
    later = client.create_silence(
        {"severity": "info"}, starts_at=now + HOUR, ends_at=now + 2 * HOUR, project="llm"
    )
    assert (later["starts_at"], later["ends_at"], later["state"]) == (
        now + HOUR,
        now + 2 * HOUR,
        "pending",
    )
    numeric = client.create_silence({"key": "train/*"}, duration=90, project="llm")
    assert numeric["ends_at"] == pytest.approx(numeric["starts_at"] + 90)
    past_start = client.create_silence(
        {"run_id": run}, starts_at=now - HOUR, duration="1h30m", project="llm"
    )
    assert past_start["state"] == "active"
    assert [s["id"] for s in client.silences()] == [past_start["id"], numeric["id"], later["id"]]
    assert [s["id"] for s in client.silences(active=True)] == [past_start["id"], numeric["id"]]
    assert [s["id"] for s in client.silences(active=False)] == [later["id"]]
    assert [s["id"] for s in client.silences(limit=1)] == [past_start["id"]]
    # A silence expired before it started is over, not pending.
    assert client.expire_silence(later["id"])["state"] == "expired"


def test_a_run_id_matcher_gives_the_project_on_an_open_server(
    collector: Collector, client: Client, run: int
) -> None:
    made = client.create_silence({"run_id": run}, duration="1h")
    other_project = client.create_run("vision", "r")["id"]
    assert (
        made["project_id"]
        == client.create_silence({"kind": "x"}, duration=60, project="llm")["project_id"]
    )
    http = collector.http
    refused(
        http.post("/api/v1/silences", json={"matchers": {"run_id": MISSING}, "duration": "1h"}),
        404,
        "not_found",
        f"unknown run {MISSING}",
    )
    refused(
        http.post(
            "/api/v1/silences",
            json={"matchers": {"run_id": other_project}, "duration": "1h", "project": "llm"},
        ),
        422,
        "invalid",
        f"run {other_project} is not in project 'llm'",
    )
    refused(
        http.post(
            "/api/v1/silences", json={"matchers": {"kind": "x"}, "duration": "1h", "project": "no"}
        ),
        404,
        "not_found",
        "unknown project 'no'",
    )
    refused(
        http.post("/api/v1/silences", json={"matchers": {"kind": "x"}, "duration": "1h"}),
        422,
        "invalid",
        "give the silence's project",
    )
    assert len(client.silences()) == 2


def test_unknown_silences_are_404(collector: Collector) -> None:
    for method in ("GET", "DELETE"):
        refused(
            collector.http.request(method, f"/api/v1/silences/{MISSING}"),
            404,
            "not_found",
            f"unknown silence {MISSING}",
        )


def test_the_alerting_service_sees_a_new_silence(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a webhook that nobody answers, a silenced alert is held, not sent."""
    monkeypatch.setenv("RUNWATCH_WEBHOOK_SECRET", "s")
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "version: 1\n"
        "alerting:\n"
        "  group_wait: 0s\n"
        "  channels: {hook: {type: webhook, url: 'http://127.0.0.1:9/nobody'}}\n"
        "  escalations: {page: {steps: [{notify: [hook]}]}}\n"
        "  routes: [{escalation: page}]\n"
    )
    for collector in start_collector(db_url, policy=str(policy), alert_tick_seconds=0.05):
        with collector.client() as client:
            run = client.create_run("llm", "sweep-3")["id"]
            silence = client.create_silence({"run": "sweep-*"}, duration="1h", project="llm")
            alert = client.raise_alert(run, "hang")["id"]
            deadline = time.monotonic() + 15
            while client.alert(alert)["silenced_by"] != silence["id"]:
                assert time.monotonic() < deadline, client.alert(alert)
                time.sleep(0.05)
            assert client.alert_deliveries(alert) == []


# -- validation ----------------------------------------------------------------------------
# fmt: off
BAD_SILENCES = [
    # no matcher
    pytest.param({"matchers": {}}, "needs at least one matcher", id="no-matchers"),
    # matchers that are all null
    pytest.param({"matchers": {"kind": None}}, "needs at least one matcher", id="null-matchers"),
    # no matchers field
    pytest.param({"matchers": None}, "body.matchers: Field required", id="matchers-missing"),
    # a field silences do not match on
    pytest.param({"matchers": {"rank": "0"}}, "body.matchers.rank: Extra inputs", id="unknown-field"),  # noqa: E501
    # run_id as text
    pytest.param({"matchers": {"run_id": "7"}}, "body.matchers.run_id", id="run-id-text"),
    # run_id as a boolean
    pytest.param({"matchers": {"run_id": True}}, "body.matchers.run_id", id="run-id-bool"),
    # run_id 0
    pytest.param({"matchers": {"run_id": 0}}, "body.matchers.run_id", id="run-id-zero"),
    # an empty glob
    pytest.param({"matchers": {"kind": ""}}, "body.matchers.kind", id="empty-glob"),
    # a glob of 257 characters
    pytest.param({"matchers": {"key": "k" * 257}}, "body.matchers.key", id="long-glob"),
    # a glob that is a number
    pytest.param({"matchers": {"severity": 3}}, "body.matchers.severity", id="glob-number"),
    # both ends_at and duration
    pytest.param({"ends_at": 4e9}, "either ends_at or duration, exactly one", id="two-ends"),
    # neither
    pytest.param({"duration": None}, "either ends_at or duration, exactly one", id="no-end"),
    # a duration that is not one
    pytest.param({"duration": "2x"}, "not a duration: '2x'", id="bad-duration"),
    # a negative duration
    pytest.param({"duration": -60}, "body.duration", id="negative-duration"),
    # a zero duration
    pytest.param({"duration": 0}, "must end after it starts", id="zero-duration"),
    # longer than 90 days
    pytest.param({"duration": "91d"}, "at most 90 days", id="too-long"),
    # ends before it starts
    pytest.param({"duration": None, "starts_at": 4e9, "ends_at": 4e9 - 1}, "must end after it starts", id="ends-before-start"),  # noqa: E501
    # ended already
    pytest.param({"duration": None, "starts_at": 1e9, "ends_at": 1e9 + 60}, "lies in the past", id="in-the-past"),  # noqa: E501
    # a starts_at that is not a number
    pytest.param({"starts_at": "now"}, "body.starts_at", id="starts-text"),
    # a comment over 1000 characters
    pytest.param({"comment": "c" * 1001}, "body.comment", id="long-comment"),
    # a field the API does not know
    pytest.param({"reason": "x"}, "body.reason: Extra inputs", id="extra-field"),
]
# fmt: on


@pytest.mark.parametrize(("change", "fragment"), BAD_SILENCES)
def test_bad_silences_are_422_and_create_nothing(
    collector: Collector, run: int, change: dict[str, Any], fragment: str
) -> None:
    body = {"matchers": {"kind": "hang"}, "duration": "1h", "project": "llm"} | change
    body = {k: v for k, v in body.items() if v is not None}
    refused(collector.http.post("/api/v1/silences", json=body), 422, "invalid", fragment)
    assert ok(collector.http.get("/api/v1/silences")) == []


@pytest.mark.parametrize(
    ("params", "where"),
    [({"active": "maybe"}, "query.active"), ({"limit": 0}, "query.limit")],
)
def test_bad_list_filters_are_422(collector: Collector, params: dict[str, Any], where: str) -> None:
    refused(collector.http.get("/api/v1/silences", params=params), 422, "invalid", where)


# -- keys ----------------------------------------------------------------------------------
@pytest.fixture
def keyed_collector(db_url: str) -> Iterator[Collector]:
    """Key lookups uncached, so that keys made after the first request count at once."""
    yield from start_collector(db_url, key_cache_seconds=0)


def keyed(collector: Collector, secret: str) -> httpx.Client:
    headers = {"Authorization": f"Bearer {secret}"}
    return httpx.Client(base_url=collector.url, headers=headers, timeout=30)


def test_keys_make_silences_in_their_project_only(keyed_collector: Collector) -> None:
    collector = keyed_collector
    with collector.client() as open_client:
        runs = {p: open_client.create_run(p, "r")["id"] for p in ("alpha", "beta")}
        beta_silence = open_client.create_silence({"kind": "x"}, duration="1h", project="beta")
    alpha_operate, alpha_source = key_acting_as(collector, "alpha", "operate")
    alpha_read, _ = key_acting_as(collector, "alpha", "read")
    beta_id = beta_silence["id"]
    body = {"matchers": {"kind": "hang"}, "duration": "1h"}

    with keyed(collector, alpha_operate) as http:
        made = ok(http.post("/api/v1/silences", json=body), 201)
        assert made["created_by"] == alpha_source
        named = ok(http.post("/api/v1/silences", json=body | {"project": "alpha"}), 201)
        assert named["project_id"] == made["project_id"] != beta_silence["project_id"]
        own_run = {"matchers": {"run_id": runs["alpha"]}, "duration": "1h"}
        ok(http.post("/api/v1/silences", json=own_run), 201)
        refused(
            http.post("/api/v1/silences", json=body | {"project": "beta"}),
            403,
            "forbidden",
            "this key belongs to project 'alpha', not 'beta'",
        )
        refused(
            http.post(
                "/api/v1/silences", json={"matchers": {"run_id": runs["beta"]}, "duration": "1h"}
            ),
            404,
            "not_found",
            f"unknown run {runs['beta']}",
        )
        refused(
            http.delete(f"/api/v1/silences/{beta_id}"),
            404,
            "not_found",
            f"unknown silence {beta_id}",
        )
        # operate alone does not read.
        refused(http.get("/api/v1/silences"), 403, "forbidden", "the request needs 'read'")
    with keyed(collector, alpha_read) as http:
        listed = ok(http.get("/api/v1/silences"))
        assert beta_id not in [s["id"] for s in listed] and len(listed) == 3
        refused(
            http.get(f"/api/v1/silences/{beta_id}"),
            404,
            "not_found",
            f"unknown silence {beta_id}",
        )
        refused(http.post("/api/v1/silences", json=body), 403, "forbidden", "needs 'operate'")
        refused(http.delete(f"/api/v1/silences/{made['id']}"), 403, "forbidden", "needs 'operate'")
    admin, _ = key_acting_as(collector, "beta", "admin")
    with keyed(collector, admin) as http:
        assert ok(http.get(f"/api/v1/silences/{beta_id}"))["state"] == "active"
        assert [s["id"] for s in ok(http.get("/api/v1/silences"))] == [beta_id]
