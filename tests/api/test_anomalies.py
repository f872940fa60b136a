"""``GET /api/v1/runs/{id}/anomalies``: filters, the ``after`` cursor, bad parameters, the CLI.

Anomalies are written straight into the collector's store here (the detection pipeline has
its own tests in tests/collector/test_pipeline.py), so every answer is known in advance.
Project isolation is covered with every other endpoint in tests/api/test_auth.py.
"""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from runwatch.cli import main as cli
from runwatch.client import Client, ClientError
from runwatch.collector.storage.anomalies import Found, count_anomalies, insert_anomalies
from runwatch.detectors.base import Anomaly, Severity
from runwatch.wire import MAX_ID
from tests.conftest import Collector

T0 = 1.7e9


def finding(
    kind: str, step: int, *, rank: int = 0, severity: Severity = "warning", **evidence: float
) -> Anomaly:
    return Anomaly(
        kind=kind,
        severity=severity,
        key="train/loss",
        rank=rank,
        step=step,
        score=7.5,
        detector="spike",
        message=f"{kind} at step {step}",
        evidence=evidence,
    )


@pytest.fixture
def run(collector: Collector, client: Client) -> int:
    """A run with five anomalies of two kinds, two severities and two ranks (ids 1-5)."""
    run_id = client.create_run("llm", "r")["id"]
    rows = [
        finding("loss_spike", 10, value=9.0, mean=2.0),
        finding("nonfinite_loss", 11, severity="critical", value=math.nan),
        finding("loss_spike", 20, rank=1, value=math.inf, mean=-math.inf),
        finding("grad_norm_spike", 30, steps=5),
        finding("loss_spike", 40, value=3.0),
    ]
    with collector.store.write() as conn:
        insert_anomalies(conn, [Found(run_id, T0 + a.step, a) for a in rows], T0 + 100)
    return run_id


def steps(found: list[dict[str, object]]) -> list[object]:
    return [a["step"] for a in found]


def test_anomalies_come_oldest_first_and_filter(client: Client, run: int) -> None:
    assert steps(client.anomalies(run)) == [10, 11, 20, 30, 40]
    assert steps(client.anomalies(run, kind="loss_spike")) == [10, 20, 40]
    assert steps(client.anomalies(run, severity="critical")) == [11]
    assert steps(client.anomalies(run, rank=1)) == [20]
    assert steps(client.anomalies(run, kind="loss_spike", rank=0)) == [10, 40]
    assert client.anomalies(run, kind="no_such_kind") == []
    first = client.anomalies(run)[0]
    assert first == {
        "id": 1,
        "run_id": run,
        "rank": 0,
        "key": "train/loss",
        "kind": "loss_spike",
        "severity": "warning",
        "step": 10,
        "wall_time": T0 + 10,
        "score": 7.5,
        "detector": "spike",
        "message": "loss_spike at step 10",
        "evidence": {"value": 9.0, "mean": 2.0},
        "created_at": T0 + 100,
    }


def test_after_is_a_cursor_for_polling(client: Client, run: int) -> None:
    page = client.anomalies(run, limit=2)
    assert steps(page) == [10, 11]
    page = client.anomalies(run, after=page[-1]["id"], limit=2)
    assert steps(page) == [20, 30]
    page = client.anomalies(run, after=page[-1]["id"], limit=2)
    assert steps(page) == [40]
    assert client.anomalies(run, after=page[-1]["id"]) == []
    assert client.anomalies(run, after=MAX_ID) == []  # ids are 32-bit, as run ids


def test_nonfinite_evidence_travels_as_strings(collector: Collector, run: int) -> None:
    raw = collector.http.get(f"/api/v1/runs/{run}/anomalies", params={"after": 1}).json()
    assert [a["evidence"] for a in raw[:3]] == [
        {"value": "NaN"},
        {"value": "Infinity", "mean": "-Infinity"},
        {"steps": 5.0},
    ]
    with collector.store.read() as conn:
        assert count_anomalies(conn, run) == {
            ("loss_spike", "warning"): 3,
            ("nonfinite_loss", "critical"): 1,
            ("grad_norm_spike", "warning"): 1,
        }


# (query parameters, what the 422 says); one server for all of them
BAD_PARAMS: list[tuple[dict[str, object], str]] = [
    # limit below 1, above 1000, not a number
    ({"limit": 0}, "query.limit: Input should be greater than or equal to 1"),
    ({"limit": 1001}, "query.limit: Input should be less than or equal to 1000"),
    ({"limit": "ten"}, "query.limit: Input should be a valid integer"),
    # a severity that does not exist
    ({"severity": "fatal"}, "query.severity: Input should be 'info', 'warning' or 'critical'"),
    # a negative, fractional or beyond-32-bit cursor
    ({"after": -1}, "query.after: Input should be greater than or equal to 0"),
    ({"after": "1.5"}, "query.after: Input should be a valid integer"),
    ({"after": 2**31}, "query.after: Input should be less than or equal to 2147483647"),
    ({"after": 2**70}, "query.after: Input should be less than or equal to 2147483647"),
    # a negative rank
    ({"rank": -1}, "query.rank: Input should be greater than or equal to 0"),
    # an empty or overlong kind
    ({"kind": ""}, "query.kind: String should have at least 1 character"),
    ({"kind": "k" * 65}, "query.kind: String should have at most 64 characters"),
]


def test_bad_parameters_are_422_with_a_message(collector: Collector, run: int) -> None:
    for params, message in BAD_PARAMS:
        reply = collector.http.get(f"/api/v1/runs/{run}/anomalies", params=params)
        assert reply.status_code == 422, (params, reply.text)
        body = reply.json()
        assert body["error"] == "invalid" and message in body["detail"], (params, body)


def test_an_unknown_run_is_404(collector: Collector, client: Client) -> None:
    assert collector.http.get(f"/api/v1/runs/{2**40}/anomalies").status_code == 422
    with pytest.raises(ClientError) as err:
        client.anomalies(999)
    assert err.value.status == 404 and err.value.detail == "unknown run 999"


def test_cli_lists_anomalies_as_a_table_and_as_json(collector: Collector, run: int) -> None:
    env = {"RUNWATCH_SERVER": collector.url, "RUNWATCH_API_KEY": ""}
    runner = CliRunner()
    shown = runner.invoke(cli, ["anomalies", "list", "llm/r"], env=env)
    assert shown.exit_code == 0, shown.output
    assert "loss_spike" in shown.stdout and "nonfinite_loss" in shown.stdout
    assert "5 anomalies of run" in shown.stdout
    listed = runner.invoke(
        cli, ["anomalies", "list", str(run), "--kind", "loss_spike", "--json"], env=env
    )
    assert listed.exit_code == 0, listed.output
    got = json.loads(listed.stdout)
    assert [(a["step"], a["evidence"]) for a in got] == [
        (10, {"value": 9.0, "mean": 2.0}),
        (20, {"value": "Infinity", "mean": "-Infinity"}),
        (40, {"value": 3.0}),
    ]
    critical = runner.invoke(
        cli, ["anomalies", "list", "llm/r", "--severity", "critical", "--json"], env=env
    )
    assert [a["step"] for a in json.loads(critical.stdout)] == [11]
    refused = runner.invoke(cli, ["anomalies", "list", "llm/r", "--severity", "bad"], env=env)
    assert refused.exit_code != 0 and "'bad' is not one of" in refused.stderr
    missing = runner.invoke(cli, ["anomalies", "list", "llm/missing"], env=env)
    assert missing.exit_code != 0 and "unknown run llm/missing" in missing.stderr
