"""What the alert dispatcher costs, and that a flood stays a handful of messages.

Run by hand from the repository root (never from the tests or CI)::

    .venv/bin/python -m benchmarks.alerting [--runs 100] [--anomalies 10000]
        [--postgres postgresql+psycopg://postgres@127.0.0.1:5432/test] [--no-postgres]

For each database (a fresh SQLite file; a fresh PostgreSQL database, skipped with a note
if the server cannot be reached) it drives the real :class:`~runwatch.collector.alerts.Alerter`
on a clock moved by hand, with the issue's escalation policy (a Slack message, after 5 min
a text, after 15 a call, after 30 the manager) and notifiers that count what they are
given (the notifiers themselves are tested against their providers' fakes; here the
database work is measured). It prints:

- flood: ``--anomalies`` anomalies spread over ``--runs`` runs (5 kinds per run), handed
  over in groups of 1,000 as the detection thread does: signals/s of intake, the alerts
  they became, and the messages sent over the whole escalation (2 h of clock), which the
  grouping bounds to one per run and step whatever the number of anomalies;
- dedup: one detector firing 1,000 times, one signal per call: ms per signal;
- escalation round: the tick that takes the due step of every open alert and writes
  the outbox (ms), and the delivery round that sends it (ms per message).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from benchmarks.ingest import postgres_database
from runwatch.alerting.config import AlertingConfig
from runwatch.alerting.message import Message
from runwatch.collector.alert_intake import Signal
from runwatch.collector.alerts import Alerter
from runwatch.collector.storage import migrate
from runwatch.collector.storage.runs import create_or_resume
from runwatch.collector.storage.store import Store
from runwatch.collector.storage.tables import alerts
from runwatch.collector.telemetry import Telemetry
from runwatch.db import make_engine

KINDS = ("loss_spike", "grad_norm_spike", "divergence", "throughput_drop", "hang")
POLICY: dict[str, Any] = {
    "channels": {
        name: {"type": "console", "label": name} for name in ("slack", "sms", "call", "manager")
    },
    "escalations": {
        "page": {
            "steps": [
                {"notify": ["slack"]},
                {"after": "5m", "notify": ["sms"]},
                {"after": "15m", "notify": ["call"]},
                {"after": "30m", "notify": ["manager"]},
            ],
            "then": "stop",
        }
    },
    "routes": [{"escalation": "page"}],
    "resolve_after": "never",
}


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


class Counting:
    type = "console"

    def __init__(self) -> None:
        self.messages = 0
        self.alerts = 0

    def send(self, message: Message, target: str) -> str | None:
        self.messages += 1
        self.alerts += len(message.alerts)
        return None


def bench(db_url: str, runs: int, anomalies: int) -> dict[str, float]:
    engine = make_engine(db_url)
    migrate.upgrade(engine)
    store = Store(engine)
    clock = Clock()
    counters = {name: Counting() for name in POLICY["channels"]}
    alerter = Alerter(
        store,
        AlertingConfig.model_validate(POLICY),
        counters,
        Telemetry(),
        secret="bench",
        clock=clock,
        workers=4,
    )
    with store.write() as conn:
        run_ids = [create_or_resume(conn, "bench", f"run-{i}")[0].id for i in range(runs)]
    signals = [
        Signal(run_ids[i % runs], KINDS[(i // runs) % 5], "train/loss", "critical", "x", "bench", i)
        for i in range(anomalies)
    ]
    started = time.perf_counter()
    for i in range(0, len(signals), 1000):
        alerter.intake(signals[i : i + 1000])
    intake = time.perf_counter() - started

    clock.now += 31
    started = time.perf_counter()
    alerter.tick()
    tick = time.perf_counter() - started
    started = time.perf_counter()
    alerter.deliverer.deliver()
    deliver = time.perf_counter() - started
    first_round = counters["slack"].messages
    for _ in range(2 * 3600 // 10):  # the rest of the escalation, 10 s hops
        clock.now += 10
        alerter.run_once()
    sent = sum(c.messages for c in counters.values())

    dedup_run = run_ids[0]
    started = time.perf_counter()
    for step in range(1000):
        alerter.intake([Signal(dedup_run, "loss_spike", "dedup", "critical", "x", "bench", step)])
    dedup = time.perf_counter() - started
    alerter.close()
    with store.read() as conn:
        n_alerts = conn.execute(select(func.count()).select_from(alerts)).scalar_one()
    store.dispose()
    return {
        "signals_per_s": anomalies / intake,
        "alerts": n_alerts - 1,
        "messages": sent,
        "first_round_messages": first_round,
        "tick_ms": tick * 1000,
        "deliver_ms_per_message": deliver * 1000 / max(1, first_round),
        "dedup_ms": dedup,
    }


def report(name: str, found: dict[str, float], runs: int, anomalies: int) -> None:
    print(f"{name}:")
    print(
        f"  flood: {anomalies:,} anomalies over {runs} runs -> {found['alerts']:.0f} alerts, "
        f"intake {found['signals_per_s']:,.0f} signals/s"
    )
    print(
        f"  messages over the whole escalation: {found['messages']:.0f} "
        f"({found['first_round_messages']:.0f} in the first round: one per run)"
    )
    print(f"  dedup: {found['dedup_ms']:.2f} ms per signal (1,000 firings, one per call)")
    print(
        f"  first escalation round: tick {found['tick_ms']:.0f} ms for {found['alerts']:.0f} "
        f"due alerts, delivery {found['deliver_ms_per_message']:.1f} ms per message"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.alerting", description=__doc__)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--anomalies", type=int, default=10_000)
    parser.add_argument("--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'bench.db'}"
        report("SQLite", bench(url, args.runs, args.anomalies), args.runs, args.anomalies)
    if not args.no_postgres:
        with postgres_database(args.postgres) as pg:
            if pg is None:
                print(f"PostgreSQL: skipped ({args.postgres} cannot be reached)")
            else:
                report(
                    "PostgreSQL", bench(pg, args.runs, args.anomalies), args.runs, args.anomalies
                )


if __name__ == "__main__":
    main()
