"""Detection: every stored point reaches its run's detectors; anomalies are stored and served.

The first half drives a real collector over HTTP and polls the anomalies endpoint (detection
runs off the request, so nothing is there the instant ingest answers). The second half
drives :class:`DetectionPipeline` directly, with fake detectors and an injected clock.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, TypeVar

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from runwatch import wire
from runwatch.client import Client
from runwatch.collector.batch import Batch
from runwatch.collector.pipeline import DetectionPipeline
from runwatch.collector.storage.anomalies import AnomalyFilter, list_anomalies
from runwatch.collector.storage.detector_state import Snapshot, load_state, save_states
from runwatch.collector.storage.runs import create_or_resume
from runwatch.collector.storage.store import Store
from runwatch.collector.telemetry import Telemetry
from runwatch.detectors.base import Anomaly, RunDetector, SeriesDetector
from runwatch.detectors.engine import Engine, Rule, RunRule
from runwatch.detectors.nonfinite import NonFinite
from tests.conftest import Collector, start_collector

INGEST = "/api/v1/ingest"
FAST = {"detector_check_seconds": 0.05, "detector_snapshot_seconds": 0.1}
POLL_TIMEOUT = 10.0
LOSS = "train/loss"
T0 = 1.7e9

R = TypeVar("R")


def eventually(fetch: Callable[[], R], done: Callable[[R], bool], what: str) -> R:
    """Poll ``fetch`` until ``done`` holds, for at most :data:`POLL_TIMEOUT` seconds."""
    deadline = time.monotonic() + POLL_TIMEOUT
    while True:
        got = fetch()
        if done(got):
            return got
        assert time.monotonic() < deadline, f"{what} did not happen; last seen: {got!r}"
        time.sleep(0.02)


def smooth_loss(steps: range, seed: int = 0) -> list[tuple[int, float, str, float]]:
    """A slowly falling loss with 1 % noise: nothing a spike detector should flag."""
    rng = np.random.default_rng(seed)
    return [
        (s, T0 + s, LOSS, float(3.0 * math.exp(-s / 400) * (1 + 0.01 * rng.standard_normal())))
        for s in steps
    ]


def kinds_and_steps(found: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return [(a["kind"], a["step"]) for a in found]


def wait_for_anomalies(client: Client, run: int, n: int, **filters: Any) -> list[dict[str, Any]]:
    return eventually(
        lambda: client.anomalies(run, **filters), lambda found: len(found) >= n, f"{n} anomalies"
    )


@pytest.fixture
def collector(db_url: str) -> Iterator[Collector]:
    yield from start_collector(db_url, **FAST)


# -- through the collector -------------------------------------------------------------
def test_a_nan_loss_is_an_anomaly_in_the_api_and_in_metrics(
    collector: Collector, client: Client
) -> None:
    run = client.create_run("llm", "r")["id"]
    points = [(0, T0, LOSS, 2.0), (1, T0 + 1, LOSS, math.nan), (2, T0 + 2, LOSS, math.nan)]
    body = wire.encode_batch(run, 0, 0, points, content_type=wire.JSON)
    assert collector.post(INGEST, body, wire.JSON).status_code == 200
    (found,) = wait_for_anomalies(client, run, 1)
    assert (found["kind"], found["severity"], found["step"]) == ("nonfinite_loss", "critical", 1)
    assert (found["key"], found["rank"], found["wall_time"]) == (LOSS, 0, T0 + 1)
    assert found["detector"] == "nonfinite" and "NaN" in found["message"]
    assert math.isnan(found["evidence"]["value"])
    raw = collector.http.get(f"/api/v1/runs/{run}/anomalies").json()
    assert raw[0]["evidence"] == {"value": "NaN"}  # as on the wire

    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(collector.http.get("/metrics").text)
        for s in family.samples
    }
    kind = (("kind", "nonfinite_loss"), ("severity", "critical"))
    assert samples["runwatch_anomalies_total", kind] == 1.0
    overflow = (("reason", "queue_overflow"),)
    assert samples["runwatch_detection_dropped_points_total", overflow] == 0.0


def test_a_loss_spike_after_100_smooth_steps_is_found_at_its_step(client: Client) -> None:
    run = client.create_run("llm", "r")["id"]
    client.ingest(run, smooth_loss(range(100)), seq=0)
    after = smooth_loss(range(100, 110), seed=1)
    after[3] = (103, T0 + 103, LOSS, 25.0)
    after.append((110, T0 + 110, LOSS, math.nan))  # the last finding: detection got this far
    client.ingest(run, after, seq=1)
    found = wait_for_anomalies(client, run, 2)
    assert kinds_and_steps(found) == [("loss_spike", 103), ("nonfinite_loss", 110)]
    spike = found[0]
    assert spike["severity"] == "warning" and spike["wall_time"] == T0 + 103
    assert spike["evidence"]["value"] == 25.0 and spike["score"] >= 6


def test_a_replayed_batch_yields_no_second_anomaly(collector: Collector, client: Client) -> None:
    run = client.create_run("llm", "r")["id"]
    # Fed twice, this batch would report its NaN twice (a finite value ends the episode).
    first = [(0, T0, LOSS, 2.0), (1, T0 + 1, LOSS, math.nan)]
    assert client.ingest(run, first, seq=0)["duplicate"] is False
    wait_for_anomalies(client, run, 1)
    assert client.ingest(run, first, seq=0)["duplicate"] is True
    client.ingest(run, [(2, T0 + 2, LOSS, 2.0), (3, T0 + 3, LOSS, math.inf)], seq=1)
    found = wait_for_anomalies(client, run, 2)
    assert kinds_and_steps(found) == [("nonfinite_loss", 1), ("nonfinite_loss", 3)]
    assert found[1]["evidence"]["value"] == math.inf


def test_detector_state_survives_a_restart_without_a_new_warm_up(db_url: str) -> None:
    # First life: no periodic snapshot, so only the one taken at shutdown can carry the state.
    for collector in start_collector(db_url, detector_snapshot_seconds=3600):
        with collector.client() as client:
            run = client.create_run("llm", "long")["id"]
            client.ingest(run, smooth_loss(range(100)), seq=0)
        pipeline = collector.thread.app.state.pipeline
        assert pipeline.wait_idle(POLL_TIMEOUT)
        with collector.store.read() as conn:
            assert load_state(conn, run) is None
    for collector in start_collector(db_url, **FAST):
        with collector.store.read() as conn:
            saved = load_state(conn, run)
        assert saved is not None and saved.step == 99
        with collector.client() as client:
            # A spike as the very first point after the restart: a fresh engine (still
            # warming up) would say nothing, as the control run shows.
            client.ingest(run, [(100, T0 + 100, LOSS, 25.0)], seq=1)
            fresh = client.create_run("llm", "fresh")["id"]
            client.ingest(fresh, [(0, T0, LOSS, 25.0), (1, T0 + 1, LOSS, math.nan)], seq=0)
            assert kinds_and_steps(wait_for_anomalies(client, run, 1)) == [("loss_spike", 100)]
            assert kinds_and_steps(wait_for_anomalies(client, fresh, 1)) == [("nonfinite_loss", 1)]


def test_state_is_saved_periodically_and_ended_runs_leave_memory(
    collector: Collector, client: Client
) -> None:
    run = client.create_run("llm", "r")["id"]
    client.ingest(run, smooth_loss(range(50)), seq=0)

    def saved() -> Snapshot | None:
        with collector.store.read() as conn:
            return load_state(conn, run)

    snapshot = eventually(saved, lambda s: s is not None and s.step == 49, "a periodic snapshot")
    assert snapshot is not None
    assert Engine.restore(snapshot.state).observe(LOSS, 0, 50, math.nan, T0)  # still an engine

    def engines_in_memory() -> float:
        for family in text_string_to_metric_families(collector.http.get("/metrics").text):
            if family.name == "runwatch_detection_runs":
                return family.samples[0].value
        raise AssertionError("no runwatch_detection_runs")

    assert engines_in_memory() == 1
    client.finish_run(run)
    eventually(engines_in_memory, lambda n: n == 0, "the finished run's engine to be dropped")


def test_detection_can_be_switched_off(db_url: str) -> None:
    for collector in start_collector(db_url, detection=False):
        assert collector.thread.app.state.pipeline is None
        with collector.client() as client:
            run = client.create_run("llm", "r")["id"]
            client.ingest(run, [(0, T0, LOSS, math.nan)], seq=0)
            assert client.anomalies(run) == []
        assert "runwatch_anomalies_total{" not in collector.http.get("/metrics").text


# -- the pipeline on its own -------------------------------------------------------------
class Clock:
    """Wall time that moves only when told to."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def new_run(store: Store, name: str = "r") -> int:
    with store.write() as conn:
        return create_or_resume(conn, "p", name)[0].id


def batch(run: int, values: list[float], *, key: str = LOSS, rank: int = 0, seq: int = 0) -> Batch:
    steps = list(range(len(values)))
    return Batch(
        run=run,
        rank=rank,
        seq=seq,
        steps=steps,
        wall_times=[T0 + s for s in steps],
        keys=[key] * len(values),
        values=[None if math.isnan(v) else v for v in values],
    )


def heartbeat(run: int, rank: int) -> Batch:
    return Batch(run=run, rank=rank, seq=0, steps=[], wall_times=[], keys=[], values=[])


def stored(store: Store, run: int) -> list[tuple[str, int, int, float]]:
    with store.read() as conn:
        found = list_anomalies(conn, run, AnomalyFilter(limit=1000))
    return [(a.kind, a.rank, a.step, a.wall_time) for a in found]


class Exploding(SeriesDetector):
    """Raises on the value 13; otherwise quiet."""

    name = "exploding"

    def update(self, step: int, value: float, wall_time: float) -> Anomaly | None:
        if value == 13.0:
            raise ZeroDivisionError("unlucky")
        return None


class SilentRank(RunDetector):
    """Reports each rank whose last heartbeat is more than 60 s old, and remembers every call."""

    name = "silent_rank"
    patterns = ("no/such/key",)
    calls: ClassVar[list[tuple[float, dict[int, float]]]] = []

    def __init__(self) -> None:
        self._reported: set[int] = set()

    def check(self, now: float, heartbeats: dict[int, float]) -> list[Anomaly]:
        SilentRank.calls.append((now, heartbeats))
        found = []
        for rank, seen in sorted(heartbeats.items()):
            if now - seen > 60 and rank not in self._reported:
                self._reported.add(rank)
                found.append(
                    self.anomaly("rank_silent", "critical", "", rank, 0, now - seen, "silent")
                )
        return found


def test_heartbeat_only_batches_give_checks_per_rank_receive_times(store: Store) -> None:
    run = new_run(store)
    clock = Clock()
    SilentRank.calls.clear()
    pipeline = DetectionPipeline(
        store,
        Telemetry(),
        check_seconds=0.02,
        engine_factory=lambda: Engine([], [RunRule(SilentRank)]),
        clock=clock,
    )
    try:
        assert pipeline.submit(heartbeat(run, 0)) and pipeline.submit(heartbeat(run, 1))
        assert pipeline.wait_idle(POLL_TIMEOUT)
        clock.now = T0 + 50
        pipeline.submit(heartbeat(run, 0))
        pipeline.submit(batch(run, [1.0]), stored=False)  # a replay: alive, nothing to feed
        assert pipeline.wait_idle(POLL_TIMEOUT)
        clock.now = T0 + 100  # rank 1 silent for 100 s, rank 0 for 50 s
        eventually(lambda: stored(store, run), bool, "a silent-rank anomaly")
        assert stored(store, run) == [("rank_silent", 1, 0, T0 + 100)]
        assert SilentRank.calls[-1][1] == {0: T0 + 50, 1: T0}
    finally:
        pipeline.close()


def test_a_failing_detector_costs_its_point_and_is_logged_once(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    run = new_run(store)
    telemetry = Telemetry()
    pipeline = DetectionPipeline(
        store,
        telemetry,
        engine_factory=lambda: Engine(
            [Rule("x", Exploding), Rule("x", NonFinite, {"kind": "nonfinite_x"})]
        ),
    )
    try:
        with caplog.at_level(logging.DEBUG, "runwatch.collector.detection"):
            pipeline.submit(batch(run, [1.0, 13.0, 13.0, math.nan, 2.0, 13.0], key="x"))
            assert pipeline.wait_idle(POLL_TIMEOUT)
        assert pipeline.is_alive
        assert [(k, s) for k, _, s, _ in stored(store, run)] == [("nonfinite_x", 3)]
        assert telemetry.detector_errors.labels("exploding")._value.get() == 3
        logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(logged) == 1 and "detector exploding raised ZeroDivisionError" in logged[0]
    finally:
        pipeline.close()


def test_a_full_queue_drops_from_detection_and_counts(store: Store) -> None:
    run = new_run(store)
    telemetry = Telemetry()
    pipeline = DetectionPipeline(store, telemetry, max_queued_points=10)
    try:
        assert not pipeline.submit(batch(run, [1.0] * 11))
        assert telemetry.detection_dropped.labels("queue_overflow")._value.get() == 11
        assert pipeline.submit(batch(run, [1.0] * 10))
    finally:
        pipeline.close()
    assert not pipeline.submit(batch(run, [1.0] * 3))
    assert telemetry.detection_dropped.labels("shutdown")._value.get() == 3


def test_evicted_engines_are_saved_and_close_saves_the_rest(store: Store) -> None:
    first, second = new_run(store, "a"), new_run(store, "b")
    pipeline = DetectionPipeline(store, Telemetry(), snapshot_seconds=3600, max_engines=1)
    try:
        pipeline.submit(batch(first, [1.0, 2.0]))
        pipeline.submit(batch(second, [1.0, 2.0, 3.0]))
        assert pipeline.wait_idle(POLL_TIMEOUT)
        with store.read() as conn:
            assert load_state(conn, first) is not None  # evicted by the second run
            assert load_state(conn, second) is None
    finally:
        pipeline.close()
    with store.read() as conn:
        saved = load_state(conn, second)
    assert saved is not None and saved.step == 2


def test_an_unreadable_snapshot_means_fresh_detectors(store: Store) -> None:
    run = new_run(store)
    with store.write() as conn:
        save_states(conn, [Snapshot(run, b"not a pickle", 7, T0)])
    telemetry = Telemetry()
    pipeline = DetectionPipeline(store, telemetry)
    try:
        pipeline.submit(batch(run, [1.0, math.nan]))
        assert pipeline.wait_idle(POLL_TIMEOUT)
    finally:
        pipeline.close()
    assert [k for k, *_ in stored(store, run)] == ["nonfinite_loss"]
    assert telemetry.detection_failures.labels("load_state")._value.get() == 1


def test_detection_never_answers_503(collector: Collector) -> None:
    # Detection is off the request path: a queue that takes nothing still stores the batch.
    pipeline = collector.thread.app.state.pipeline
    pipeline.max_queued_points = 0
    run = collector.http.post("/api/v1/runs", json={"project": "p", "name": "r"}).json()["id"]
    body = wire.encode_batch(run, 0, 0, [(0, T0, LOSS, math.nan)])
    reply = collector.post(INGEST, body, wire.MSGPACK)
    assert reply.status_code == 200 and reply.json()["accepted"] == 1
    assert pipeline.telemetry.detection_dropped.labels("queue_overflow")._value.get() == 1
