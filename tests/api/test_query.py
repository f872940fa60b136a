"""Query API: runs with filters, series summaries, latest values, ranges and downsampling."""

from __future__ import annotations

import math

import numpy as np
import pytest

from runwatch.client import Client, ClientError
from tests.conftest import Collector


def test_runs_list_filters_by_project_state_and_tag(client: Client) -> None:
    a = client.create_run("vision", "a", tags=["baseline", "v1"])
    b = client.create_run("vision", "b", tags=["v1"])
    c = client.create_run("llm", "c", tags=["baseline"])
    client.finish_run(b["id"], "failed")

    def names(**filters: object) -> list[str]:
        return [r["name"] for r in client.runs(**filters)]  # type: ignore[arg-type]

    assert names() == ["c", "b", "a"]
    assert names(project="vision") == ["b", "a"]
    assert names(state="failed") == ["b"]
    assert names(state="running", project="vision") == ["a"]
    assert names(tag="baseline") == ["c", "a"]
    assert names(project="nope") == []
    assert names(limit=1, offset=1) == ["b"]
    detail = client.run(a["id"])
    assert detail["project"] == "vision" and detail["tags"] == ["baseline", "v1"]
    assert client.run(c["id"])["state"] == "running"


def test_resume_by_name_merges_config_and_tags_and_reopens(client: Client) -> None:
    first = client.create_run("llm", "long", config={"lr": 3e-4, "layers": 12}, tags=["a"])
    assert not first["resumed"]
    client.finish_run(first["id"], "crashed")
    again = client.create_run("llm", "long", config={"lr": 1e-4}, tags=["b"])
    assert again["resumed"] and again["id"] == first["id"]
    assert again["state"] == "running" and again["finished_at"] is None
    assert again["config"] == {"lr": 1e-4, "layers": 12}
    assert again["tags"] == ["a", "b"]
    assert client.create_run("llm")["name"].startswith("run-")


def test_series_and_latest_summarise_each_key_and_rank(client: Client) -> None:
    run = client.create_run("llm", "r")["id"]
    client.ingest(run, [(s, 100.0 + s, "loss", 10.0 - s) for s in range(5)], seq=0)
    client.ingest(run, [(s, 100.0 + s, "lr", 0.1) for s in range(3, 8)], seq=1)
    client.ingest(run, [(s, 100.0 + s, "sys/cpu", 50.0 + s) for s in range(2)], seq=0, rank=1)
    got = {(s["key"], s["rank"]): s for s in client.series(run)}
    assert set(got) == {("loss", 0), ("lr", 0), ("sys/cpu", 1)}
    assert got["loss", 0]["n_points"] == 5
    assert (got["lr", 0]["first_step"], got["lr", 0]["last_step"]) == (3, 7)
    assert got["sys/cpu", 1]["last_value"] == 51.0
    latest = client.latest(run)
    assert set(latest) == {"loss", "lr"}
    assert latest["loss"] == {"step": 4, "wall_time": 104.0, "value": 6.0}
    assert set(client.latest(run, keys=["lr"])) == {"lr"}
    assert client.latest(run, rank=1)["sys/cpu"]["value"] == 51.0


def test_latest_follows_wall_time_when_steps_go_back(client: Client) -> None:
    # After a rollback the step counter goes back; the newest point is still the latest.
    run = client.create_run("llm", "r")["id"]
    client.ingest(run, [(100, 1000.0, "loss", 9.0)], seq=0)
    client.ingest(run, [(90, 1001.0, "loss", 2.0)], seq=1)
    client.ingest(run, [(120, 999.0, "loss", 7.0)], seq=2)  # late, older point
    latest = client.latest(run)["loss"]
    assert (latest["step"], latest["value"]) == (90, 2.0)
    assert client.series(run)[0]["n_points"] == 3


def test_range_by_step_and_by_time_is_inclusive(client: Client) -> None:
    run = client.create_run("llm", "r")["id"]
    client.ingest(run, [(s, 1000.0 + 2 * s, "loss", float(s)) for s in range(50)], seq=0)
    by_step = client.metrics(run, "loss", start=10, end=14)
    assert [p[0] for p in by_step["points"]] == [10, 11, 12, 13, 14]
    by_time = client.metrics(run, "loss", x="time", start=1020.0, end=1024.0)
    assert [p[0] for p in by_time["points"]] == [10, 11, 12]
    assert client.metrics(run, "loss", start=60)["total"] == 0


@pytest.mark.parametrize("axis", ["step", "time"])
def test_downsampling_matches_numpy_per_bucket(client: Client, axis: str) -> None:
    rng = np.random.default_rng(0)
    n = 5_000
    steps = np.arange(n)
    times = 1.7e9 + np.cumsum(rng.uniform(0.1, 0.3, n))
    values = rng.normal(size=n)
    values[[17, 2000]] = np.nan
    values[300] = np.inf
    run = client.create_run("llm", "r")["id"]
    for seq, lo in enumerate(range(0, n, 1000)):
        batch = [
            (int(s), float(t), "loss", float(v))
            for s, t, v in zip(
                steps[lo : lo + 1000], times[lo : lo + 1000], values[lo : lo + 1000], strict=True
            )
        ]
        client.ingest(run, batch, seq=seq)
    got = client.metrics(run, "loss", x=axis, max_points=100)
    assert got["downsampled"] and got["total"] == n
    buckets = got["buckets"]
    assert 1 < len(buckets) <= 100
    assert sum(b["count"] for b in buckets) == n
    assert sum(b["nan_count"] for b in buckets) == 2
    assert [b["step_min"] for b in buckets] == sorted(b["step_min"] for b in buckets)
    for b in buckets:
        chunk = values[b["step_min"] : b["step_max"] + 1]
        assert len(chunk) == b["count"]
        finite = chunk[~np.isnan(chunk)]
        assert b["min"] == finite.min() and b["max"] == finite.max()
        if np.isinf(finite).any():
            assert b["mean"] == math.inf
        else:
            assert b["mean"] == pytest.approx(finite.mean(), rel=1e-9, abs=1e-12)


def test_large_series_downsamples_to_the_requested_bucket_count(
    collector: Collector, client: Client
) -> None:
    run = client.create_run("llm", "r")["id"]
    n, per = 200_000, 20_000
    for seq in range(n // per):
        client.ingest(
            run,
            [(s, float(s), "loss", float(s % 7)) for s in range(seq * per, (seq + 1) * per)],
            seq=seq,
        )
    got = client.metrics(run, "loss", max_points=1000)
    assert got["total"] == n and len(got["buckets"]) == 1000
    assert all(b["count"] == n // 1000 for b in got["buckets"])
    assert got["points"] == []


def test_unknown_series_and_run_answer_404(client: Client) -> None:
    run = client.create_run("llm", "r")["id"]
    with pytest.raises(ClientError) as err:
        client.metrics(run, "nope")
    assert err.value.status == 404 and "nope" in err.value.detail
    with pytest.raises(ClientError) as err:
        client.run(run + 100)
    assert err.value.status == 404


def test_openapi_documents_the_api(collector: Collector) -> None:
    spec = collector.http.get("/openapi.json").json()
    for path in ("/api/v1/ingest", "/api/v1/runs", "/api/v1/runs/{run_id}/metrics"):
        assert path in spec["paths"]
    docs = collector.http.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
