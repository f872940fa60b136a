"""Escalation in a real collector: acknowledging from the API and the CLI stops it, and a
restarted collector goes on with it, taking each step once."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from runwatch.client import Client
from tests.conftest import Collector, start_collector, wait_for

STEPS = [
    {"notify": ["chat"]},
    {"after": "1.5s", "notify": ["sms"]},
    {"after": "3s", "notify": ["call"]},
]


@pytest.fixture
def policy(tmp_path: Path) -> str:
    path = tmp_path / "policy.yaml"
    alerting = {
        "group_wait": 0,
        "resolve_after": "never",
        "channels": {name: {"type": "console", "label": name} for name in ("chat", "sms", "call")},
        "escalations": {"page": {"steps": STEPS, "then": "stop"}},
        "routes": [{"escalation": "page"}],
    }
    path.write_text(yaml.safe_dump({"rules": [], "alerting": alerting}))
    return str(path)


@contextmanager
def server(db_url: str, policy: str) -> Iterator[Collector]:
    yield from start_collector(db_url, policy=policy, alert_tick_seconds=0.05)


def raise_alert(client: Client) -> int:
    run = client.create_run("llm", "nightly")["id"]
    return int(client.raise_alert(run, "hang", severity="critical", summary="stuck")["id"])


def channels(client: Client, alert_id: int) -> list[str]:
    """Channels sent a message asking for attention, in order."""
    return [
        d["channel"]
        for d in client.alert_deliveries(alert_id)
        if d["state"] == "sent" and d["event"] != "acknowledged"
    ]


def test_an_api_acknowledgement_stops_the_escalation(db_url: str, policy: str) -> None:
    with server(db_url, policy) as collector, collector.client() as client:
        alert_id = raise_alert(client)
        wait_for(lambda: channels(client, alert_id) == ["chat"], "chat message")
        acked = client.ack_alert(alert_id)
        sent = channels(client, alert_id)  # a loaded machine may have sent the text already
        time.sleep(3.5)  # past the text (1.5 s) and the call (3 s)
        assert channels(client, alert_id) == sent and "call" not in sent
    assert (acked["state"], acked["acknowledged_by"]) == ("acknowledged", "api:open")


def test_a_cli_acknowledgement_stops_the_escalation(db_url: str, policy: str) -> None:
    with server(db_url, policy) as collector, collector.client() as client:
        alert_id = raise_alert(client)
        wait_for(lambda: channels(client, alert_id) == ["chat", "sms"], "the text")
        done = subprocess.run(
            [sys.executable, "-m", "runwatch", "alerts", "ack", str(alert_id)],
            capture_output=True,
            text=True,
            env={"RUNWATCH_SERVER": collector.url, "PATH": ""},
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert f"alert {alert_id} acknowledged by api:open" in done.stdout
        sent = channels(client, alert_id)  # the CLI's start may have let the call out
        assert client.alert(alert_id)["next_escalation_at"] is None
        time.sleep(3.5)  # past the call (3 s after the first message)
        assert channels(client, alert_id) == sent


def test_a_restarted_collector_takes_each_remaining_step_once(db_url: str, policy: str) -> None:
    with server(db_url, policy) as collector, collector.client() as client:
        alert_id = raise_alert(client)
        wait_for(lambda: channels(client, alert_id) == ["chat"], "chat message")
    time.sleep(2.0)  # down while the text comes due (1.5 s)
    with server(db_url, policy) as collector, collector.client() as client:
        wait_for(lambda: channels(client, alert_id) == ["chat", "sms", "call"], "the call")
        time.sleep(0.5)
        deliveries = client.alert_deliveries(alert_id)
        events = [e["type"] for e in client.alert(alert_id)["events"]]
    assert [d["channel"] for d in deliveries] == ["chat", "sms", "call"]
    assert all(d["attempts"] == 1 for d in deliveries)
    assert events == ["fired", "notified", "notified", "notified"]
