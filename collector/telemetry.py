"""The collector's own metrics, exposed at ``/metrics`` for Prometheus.

Each app gets its own registry, so that several apps in one process (tests,
the demo) do not share counters.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
DETECTION_DROP_REASONS = ("queue_overflow", "shutdown", "state_unavailable")
"""Why points went to storage but not to the detectors: a closed set of label values."""


class Telemetry:
    """Counters and histograms of ingest and detection; every mutation is thread-safe."""

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
        self.anomalies = Counter(
            "runwatch_anomalies",
            "Anomalies stored, by kind and severity.",
            ["kind", "severity"],
            registry=self.registry,
        )
        self.detection_dropped = Counter(
            "runwatch_detection_dropped_points",
            "Stored points the detectors never saw, by reason "
            "(queue_overflow, shutdown, state_unavailable).",
            ["reason"],
            registry=self.registry,
        )
        for reason in DETECTION_DROP_REASONS:
            self.detection_dropped.labels(reason)  # exported as 0 before the first drop
        self.detector_errors = Counter(
            "runwatch_detector_errors",
            "Exceptions raised by detectors (the point is skipped for that run), by detector.",
            ["detector"],
            registry=self.registry,
        )
        self.detection_failures = Counter(
            "runwatch_detection_failures",
            "Failed detection work other than a detector's own errors, by operation "
            "(store_anomalies, save_state, load_state, check, feed, on_anomalies, policy, alerts).",
            ["operation"],
            registry=self.registry,
        )
        self.policy_actions = Counter(
            "runwatch_policy_actions",
            "Actions of the policy engine, by rule, action (a command type or alert) and outcome "
            "(issued, refused, error, limited; for alerts raised, or logged without a dispatcher).",
            ["rule", "action", "outcome"],
            registry=self.registry,
        )
        self.alert_signals = Counter(
            "runwatch_alert_signals",
            "Alert signals received (anomalies and raised alerts), before deduplication.",
            registry=self.registry,
        )
        self.alerts = Counter(
            "runwatch_alerts",
            "Alerts opened (deduplicated signals), by severity.",
            ["severity"],
            registry=self.registry,
        )
        self.alert_transitions = Counter(
            "runwatch_alert_transitions",
            "Alerts acknowledged or resolved by a person or by the quiet timer, by new state.",
            ["state"],
            registry=self.registry,
        )
        self.notifications = Counter(
            "runwatch_notifications",
            "Notification outcomes by channel type and outcome "
            "(sent, retried, failed, cancelled, deferred).",
            ["channel_type", "outcome"],
            registry=self.registry,
        )
        self.detection_runs = Gauge(
            "runwatch_detection_runs",
            "Runs whose detection engine is in memory.",
            registry=self.registry,
        )
