"""Sustained ingest throughput and batch latency of a real collector, SQLite and PostgreSQL.

Run by hand from the repository root (never from the tests or CI)::

    .venv/bin/python -m benchmarks.ingest [--seconds 10] [--warmup 2] [--clients 4]
        [--batch-size 1000] [--postgres postgresql+psycopg://postgres@127.0.0.1:5432/test]
        [--no-postgres] [--no-detection]

For each database (a fresh SQLite file; a fresh PostgreSQL database created on
the ``--postgres`` server and dropped afterwards, skipped with a note if that
server cannot be reached) it starts ``runwatch server`` as a separate process
on a free loopback port, creates one run per client, and has ``--clients``
processes POST msgpack batches (``runwatch.wire.encode_batch``; 20 keys x N
steps, increasing ``seq``) over keep-alive HTTP for ``--warmup`` plus
``--seconds`` seconds. It prints, per database:

- points/s: points of the batches sent in the timed window / its wall time
  (first timed send to last timed reply, over all clients);
- batches and p50/p99/max latency of one POST, timed window only;
- stored: the sum of ``n_points`` over ``/api/v1/runs/{id}/series``, which
  must equal every point the clients sent (warm-up included);
- points that skipped detection: ``runwatch_detection_dropped_points_total``
  from the collector's ``/metrics`` (0 when the detectors kept up; always 0
  with ``--no-detection``, which turns them off).

Everything is bounded: loopback only, fixed duration, and the server and the
client processes are stopped on exit, on errors and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import queue
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import httpx

from benchmarks.collector_process import collector_process
from runwatch import wire

DEFAULT_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
KEYS = [
    "train/loss",
    "train/lr",
    "train/grad_norm",
    "train/tokens_per_s",
    "train/step_time",
    "eval/loss",
    "eval/accuracy",
    "sys/gpu_util",
    "sys/gpu_mem_gb",
    "sys/cpu_util",
    *(f"layers.{i}.attn.grad_norm" for i in range(5)),
    *(f"layers.{i}.mlp.act_std" for i in range(5)),
]
READY_TIMEOUT = 60.0
LOOPBACK = ("--host", "127.0.0.1", "--log-level", "warning")


@dataclass
class ClientResult:
    warmup_points: int = 0
    first_sent: float = 0.0
    points: int = 0
    latencies: list[float] = field(default_factory=list)
    last_reply: float = 0.0
    error: str | None = None


@dataclass
class Row:
    name: str
    points_per_s: float
    batches: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    stored: int
    sent: int
    skipped_detection: int
    """Points the collector's detection thread could not keep up with (they skip detection)."""


# -- client processes --------------------------------------------------------------------------
def _client(
    index: int,
    url: str,
    run_id: int,
    batch_size: int,
    warmup: float,
    seconds: float,
    ready: Any,
    go: Event,
    start: Any,
    results: Any,
) -> None:
    """POST batches until the deadline; put one ClientResult on ``results``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    result = ClientResult()
    steps_per_batch = math.ceil(batch_size / len(KEYS))
    headers = {"Content-Type": wire.MSGPACK}
    try:
        with httpx.Client(base_url=url, timeout=30.0) as http:
            http.get("/healthz").raise_for_status()  # open the keep-alive connection
            ready.put(index)
            if not go.wait(timeout=READY_TIMEOUT):
                raise RuntimeError("no start signal")
            timed_from = start.value + warmup
            deadline = timed_from + seconds
            seq = 0
            while (now := time.monotonic()) < deadline:
                first_step = seq * steps_per_batch
                points = [
                    (step, now + 1e-3 * step, key, math.sin(step + k))
                    for step in range(first_step, first_step + steps_per_batch)
                    for k, key in enumerate(KEYS)
                ][:batch_size]
                body = wire.encode_batch(run_id, 0, seq, points)
                sent_at, sent = time.monotonic(), time.perf_counter()
                reply = http.post("/api/v1/ingest", content=body, headers=headers)
                latency = time.perf_counter() - sent
                if reply.status_code != 200 or reply.json()["accepted"] != len(points):
                    raise RuntimeError(f"batch {seq}: HTTP {reply.status_code} {reply.text[:300]}")
                seq += 1
                if sent_at >= timed_from:
                    if not result.latencies:
                        result.first_sent = sent_at
                    result.points += len(points)
                    result.latencies.append(latency)
                    result.last_reply = time.monotonic()
                else:
                    result.warmup_points += len(points)
    except Exception as exc:
        result.error = f"client {index}: {type(exc).__name__}: {exc}"
    results.put(result)


def _run_clients(url: str, run_ids: list[int], args: argparse.Namespace) -> list[ClientResult]:
    ctx = mp.get_context("spawn")
    ready = ctx.Queue()
    start = ctx.Value("d", 0.0)
    go = ctx.Event()
    results = ctx.Queue()
    timing = (args.batch_size, args.warmup, args.seconds)
    procs = [
        ctx.Process(
            target=_client,
            args=(i, url, run_id, *timing, ready, go, start, results),
            daemon=True,
        )
        for i, run_id in enumerate(run_ids)
    ]
    try:
        for proc in procs:
            proc.start()
        _wait_all(ready, procs, READY_TIMEOUT, failures=results)  # every client is connected
        start.value = time.monotonic()
        go.set()
        collected = _wait_all(results, procs, args.warmup + args.seconds + 60)
        for proc in procs:
            proc.join(5)
        errors = [r.error for r in collected if r.error]
        if errors:
            raise RuntimeError("; ".join(errors))
        return collected
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()


def _wait_all(source: Any, procs: list[Any], timeout: float, failures: Any = None) -> list[Any]:
    """One item from ``source`` per process; raise on an item in ``failures``, a death or time."""
    items: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(items) < len(procs):
        with suppress(queue.Empty):
            items.append(source.get(timeout=1.0))
            continue
        if failures is not None:
            with suppress(queue.Empty):
                raise RuntimeError(failures.get_nowait().error)
        if sum(not p.is_alive() for p in procs) > len(items) or time.monotonic() > deadline:
            raise RuntimeError("a client process died or hung")
    return items


# -- the collector process ---------------------------------------------------------------------
@contextmanager
def collector(db_url: str, workdir: Path, *, detection: bool = True) -> Iterator[str]:
    """``runwatch server`` on a free loopback port until the block ends; yields its URL."""
    env = {"RUNWATCH_DETECTION": "true" if detection else "false"}
    with collector_process(db_url, workdir / f"server-{uuid.uuid4().hex[:6]}.log", env) as url:
        yield url


@contextmanager
def postgres_database(server_url: str) -> Iterator[str | None]:
    """A fresh database on ``server_url``, dropped at the end; None if unreachable."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    base = make_url(server_url).set(drivername="postgresql+psycopg")
    admin = create_engine(base, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
    name = f"runwatch_bench_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        admin.dispose()
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        print(f"note: PostgreSQL skipped, cannot use {base.render_as_string()}: {reason}")
        yield None
        return
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


# -- one measurement ---------------------------------------------------------------------------
def measure(name: str, db_url: str, args: argparse.Namespace, workdir: Path) -> Row:
    with (
        collector(db_url, workdir, detection=not args.no_detection) as url,
        httpx.Client(base_url=url, timeout=60.0) as http,
    ):
        tag = uuid.uuid4().hex[:8]
        run_ids = [
            http.post("/api/v1/runs", json={"project": "bench", "name": f"{tag}-{i}"})
            .raise_for_status()
            .json()["id"]
            for i in range(args.clients)
        ]
        results = _run_clients(url, run_ids, args)
        stored = sum(
            s["n_points"]
            for run_id in run_ids
            for s in http.get(f"/api/v1/runs/{run_id}/series").raise_for_status().json()
        )
        skipped = _metric_sum(http.get("/metrics").text, "runwatch_detection_dropped_points_total")
    latencies = sorted(lat for r in results for lat in r.latencies)
    points = sum(r.points for r in results)
    if not latencies:
        raise RuntimeError("no batch was sent in the timed window")
    active = [r for r in results if r.latencies]
    wall = max(r.last_reply for r in active) - min(r.first_sent for r in active)
    return Row(
        name=name,
        points_per_s=points / wall,
        batches=len(latencies),
        p50_ms=1e3 * statistics.median(latencies),
        p99_ms=1e3 * statistics.quantiles(latencies, n=100, method="inclusive")[98],
        max_ms=1e3 * latencies[-1],
        stored=stored,
        sent=points + sum(r.warmup_points for r in results),
        skipped_detection=skipped,
    )


# -- entry point -------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="timed duration (10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="untimed warm-up (2)")
    parser.add_argument("--clients", type=int, default=4, help="client processes (4)")
    parser.add_argument("--batch-size", type=int, default=1000, help="points per batch (1000)")
    parser.add_argument("--postgres", default=DEFAULT_POSTGRES, help="PostgreSQL server URL")
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only")
    parser.add_argument(
        "--no-detection", action="store_true", help="run the collector with its detectors off"
    )
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.warmup < 0 or args.clients < 1 or args.batch_size < 1:
        parser.error("--seconds, --clients and --batch-size must be positive")

    print(
        f"runwatch ingest benchmark: nproc {os.cpu_count()}, python {sys.version.split()[0]}, "
        f"sqlite {sqlite3.sqlite_version}; {args.clients} clients x {args.batch_size}-point "
        f"msgpack batches, {args.warmup:g} s warm-up + {args.seconds:g} s timed, "
        f"detection {'off' if args.no_detection else 'on'}",
        flush=True,
    )
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="runwatch-bench-") as tmp:
        workdir = Path(tmp)
        rows.append(measure("sqlite", f"sqlite:///{workdir / 'bench.db'}", args, workdir))
        if not args.no_postgres:
            with postgres_database(args.postgres) as pg_url:
                if pg_url is not None:
                    rows.append(measure("postgresql", pg_url, args, workdir))
    _print_table(rows)
    return 0 if all(r.stored == r.sent for r in rows) else 1


def _metric_sum(exposition: str, name: str) -> int:
    """Sum of every sample of one counter in a Prometheus text exposition."""
    return int(
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in exposition.splitlines()
            if line.startswith((f"{name} ", f"{name}{{"))
        )
    )


def _print_table(rows: list[Row]) -> None:
    header = f"{'database':<11}{'points/s':>11}{'batches':>9}{'p50 ms':>8}{'p99 ms':>8}"
    print(header + f"{'max ms':>8}  stored/sent, points that skipped detection")
    for r in rows:
        check = "ok" if r.stored == r.sent else "MISMATCH"
        print(
            f"{r.name:<11}{r.points_per_s:>11,.0f}{r.batches:>9,}{r.p50_ms:>8.1f}{r.p99_ms:>8.1f}"
            f"{r.max_ms:>8.1f}  {r.stored:,}/{r.sent:,} {check}, {r.skipped_detection:,}"
        )


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; server and clients stopped", file=sys.stderr)
        sys.exit(130)
