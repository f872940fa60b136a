"""``runwatch alerts`` and ``runwatch silences`` against a real collector.

The verbs run in-process (click's runner) against the collector fixture, on SQLite and on
PostgreSQL; alerts are raised through the client, as a trainer-side tool would.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from runwatch.cli import main
from runwatch.client import Client
from runwatch.collector.storage.keys import create_key
from tests.conftest import Collector, start_collector


def invoke(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), env=env)
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def env(collector: Collector) -> dict[str, str]:
    return {"RUNWATCH_SERVER": collector.url, "RUNWATCH_API_KEY": ""}


@pytest.fixture
def alerts(client: Client) -> dict[str, int]:
    """Three alerts on two runs of project llm."""
    nightly = client.create_run("llm", "nightly")["id"]
    sweep = client.create_run("llm", "sweep-1")["id"]
    return {
        "hang": client.raise_alert(nightly, "hang", severity="critical", summary="no step")["id"],
        "stall": client.raise_alert(nightly, "data:stall", key="loader/0", step=7)["id"],
        "spike": client.raise_alert(sweep, "loss_spike", key="train/loss", severity="info")["id"],
    }


def test_alerts_list_and_show(env: dict[str, str], alerts: dict[str, int]) -> None:
    code, out, err = invoke("alerts", "list", env=env)
    assert code == 0, err
    for text in ("hang", "data:stall", "loss_spike", "llm/nightly", "llm/sweep-1", "no step"):
        assert text in out
    assert "3 alert(s)" in out

    code, out, err = invoke("alerts", "list", "--run", "llm/nightly", "--json", env=env)
    assert code == 0, err
    assert [a["id"] for a in json.loads(out)] == [alerts["stall"], alerts["hang"]]
    code, out, err = invoke(
        "alerts", "list", "--severity", "critical", "--state", "firing", "--json", env=env
    )
    assert code == 0, err
    assert [a["kind"] for a in json.loads(out)] == ["hang"]
    code, out, err = invoke("alerts", "list", "--kind", "loss_spike", "--limit", "1", env=env)
    assert code == 0, err
    assert "loss_spike" in out and "1 alert(s)" in out

    code, out, err = invoke("alerts", "show", str(alerts["stall"]), env=env)
    assert code == 0, err
    assert f"alert {alerts['stall']}: warning data:stall on loader/0: firing" in out
    assert "run llm/nightly" in out and "fired by api:open" in out
    assert "deliveries: none" in out
    code, out, err = invoke("alerts", "show", str(alerts["hang"]), "--json", env=env)
    assert code == 0, err
    shown = json.loads(out)
    assert shown["id"] == alerts["hang"] and shown["deliveries"] == []
    assert [e["type"] for e in shown["events"]] == ["fired"]


def test_alerts_show_lists_the_messages_sent(db_url: str, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "version: 1\n"
        "alerting:\n"
        "  group_wait: 0s\n"
        "  channels: {oncall: {type: console, label: 'sms oncall'}}\n"
        "  escalations: {page: {steps: [{notify: [oncall]}], then: stop}}\n"
        "  routes: [{name: everything, escalation: page}]\n"
    )
    for collector in start_collector(db_url, policy=str(policy), alert_tick_seconds=0.05):
        env = {"RUNWATCH_SERVER": collector.url, "RUNWATCH_API_KEY": ""}
        with collector.client() as client:
            run = client.create_run("llm", "nightly")["id"]
            alert = client.raise_alert(run, "hang", severity="critical", step=3)["id"]
            client.raise_alert(run, "hang", severity="critical", step=9)
            deadline = time.monotonic() + 15
            while not any(d["sent_at"] for d in client.alert_deliveries(alert)):
                assert time.monotonic() < deadline
                time.sleep(0.05)
        code, out, err = invoke("alerts", "show", str(alert), env=env)
        assert code == 0, err
        assert "fired 2 time(s) at steps 3-9" in out
        assert "route everything, escalation page: 1 step(s) taken" in out
        assert "firing step 1 via oncall (console) to sms oncall: sent at " in out
        assert "attempt 1 " in out and " sent (" in out


def test_alerts_ack_and_resolve(env: dict[str, str], alerts: dict[str, int]) -> None:
    hang, stall = alerts["hang"], alerts["stall"]
    code, out, err = invoke("alerts", "ack", str(hang), str(stall), env=env)
    assert code == 0, err
    assert out.splitlines() == [
        f"alert {hang} acknowledged by api:open",
        f"alert {stall} acknowledged by api:open",
    ]
    code, out, err = invoke("alerts", "resolve", str(hang), env=env)
    assert code == 0, err
    assert out.strip() == f"alert {hang} resolved by api:open"
    code, out, err = invoke("alerts", "show", str(hang), env=env)
    assert "acknowledged by api:open" in out and "resolved by api:open" in out

    # Refused ids are reported one line each; the others are still acknowledged.
    code, out, err = invoke("alerts", "ack", str(hang), "999999", str(alerts["spike"]), env=env)
    assert code == 1
    assert out.strip() == f"alert {alerts['spike']} acknowledged by api:open"
    assert err.splitlines() == [
        f"Error: alert {hang}: alert {hang} is resolved already",
        "Error: alert 999999: unknown alert 999999",
    ]


def test_a_keyed_ack_names_the_key(db_url: str) -> None:
    for collector in start_collector(db_url, key_cache_seconds=0):
        with collector.client() as client:
            alert = client.raise_alert(client.create_run("llm", "r")["id"], "hang")["id"]
        with collector.store.write() as conn:
            operate, info = create_key(conn, "llm", ["operate"], name="oncall")
            read, _ = create_key(conn, "llm", ["read"], name="viewer")
        env = {"RUNWATCH_SERVER": collector.url, "RUNWATCH_API_KEY": read}
        code, _, err = invoke("alerts", "ack", str(alert), env=env)
        assert code == 1 and "403 forbidden" in err and "needs 'operate'" in err
        code, out, err = invoke(
            "alerts", "ack", str(alert), env=env | {"RUNWATCH_API_KEY": operate}
        )
        assert code == 0, err
        assert out.strip() == f"alert {alert} acknowledged by api:{info.prefix}"


def test_silences_create_list_expire(env: dict[str, str], alerts: dict[str, int]) -> None:
    code, out, err = invoke(
        "silences",
        "create",
        "--match",
        "run=sweep-*",
        "--match",
        "kind=loss_spike",
        "--duration",
        "2h",
        "--comment",
        "known, fixing the LR",
        "--project",
        "llm",
        env=env,
    )
    assert code == 0, err
    assert out.startswith("silence 1 (run=sweep-* kind=loss_spike) active from ")
    code, out, err = invoke(
        "silences", "create", "--match", "run_id=1", "--duration", "600", "--json", env=env
    )
    assert code == 0, err
    made = json.loads(out)
    assert made["matchers"] == {"run_id": 1}
    assert made["ends_at"] - made["starts_at"] == pytest.approx(600)

    code, out, err = invoke("silences", "list", env=env)
    assert code == 0, err
    assert "run=sweep-*" in out and "known, fixing the LR" in out and "2 silence(s)" in out
    code, out, err = invoke("silences", "expire", "1", env=env)
    assert code == 0, err
    assert out.strip() == "silence 1 expired by api:open"
    code, out, err = invoke("silences", "list", "--active", "--json", env=env)
    assert code == 0, err
    assert [s["id"] for s in json.loads(out)] == [2]
    code, _, err = invoke("silences", "expire", "1", env=env)
    assert code == 1 and "409 conflict: silence 1 has ended already" in err


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--match", "kind"), "--match takes FIELD=VALUE, not 'kind'"),
        (("--match", "kind="), "--match takes FIELD=VALUE"),
        (("--match", "rank=0"), "unknown field 'rank' (use run, run_id, kind, key, severity)"),
        (("--match", "run_id=seven"), "--match run_id takes a run id, not 'seven'"),
        (("--match", "kind=a", "--match", "kind=b"), "kind is given twice"),
        (("--match", "kind=hang", "--duration", "2x"), "not a duration: '2x'"),
        (("--match", "kind=hang", "--duration", "91d"), "at most 90 days"),
        (("--match", "kind=hang", "--project", "nope"), None),
    ],
)
def test_silences_create_refuses_bad_input_in_one_line(
    env: dict[str, str], client: Client, args: tuple[str, ...], fragment: str | None
) -> None:
    client.create_run("llm", "r")
    given = list(args)
    if "--duration" not in given:
        given += ["--duration", "1h"]
    if "--project" not in given:
        given += ["--project", "llm"]
    code, out, err = invoke("silences", "create", *given, env=env)
    if fragment is None:  # a project that does not exist: the server's 404
        assert code == 1 and err.strip() == (
            "Error: the server refused: 404 not_found: unknown project 'nope'"
        )
    else:
        assert code == 2, (out, err)
        assert err.startswith("Error: ") and fragment in err
        assert len(err.strip().splitlines()) == 1, err
        assert "Usage:" not in err
    assert client.silences() == []


@pytest.mark.parametrize(
    "args",
    [
        ("alerts", "list", "--limit", "0"),
        ("alerts", "list", "--state", "open"),
        ("alerts", "show", "zero"),
        ("alerts", "ack"),
        ("silences", "create", "--duration", "1h"),
        ("silences", "expire", "0"),
    ],
)
def test_bad_arguments_exit_2(env: dict[str, str], args: tuple[str, ...]) -> None:
    code, _, err = invoke(*args, env=env)
    assert code == 2 and "Error:" in err


def test_alert_verbs_explain_an_unknown_alert_and_run(
    env: dict[str, str], alerts: dict[str, int]
) -> None:
    code, _, err = invoke("alerts", "show", "999999", env=env)
    assert code == 1 and "404 not_found: unknown alert 999999" in err
    code, _, err = invoke("alerts", "list", "--run", "llm/missing", env=env)
    assert code == 1 and "unknown run llm/missing" in err


@pytest.fixture
def no_server() -> Iterator[dict[str, str]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    yield {"RUNWATCH_SERVER": f"http://127.0.0.1:{port}", "RUNWATCH_API_KEY": ""}


def test_an_unreachable_server_is_one_line(no_server: dict[str, str]) -> None:
    for args in (("alerts", "list"), ("silences", "expire", "1"), ("alerts", "ack", "1")):
        code, _, err = invoke(*args, env=no_server)
        assert code == 1 and err.startswith("Error: cannot reach http://127.0.0.1:")
