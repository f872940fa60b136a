"""The agent's path to the collector: values arrive exact, outages lose nothing, the trainer
never waits. Real collectors on loopback (a thread, or a process that is SIGKILLed)."""

from __future__ import annotations

import gc
import math
import statistics
import threading
import time
import weakref
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import msgpack
import pytest
import torch

import runwatch
from runwatch.agent.spool import point_count, split_frames
from runwatch.client import Client
from tests.agent.conftest import CollectorProcess, free_port
from tests.conftest import Collector

KEYS = [f"metric/{i}" for i in range(20)]


def spooled_points(spool_dir: Path) -> int:
    return sum(
        point_count(frame)
        for path in spool_dir.rglob("*.spool")
        for frame in split_frames(path.read_bytes())
    )


def test_logged_values_arrive_exactly(collector: Collector, spool_dir: Path) -> None:
    run = runwatch.init(
        project="agent",
        name="exact",
        server=collector.url,
        spool_dir=spool_dir,
        system_interval=0,
        config={"lr": 3e-4, "path": Path("/data")},
        tags=["t1"],
    )
    values = {
        "float": 0.25,
        "int": 7,
        "bool": True,
        "nan": math.nan,
        "inf": math.inf,
        "ninf": -math.inf,
        "tensor": torch.tensor(1.5),
        "tensor_nan": torch.tensor(math.nan),
        "bf16": torch.tensor(2.0, dtype=torch.bfloat16),
        "one_elem": torch.ones(1, 1) * 3,
    }
    run.log(values, step=5)
    run.log({"float": 0.5})  # implicit step: one after the last explicit one
    assert run.flush(10)
    run.finish()
    with collector.client() as client:
        stored = client.run(run.id)
        assert stored["state"] == "finished" and stored["config"]["path"] == "/data"
        latest = client.latest(run.id)
    expected = {
        "float": 0.5,
        "int": 7.0,
        "bool": 1.0,
        "nan": math.nan,
        "inf": math.inf,
        "ninf": -math.inf,
        "tensor": 1.5,
        "tensor_nan": math.nan,
        "bf16": 2.0,
        "one_elem": 3.0,
    }
    assert set(latest) == set(expected)
    for key, value in expected.items():
        got = latest[key]["value"]
        assert got == value or (math.isnan(value) and math.isnan(got)), key
    assert latest["float"]["step"] == 6 and latest["int"]["step"] == 5


def test_bad_keys_and_values_are_dropped_and_counted_not_the_batch(
    collector: Collector, spool_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with runwatch.init(
        project="agent", name="bad", server=collector.url, spool_dir=spool_dir, system_interval=0
    ) as run:
        run.log({"good": 1.0, "x" * 300: 2.0, "bell\x07": 3.0, "text": "hello", 5: 1.0}, step=0)
        run.log({"vector": torch.ones(3)}, step=1)
        assert run.flush(10)
        assert run.stats.dropped["invalid_key"] == 3
        assert run.stats.dropped["invalid_value"] == 2
    with collector.client() as client:
        assert [s["key"] for s in client.series(run.id)] == ["good"]
    warnings = [r for r in caplog.records if r.name == "runwatch.agent"]
    assert len(warnings) == 2, [r.getMessage() for r in warnings]  # once per reason


def test_collector_killed_mid_run_every_point_arrives_once_in_order(
    collector_process: CollectorProcess, spool_dir: Path
) -> None:
    collector_process.start()
    run = runwatch.init(
        project="agent",
        name="outage",
        server=collector_process.url,
        spool_dir=spool_dir,
        system_interval=0,
        flush_interval=0.05,
        retry_window=0.3,
        batch_points=200,
    )
    steps = 600
    for step in range(steps):
        run.log({key: float(step) for key in KEYS}, step=step)
        if step == 150:
            assert run.flush(10)
            collector_process.kill()
        if step == 450:
            collector_process.start()
        time.sleep(0.002)
    assert run.flush(30), run.stats
    run.finish()
    assert run.stats.batches_spooled > 0, "the outage outlasted the retry window"
    stored = collector_process.points(run.id)
    assert len(stored) == steps * len(KEYS)
    assert Counter((key, step) for key, _, step, _, _ in stored) == Counter(
        {(key, step): 1 for key in KEYS for step in range(steps)}
    )
    per_key = [step for key, _, step, _, _ in stored if key == KEYS[0]]
    assert per_key == sorted(per_key), "batches were stored out of order"
    assert run.stats.dropped == {"queue_overflow": 0}


def test_collector_never_started_training_runs_on_and_the_spool_keeps_it(
    tmp_path: Path, spool_dir: Path
) -> None:
    port = free_port()  # nothing listens here
    with runwatch.init(project="agent", system_interval=0, disabled=True) as off:
        baseline = _loop_seconds(off)
    run = runwatch.init(
        project="agent",
        name="offline",
        server=f"http://127.0.0.1:{port}",
        spool_dir=spool_dir,
        system_interval=0,
        flush_interval=0.05,
        retry_window=0.2,
        finish_timeout=2,
    )
    watched = _loop_seconds(run)
    started = time.monotonic()
    run.finish()
    assert time.monotonic() - started < 4, "finish() outlived its deadline"
    assert run.id is None
    assert watched < baseline * 3 + 0.5, (watched, baseline)
    assert spooled_points(spool_dir) == 2000 * len(KEYS)

    # The collector comes up; the next process of the same run replays the spool first.
    collector = CollectorProcess(tmp_path / "late.db").start()
    try:
        again = runwatch.init(
            project="agent",
            name="offline",
            server=collector.url,
            spool_dir=spool_dir,
            system_interval=0,
        )
        again.log({"after": 1.0}, step=2000)
        assert again.flush(30)
        again.finish()
        assert len(collector.points(again.id)) == 2000 * len(KEYS) + 1
        assert spooled_points(spool_dir) == 0
    finally:
        collector.kill()


def _loop_seconds(run: object) -> float:
    started = time.perf_counter()
    x = torch.randn(64, 64)
    for step in range(2000):
        x = torch.tanh(x @ x.T / 64)
        run.log({key: float(step) for key in KEYS}, step=step)  # type: ignore[attr-defined]
    return time.perf_counter() - started


def test_queue_overflow_counts_drops_and_log_stays_flat(
    collector: Collector, spool_dir: Path
) -> None:
    run = runwatch.init(
        project="agent",
        name="overflow",
        server=collector.url,
        spool_dir=spool_dir,
        system_interval=0,
        flush_interval=60,
        queue_points=2_000,
        batch_points=10_000,
    )
    assert run.flush(10)  # the sender has made the run and now sleeps for flush_interval
    metrics = {key: 1.0 for key in KEYS}
    empty, full = [], []
    for step in range(5_000):
        started = time.perf_counter_ns()
        run.log(metrics, step=step)
        (empty if step < 50 else full).append(time.perf_counter_ns() - started)
    dropped = run.stats.dropped["queue_overflow"]
    assert dropped >= 5_000 * len(KEYS) - 2 * 2_000
    assert statistics.median(full[-500:]) < 5 * statistics.median(empty) + 20_000
    run.finish()
    assert run.stats.points_sent + dropped == 5_000 * len(KEYS), "every point sent or counted"


class _FlakyCollector(BaseHTTPRequestHandler):
    """Answers /runs like a collector and the first ingests with the configured failures."""

    script: ClassVar[list[tuple[int, dict[str, str]]]] = []
    seen: ClassVar[list[dict[str, object]]] = []
    hang_after: ClassVar[int | None] = None
    """After this many ingests, hold every request for a minute (a stuck collector)."""

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/api/v1/runs":
            self._reply(200, b'{"id": 9, "resumed": false}')
            return
        if self.path.endswith("/finish"):
            self._reply(200, b"{}")
            return
        if self.hang_after is not None and len(self.seen) >= self.hang_after:
            time.sleep(60)
            return
        status, headers = self.script.pop(0) if self.script else (200, {})
        self.seen.append({"status": status, **msgpack.unpackb(body)})
        self._reply(status, b'{"error": "x", "detail": "scripted"}', headers)

    def _reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def flaky() -> Iterator[tuple[str, type[_FlakyCollector]]]:
    handler = type("Flaky", (_FlakyCollector,), {"script": [], "seen": [], "hang_after": None})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", handler
    finally:
        server.shutdown()
        server.server_close()


def test_5xx_and_429_are_retried_and_4xx_dropped(
    flaky: tuple[str, type[_FlakyCollector]], spool_dir: Path
) -> None:
    url, handler = flaky
    handler.script += [(503, {}), (429, {"Retry-After": "0.2"}), (500, {})]
    run = runwatch.init(
        project="agent",
        name="flaky",
        server=url,
        spool_dir=spool_dir,
        system_interval=0,
        flush_interval=0.05,
    )
    run.log({"a": 1.0}, step=0)
    assert run.flush(20)
    attempts = [s for s in handler.seen if s["points"]]
    assert [s["status"] for s in attempts] == [503, 429, 500, 200]
    assert len({s["seq"] for s in attempts}) == 1, "a retry must resend the same seq"
    handler.script += [(413, {}), (422, {})]
    run.log({"b": 1.0}, step=1)
    assert run.flush(10)
    run.log({"c": 1.0}, step=2)
    assert run.flush(10)
    run.finish()
    assert run.stats.dropped["payload_too_large"] == 1
    assert run.stats.dropped["rejected"] == 1
    assert run.stats.points_sent == 1


def test_heartbeats_flow_while_no_step_completes(collector: Collector, spool_dir: Path) -> None:
    run = runwatch.init(
        project="agent",
        name="hb",
        server=collector.url,
        spool_dir=spool_dir,
        system_interval=0,
        heartbeat_interval=0.1,
        flush_interval=0.05,
    )
    run.log({"loss": 1.0}, step=0)
    assert run.flush(10)
    with Client(collector.url) as client:
        first = client.run(run.id)["heartbeat_at"]
        time.sleep(0.6)  # a hung step: nothing logged
        later = client.run(run.id)["heartbeat_at"]
        assert later > first + 0.2
        assert client.series(run.id)[0]["n_points"] == 1
    run.finish()


def test_finish_is_bounded_when_the_collector_hangs(spool_dir: Path) -> None:
    with SilentServer() as url:
        run = runwatch.init(
            project="agent",
            name="hang",
            server=url,
            spool_dir=spool_dir,
            system_interval=0,
            finish_timeout=1.0,
            request_timeout=30,
        )
        run.log({"a": 1.0}, step=0)
        started = time.monotonic()
        run.finish()
        assert time.monotonic() - started < 3.5


class SilentServer:
    """Accepts connections and reads, never replies: a collector stuck in a GC pause."""

    def __enter__(self) -> str:
        import socket

        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}"

    def __exit__(self, *_: object) -> None:
        self._sock.close()


def test_disabled_run_costs_nothing_and_sends_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNWATCH_DISABLED", "1")
    with runwatch.init(project="agent") as run:
        run.log({"a": 1.0})
        assert run.id is None and run.flush()


def test_bad_options_are_refused_at_init() -> None:
    with pytest.raises(ValueError, match="project"):
        runwatch.init()
    with pytest.raises(ValueError, match="flush_interval"):
        runwatch.init(project="p", flush_interval=0)
    with pytest.raises(ValueError, match="server"):
        runwatch.init(project="p", server="127.0.0.1:8000")


class _Marker:
    """Something the autograd graph holds, so that the test can see when the graph is gone."""


class _HoldMarker(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, marker: _Marker) -> torch.Tensor:
        ctx.marker = marker  # lives exactly as long as the graph node
        return x * 2

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * 2, None


def test_a_logged_loss_does_not_keep_its_graph_alive(spool_dir: Path) -> None:
    run = runwatch.init(
        project="agent",
        name="graph",
        server=f"http://127.0.0.1:{free_port()}",
        spool_dir=spool_dir,
        system_interval=0,
        flush_interval=60,
        retry_window=60,
    )
    marker = _Marker()
    alive = weakref.ref(marker)
    loss = _HoldMarker.apply(torch.randn(1000, requires_grad=True), marker).sum()
    del marker
    run.log({"train/loss": loss})  # queued, not yet read: the sender sleeps for a minute
    del loss
    gc.collect()
    assert alive() is None, "the queued loss kept the step's graph (and its activations) alive"
    run.finish()


def test_values_no_check_foresaw_are_dropped_not_the_sender(
    collector: Collector, spool_dir: Path
) -> None:
    run = runwatch.init(
        project="agent",
        name="poison",
        server=collector.url,
        spool_dir=spool_dir,
        system_interval=0,
    )
    run.log({"huge": 10**400, "text": "1.0", "none": None, "ok": 1.0}, step=0)
    run.log({"ok": 2.0}, step=-1)
    run.log({"ok": 3.0}, step=2**64)
    run.log({"ok": 4.0}, step=1)
    assert run.flush(10)
    run.finish()
    assert run.stats.dropped["invalid_value"] == 3
    assert run.stats.dropped["invalid_step"] == 2
    assert _values_of(collector, run.id, "ok") == {0: 1.0, 1: 4.0}
    again = runwatch.init(  # a later run in the same process is not affected
        project="agent",
        name="after-poison",
        server=collector.url,
        spool_dir=spool_dir,
        system_interval=0,
    )
    again.log({"ok": 5.0}, step=0)
    assert again.flush(10)
    again.finish()


def _values_of(collector: Collector, run_id: int | None, key: str) -> dict[int, float]:
    assert run_id is not None
    with collector.client() as client:
        return {s: v for s, _, v in client.metrics(run_id, key)["points"]}


def test_finish_is_bounded_when_the_collector_stops_answering_mid_run(
    flaky: tuple[str, type[_FlakyCollector]], spool_dir: Path
) -> None:
    url, handler = flaky
    handler.hang_after = 1  # the first ingest is answered, then the collector hangs
    run = runwatch.init(
        project="agent",
        name="hang-later",
        server=url,
        spool_dir=spool_dir,
        system_interval=0,
        flush_interval=0.05,
        request_timeout=30,
        finish_timeout=1.0,
    )
    run.log({"a": 1.0}, step=0)
    assert run.flush(10)
    run.log({"a": 2.0}, step=1)
    started = time.monotonic()
    run.finish()
    assert time.monotonic() - started < 3
    assert spooled_points(spool_dir) + run.stats.dropped.get("finish_timeout", 0) == 1
