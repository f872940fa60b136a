"""The collector's tables. Times are Unix seconds (float), the unit the agent sends.

``points`` is deliberately narrow: one row per observation, keyed by an
integer series id, so a batch insert is one multi-row INSERT (SQLite) or COPY
(PostgreSQL) and a range query on one series walks one index. NaN is stored
as NULL in ``points.value`` and ``series.last_value`` because SQLite cannot
store NaN (it silently turns it into NULL anyway); +/-Inf are stored natively
by both databases. :mod:`runwatch.collector.storage.points` converts both ways.

``anomalies`` holds what the detectors found; ``anomalies.evidence`` is JSON,
so its non-finite numbers are the strings ``"NaN"``, ``"Infinity"`` and
``"-Infinity"``, as on the wire. ``detector_state`` keeps one pickled
detection engine per run (see :mod:`runwatch.collector.pipeline`).

``commands`` is the control channel and its audit log at once: who issued each
command (``source``), when, when it was first delivered, how it ended, and in
``command_acks`` what every rank reported (see :mod:`runwatch.collector.control`).

``checkpoints`` is the registry of the files the agent saved; their labels are not
stored but computed when read (see :mod:`runwatch.collector.storage.checkpoints`).
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Column,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
)

from runwatch.db import metadata

projects = Table(
    "projects",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(128), nullable=False, unique=True),
    Column("created_at", Double, nullable=False),
)

runs = Table(
    "runs",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("project_id", Integer, ForeignKey("projects.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(256), nullable=False),
    Column("state", String(16), nullable=False),
    Column("config", Text, nullable=False, server_default="{}"),
    Column("created_at", Double, nullable=False),
    Column("updated_at", Double, nullable=False),
    Column("heartbeat_at", Double),
    Column("finished_at", Double),
    # Processes the trainer runs as (torch.distributed's world size), as the agent said.
    Column("world_size", Integer),
    UniqueConstraint("project_id", "name", name="uq_runs_project_id_name"),
    Index("ix_runs_project_id_state", "project_id", "state"),
)

run_tags = Table(
    "run_tags",
    metadata,
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("tag", String(128), nullable=False),
    PrimaryKeyConstraint("run_id", "tag"),
    Index("ix_run_tags_tag", "tag"),
)

series = Table(
    "series",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("key", String(256), nullable=False),
    Column("rank", Integer, nullable=False),
    Column("n_points", BigInteger, nullable=False, server_default="0"),
    Column("first_step", BigInteger),
    Column("last_step", BigInteger),
    Column("last_wall_time", Double),
    Column("last_value", Double),
    UniqueConstraint("run_id", "key", "rank", name="uq_series_run_id_key_rank"),
)

points = Table(
    "points",
    metadata,
    # No foreign key to series on purpose: PostgreSQL checks it with a trigger per
    # row, which halves COPY throughput; series ids come from the series table in
    # the same transaction, and deleting a series must delete its points itself.
    Column("series_id", Integer, nullable=False),
    Column("step", BigInteger, nullable=False),
    Column("wall_time", Double, nullable=False),
    Column("value", Double),
    # The one index: every range query is on one series. A second one on
    # (series_id, wall_time) cost ~35 % of ingest; time ranges scan the series.
    Index("ix_points_series_id_step", "series_id", "step"),
)

batches = Table(
    "batches",
    metadata,
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("rank", Integer, nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("received_at", Double, nullable=False),
    Column("n_points", Integer, nullable=False),
    PrimaryKeyConstraint("run_id", "rank", "seq"),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("project_id", Integer, ForeignKey("projects.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(128), nullable=False),
    Column("prefix", String(16), nullable=False),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("scopes", String(64), nullable=False),
    Column("created_at", Double, nullable=False),
    Column("revoked_at", Double),
)

anomalies = Table(
    "anomalies",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("rank", Integer, nullable=False),
    Column("key", String(256), nullable=False),
    Column("kind", String(64), nullable=False),
    Column("severity", String(16), nullable=False),
    Column("step", BigInteger, nullable=False),
    # The observation's wall time (the check's time for findings made of time passing).
    Column("wall_time", Double, nullable=False),
    Column("score", Double, nullable=False),
    Column("detector", String(64), nullable=False),
    Column("message", Text, nullable=False),
    Column("evidence", JSON, nullable=False),
    Column("created_at", Double, nullable=False),
    # (run_id, id): the polling query (``after`` a cursor, oldest first); (run_id, kind): filters.
    Index("ix_anomalies_run_id_id", "run_id", "id"),
    Index("ix_anomalies_run_id_kind", "run_id", "kind"),
)

detector_state = Table(
    "detector_state",
    metadata,
    Column(
        "run_id",
        Integer,
        ForeignKey("runs.id", ondelete="CASCADE"),
        primary_key=True,
        autoincrement=False,
    ),
    Column("state", LargeBinary, nullable=False),
    Column("step", BigInteger),
    Column("updated_at", Double, nullable=False),
)

commands = Table(
    "commands",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("type", String(32), nullable=False),
    Column("args", JSON, nullable=False),
    Column("at_step", BigInteger),
    # "api:<key prefix>", "api:open" (keyless loopback server) or "policy:<name>".
    Column("source", Text, nullable=False),
    Column("state", String(16), nullable=False),
    Column("created_at", Double, nullable=False),
    Column("delivered_at", Double),
    Column("finished_at", Double),
    Column("expires_at", Double, nullable=False),
    # Who cancelled it, in the form of ``source``; kept when rank 0 reports it applied anyway.
    Column("cancelled_by", Text),
    CheckConstraint(
        "state IN ('pending', 'delivered', 'applied', 'failed', 'expired', 'cancelled')",
        name="state",
    ),
    # (run_id, id): delivery and the audit listing both walk one run's commands in id order.
    Index("ix_commands_run_id_id", "run_id", "id"),
)

command_acks = Table(
    "command_acks",
    metadata,
    Column("command_id", Integer, ForeignKey("commands.id", ondelete="CASCADE"), nullable=False),
    Column("rank", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("detail", Text, nullable=False),
    Column("step", BigInteger),
    Column("acked_at", Double, nullable=False),
    PrimaryKeyConstraint("command_id", "rank"),
    CheckConstraint("status IN ('applied', 'failed', 'expired')", name="status"),
)

checkpoints = Table(
    "checkpoints",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("step", BigInteger, nullable=False),
    Column("path", Text, nullable=False),
    # SHA-256 of ``path`` in hex: a path of up to 4096 characters does not fit a PostgreSQL
    # B-tree entry (~2.7 kB), so the unique key below holds its digest instead.
    Column("path_key", String(64), nullable=False),
    Column("size_bytes", BigInteger, nullable=False),
    # Unix time the save finished, on the trainer's clock (as the points' wall times).
    Column("wall_time", Double, nullable=False),
    Column("reason", Text, nullable=False),
    Column("command_id", Integer, ForeignKey("commands.id", ondelete="SET NULL")),
    Column("created_at", Double, nullable=False),
    Column("deleted_at", Double),
    # The registration whose retention pass deleted it: a retried registration answers the
    # same ``prune`` list, so the agent that lost the first reply still deletes the files.
    Column("pruned_by", Integer),
    # A retry repeats (path, step, wall_time); a re-save of the same file after a rollback
    # (the run repeats steps) has a new wall_time and is a new checkpoint.
    UniqueConstraint(
        "run_id",
        "path_key",
        "step",
        "wall_time",
        name="uq_checkpoints_run_id_path_key_step_wall_time",
    ),
    # (run_id, id): listing newest first and the retention pass walk one run in id order.
    Index("ix_checkpoints_run_id_id", "run_id", "id"),
)

# Alerting (see runwatch.collector.alerts). ``alerts`` holds each alert's lifecycle and its
# escalation timer (``next_at``), so a restarted collector goes on where the old one stopped.
alerts = Table(
    "alerts",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("project_id", Integer, ForeignKey("projects.id", ondelete="CASCADE"), nullable=False),
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    # SHA-256 of (run, kind, key) in hex; ``open_fingerprint`` holds it while the alert is not
    # resolved, so that the database itself refuses a second open alert of one fingerprint.
    Column("fingerprint", String(64), nullable=False),
    Column("open_fingerprint", String(64), unique=True),
    Column("kind", String(80), nullable=False),
    Column("key", String(256), nullable=False),
    Column("severity", String(16), nullable=False),
    Column("summary", Text, nullable=False),
    # What raised it: ``detector``, ``policy:<rule>`` or ``api:<key prefix>``.
    Column("source", String(80), nullable=False),
    Column("state", String(16), nullable=False),
    Column("count", Integer, nullable=False),
    Column("first_seen_at", Double, nullable=False),
    Column("last_seen_at", Double, nullable=False),
    Column("first_step", BigInteger),
    Column("last_step", BigInteger),
    Column("acknowledged_at", Double),
    Column("acknowledged_by", Text),
    Column("resolved_at", Double),
    Column("resolved_by", Text),
    # The route that matched and the escalation policy it chose (None: record only).
    Column("route", String(80), nullable=False),
    Column("escalation", String(64)),
    # The escalation timer: the next step to take (of round ``esc_round``), the start of the
    # round (steps fire at ``base_at + after``) and when the dispatcher acts next.
    Column("esc_round", Integer, nullable=False, server_default="0"),
    Column("esc_step", Integer, nullable=False, server_default="0"),
    Column("base_at", Double),
    Column("next_at", Double),
    Column("notified_at", Double),
    # Quiet for resolve_after: resolved at this time (None: only by hand).
    Column("resolve_after", Double),
    Column("resolve_at", Double),
    # The silence that held its notifications at the dispatcher's last look.
    Column("silenced_by", Integer),
    CheckConstraint("state IN ('firing', 'acknowledged', 'resolved')", name="state"),
    Index("ix_alerts_next_at", "next_at"),
    Index("ix_alerts_resolve_at", "resolve_at"),
    Index("ix_alerts_run_id_id", "run_id", "id"),
    Index("ix_alerts_project_id_state_id", "project_id", "state", "id"),
)

# Every transition of an alert, with who made it: fired, acknowledged, resolved, escalated,
# silenced, unsilenced, severity.
alert_events = Table(
    "alert_events",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("alert_id", Integer, ForeignKey("alerts.id", ondelete="CASCADE"), nullable=False),
    Column("at", Double, nullable=False),
    Column("type", String(24), nullable=False),
    Column("by", Text, nullable=False),
    Column("detail", Text, nullable=False, server_default=""),
    Index("ix_alert_events_alert_id_id", "alert_id", "id"),
)

silences = Table(
    "silences",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("project_id", Integer, ForeignKey("projects.id", ondelete="CASCADE"), nullable=False),
    # {field: glob} for run (name), kind, key, severity; run_id as an exact number.
    Column("matchers", JSON, nullable=False),
    Column("starts_at", Double, nullable=False),
    Column("ends_at", Double, nullable=False),
    Column("created_by", Text, nullable=False),
    Column("comment", Text, nullable=False, server_default=""),
    Column("created_at", Double, nullable=False),
    Column("expired_by", Text),
    Index("ix_silences_project_id_ends_at", "project_id", "ends_at"),
)

# The outbox: one row per message to one target of one channel, written in the transaction
# that advances the escalation, sent (and retried) by the delivery workers.
notifications = Table(
    "notifications",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("project_id", Integer, ForeignKey("projects.id", ondelete="CASCADE"), nullable=False),
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("channel", String(64), nullable=False),
    Column("channel_type", String(16), nullable=False),
    Column("target", Text, nullable=False),
    Column("event", String(16), nullable=False),
    Column("esc_step", Integer),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("created_at", Double, nullable=False),
    Column("next_attempt_at", Double, nullable=False),
    Column("lease_until", Double),
    Column("sent_at", Double),
    Column("last_error", Text),
    Column("provider_ref", Text),
    CheckConstraint("state IN ('pending', 'sending', 'sent', 'failed', 'cancelled')", name="state"),
    Index("ix_notifications_state_next_attempt_at", "state", "next_attempt_at"),
    Index("ix_notifications_run_id_channel_target", "run_id", "channel", "target"),
)

notification_alerts = Table(
    "notification_alerts",
    metadata,
    Column(
        "notification_id",
        Integer,
        ForeignKey("notifications.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("alert_id", Integer, ForeignKey("alerts.id", ondelete="CASCADE"), nullable=False),
    PrimaryKeyConstraint("notification_id", "alert_id"),
    Index("ix_notification_alerts_alert_id", "alert_id"),
)

# The delivery log: every attempt of every notification, with its outcome.
delivery_attempts = Table(
    "delivery_attempts",
    metadata,
    Column("id", Integer, primary_key=True),
    Column(
        "notification_id",
        Integer,
        ForeignKey("notifications.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("attempt", Integer, nullable=False),
    Column("at", Double, nullable=False),
    Column("status", String(16), nullable=False),
    Column("error", Text),
    Column("duration", Double, nullable=False),
    Index("ix_delivery_attempts_notification_id_id", "notification_id", "id"),
)

# Replay guard of signed inbound requests (Slack interactivity, Twilio keypresses).
webhook_receipts = Table(
    "webhook_receipts",
    metadata,
    Column("provider", String(16), nullable=False),
    Column("nonce", String(128), nullable=False),
    Column("at", Double, nullable=False),
    PrimaryKeyConstraint("provider", "nonce"),
    Index("ix_webhook_receipts_at", "at"),
)

# Secrets the server makes itself (the key that signs acknowledge links) when none is set.
server_secrets = Table(
    "server_secrets",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", Text, nullable=False),
    Column("created_at", Double, nullable=False),
)
