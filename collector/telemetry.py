"""The collector's own metrics, exposed at ``/metrics`` for Prometheus.

Each app gets its own registry, so that several apps in one process (tests,
the demo) do not share counters.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Telemetry:
    """Counters and histograms of ingest; every mutation is thread-safe (prometheus-client)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.points = Counter("runwatch_ingest_points", "Points stored.", registry=self.registry)
        self.batches = Counter(
            "runwatch_ingest_batches",
            "Ingest batches acknowledged, by result (stored or duplicate).",
            ["result"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "runwatch_ingest_rejected",
            "Ingest requests rejected, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.ingest_latency = Histogram(
            "runwatch_ingest_latency_seconds",
            "Time from request to reply for ingest batches that were acknowledged.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.db_write = Histogram(
            "runwatch_db_write_seconds",
            "Time of one write transaction (a group of batches committed together).",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
