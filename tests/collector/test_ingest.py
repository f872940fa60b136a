"""Ingest: both encodings, exact NaN/Inf round trip, exactly-once storage."""

from __future__ import annotations

import math
import time

import orjson
import pytest

from runwatch import wire
from runwatch.client import Client
from tests.conftest import Collector

NONFINITE = [math.nan, math.inf, -math.inf]


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


@pytest.mark.parametrize("content_type", [wire.MSGPACK, wire.JSON])
def test_points_round_trip_exactly_with_nan_and_infinities(
    collector: Collector, client: Client, content_type: str
) -> None:
    run = client.create_run("llm", "r1")
    now = time.time()
    values = [0.5, *NONFINITE, -0.0, 1e308, 5e-324, 3]
    points = [(i, now + i, "loss", v) for i, v in enumerate(values)]
    body = wire.encode_batch(run["id"], 0, 1, points, content_type=content_type)
    reply = collector.post("/api/v1/ingest", body, content_type)
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"accepted": len(values), "duplicate": False, "commands": []}

    got = client.metrics(run["id"], "loss")
    assert not got["downsampled"]
    assert [p[0] for p in got["points"]] == list(range(len(values)))
    assert [p[1] for p in got["points"]] == [now + i for i in range(len(values))]
    for (_, _, stored), sent in zip(got["points"], values, strict=True):
        assert same(stored, float(sent)), (stored, sent)
    latest = client.latest(run["id"])["loss"]
    assert latest["step"] == len(values) - 1 and latest["value"] == 3.0


def test_json_carries_nonfinite_values_as_strings(collector: Collector, client: Client) -> None:
    run = client.create_run("llm", "r1")
    body = orjson.dumps(
        {
            "run": run["id"],
            "rank": 0,
            "seq": 0,
            "points": [
                [0, 1.0, "loss", "NaN"],
                [1, 2.0, "loss", "Infinity"],
                [2, 3.0, "loss", "-Infinity"],
            ],
        }
    )
    assert collector.post("/api/v1/ingest", body, wire.JSON).status_code == 200
    raw = collector.http.get(f"/api/v1/runs/{run['id']}/metrics", params={"key": "loss"}).json()
    assert [p[2] for p in raw["points"]] == ["NaN", "Infinity", "-Infinity"]
    series = collector.http.get(f"/api/v1/runs/{run['id']}/series").json()
    assert series[0]["last_value"] == "-Infinity"


def test_nan_is_kept_through_latest_and_downsampling(collector: Collector, client: Client) -> None:
    run = client.create_run("llm", "r1")
    client.ingest(
        run["id"], [(i, float(i), "loss", math.nan if i == 7 else 1.0) for i in range(20)], seq=0
    )
    client.ingest(run["id"], [(20, 20.0, "loss", math.nan)], seq=1)
    assert math.isnan(client.latest(run["id"])["loss"]["value"])
    got = client.metrics(run["id"], "loss", max_points=4)
    assert got["downsampled"] and got["total"] == 21
    assert sum(b["count"] for b in got["buckets"]) == 21
    assert sum(b["nan_count"] for b in got["buckets"]) == 2
    assert all(b["min"] == 1.0 for b in got["buckets"] if b["count"] > b["nan_count"])
    assert (
        math.isnan(got["buckets"][-1]["mean"])
        or got["buckets"][-1]["nan_count"] < got["buckets"][-1]["count"]
    )


def test_replayed_batch_is_acknowledged_and_not_stored_twice(
    collector: Collector, client: Client
) -> None:
    run = client.create_run("llm", "r1")
    points = [(i, float(i), "loss", 1.0 / (i + 1)) for i in range(100)]
    first = client.ingest(run["id"], points, seq=5)
    again = client.ingest(run["id"], points, seq=5)
    assert first == {"accepted": 100, "duplicate": False, "commands": []}
    assert again == {"accepted": 0, "duplicate": True, "commands": []}
    assert client.metrics(run["id"], "loss")["total"] == 100
    assert client.series(run["id"])[0]["n_points"] == 100
    # The same seq from another rank is another batch.
    assert client.ingest(run["id"], points, seq=5, rank=1)["accepted"] == 100
    assert client.metrics(run["id"], "loss", rank=1)["total"] == 100
