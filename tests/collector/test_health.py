"""Probes and the collector's own Prometheus metrics."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text
from sqlalchemy.engine import make_url

from runwatch import wire
from runwatch.client import Client
from runwatch.db import make_engine
from tests.conftest import Collector, scratch_postgres_database, start_collector


def scrape(collector: Collector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    reply = collector.http.get("/metrics")
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(reply.text)
        for sample in family.samples
    }


def test_probes_answer(collector: Collector) -> None:
    assert collector.http.get("/healthz").json() == {"status": "ok"}
    assert collector.http.get("/readyz").json() == {"status": "ready"}


def test_readyz_fails_when_the_sqlite_file_is_gone(tmp_path: Path) -> None:
    path = tmp_path / "runwatch.db"
    for collector in start_collector(f"sqlite:///{path}"):
        assert collector.http.get("/readyz").status_code == 200
        collector.store.engine.dispose()
        for leftover in tmp_path.glob("runwatch.db*"):
            leftover.unlink()
        path.mkdir()  # a directory where the database file was: cannot be opened
        reply = collector.http.get("/readyz")
        assert reply.status_code == 503
        assert reply.json()["error"] == "unavailable"
        assert collector.http.get("/healthz").status_code == 200


@pytest.mark.postgres
def test_readyz_fails_when_the_postgres_database_is_dropped() -> None:
    with scratch_postgres_database() as url:
        for collector in start_collector(url):
            assert collector.http.get("/readyz").status_code == 200
            admin = make_engine(
                make_url(url).set(database="postgres").render_as_string(hide_password=False),
                isolation_level="AUTOCOMMIT",
            )
            with admin.connect() as conn:
                name = make_url(url).database
                conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
            admin.dispose()
            reply = collector.http.get("/readyz")
            assert reply.status_code == 503
            assert reply.json()["error"] == "unavailable"


def test_metrics_count_points_batches_rejects_and_latency(
    collector: Collector, client: Client
) -> None:
    run = client.create_run("llm", "r")["id"]
    client.ingest(run, [(s, float(s), "loss", math.nan) for s in range(10)], seq=0)
    client.ingest(run, [(s, float(s), "loss", 1.0) for s in range(10)], seq=0)  # replay
    collector.post("/api/v1/ingest", b"\x85\xa3run", wire.MSGPACK)  # truncated
    collector.post("/api/v1/ingest", b"{}", "text/plain")
    got = scrape(collector)
    assert got["runwatch_ingest_points_total", ()] == 10
    assert got["runwatch_ingest_batches_total", (("result", "stored"),)] == 1
    assert got["runwatch_ingest_batches_total", (("result", "duplicate"),)] == 1
    assert got["runwatch_ingest_rejected_total", (("reason", "malformed_body"),)] == 1
    assert got["runwatch_ingest_rejected_total", (("reason", "unsupported_media_type"),)] == 1
    assert got["runwatch_ingest_latency_seconds_count", ()] == 2
    assert got["runwatch_db_write_seconds_count", ()] == 2
    assert got["runwatch_db_write_seconds_sum", ()] > 0
