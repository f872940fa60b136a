"""add alerts, silences, notifications and the delivery log

Revision ID: d3378596d184
Revises: 984a47ecba08
Create Date: 2026-11-30 09:04:45.624172
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "d3378596d184"
down_revision: str | None = "984a47ecba08"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "server_secrets",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_server_secrets")),
    )
    op.create_table(
        "webhook_receipts",
        sa.Column("provider", sa.String(length=16), nullable=False),
        sa.Column("nonce", sa.String(length=128), nullable=False),
        sa.Column("at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("provider", "nonce", name=op.f("pk_webhook_receipts")),
    )
    with op.batch_alter_table("webhook_receipts", schema=None) as batch_op:
        batch_op.create_index("ix_webhook_receipts_at", ["at"], unique=False)

    op.create_table(
        "silences",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("matchers", sa.JSON(), nullable=False),
        sa.Column("starts_at", sa.Double(), nullable=False),
        sa.Column("ends_at", sa.Double(), nullable=False),
        sa.Column("created_by", sa.Text(), nullable=False),
        sa.Column("comment", sa.Text(), server_default="", nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("expired_by", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["projects.id"],
            name=op.f("fk_silences_project_id_projects"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_silences")),
    )
    with op.batch_alter_table("silences", schema=None) as batch_op:
        batch_op.create_index(
            "ix_silences_project_id_ends_at", ["project_id", "ends_at"], unique=False
        )

    op.create_table(
        "alerts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("open_fingerprint", sa.String(length=64), nullable=True),
        sa.Column("kind", sa.String(length=80), nullable=False),
        sa.Column("key", sa.String(length=256), nullable=False),
        sa.Column("severity", sa.String(length=16), nullable=False),
        sa.Column("summary", sa.Text(), nullable=False),
        sa.Column("source", sa.String(length=80), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("first_seen_at", sa.Double(), nullable=False),
        sa.Column("last_seen_at", sa.Double(), nullable=False),
        sa.Column("first_step", sa.BigInteger(), nullable=True),
        sa.Column("last_step", sa.BigInteger(), nullable=True),
        sa.Column("acknowledged_at", sa.Double(), nullable=True),
        sa.Column("acknowledged_by", sa.Text(), nullable=True),
        sa.Column("resolved_at", sa.Double(), nullable=True),
        sa.Column("resolved_by", sa.Text(), nullable=True),
        sa.Column("route", sa.String(length=80), nullable=False),
        sa.Column("escalation", sa.String(length=64), nullable=True),
        sa.Column("esc_round", sa.Integer(), server_default="0", nullable=False),
        sa.Column("esc_step", sa.Integer(), server_default="0", nullable=False),
        sa.Column("base_at", sa.Double(), nullable=True),
        sa.Column("next_at", sa.Double(), nullable=True),
        sa.Column("notified_at", sa.Double(), nullable=True),
        sa.Column("resolve_after", sa.Double(), nullable=True),
        sa.Column("resolve_at", sa.Double(), nullable=True),
        sa.Column("silenced_by", sa.Integer(), nullable=True),
        sa.CheckConstraint(
            "state IN ('firing', 'acknowledged', 'resolved')", name=op.f("ck_alerts_state")
        ),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["projects.id"],
            name=op.f("fk_alerts_project_id_projects"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_alerts_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alerts")),
        sa.UniqueConstraint("open_fingerprint", name=op.f("uq_alerts_open_fingerprint")),
    )
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.create_index("ix_alerts_next_at", ["next_at"], unique=False)
        batch_op.create_index(
            "ix_alerts_project_id_state_id", ["project_id", "state", "id"], unique=False
        )
        batch_op.create_index("ix_alerts_resolve_at", ["resolve_at"], unique=False)
        batch_op.create_index("ix_alerts_run_id_id", ["run_id", "id"], unique=False)

    op.create_table(
        "notifications",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("channel", sa.String(length=64), nullable=False),
        sa.Column("channel_type", sa.String(length=16), nullable=False),
        sa.Column("target", sa.Text(), nullable=False),
        sa.Column("event", sa.String(length=16), nullable=False),
        sa.Column("esc_step", sa.Integer(), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("next_attempt_at", sa.Double(), nullable=False),
        sa.Column("lease_until", sa.Double(), nullable=True),
        sa.Column("sent_at", sa.Double(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("provider_ref", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "state IN ('pending', 'sending', 'sent', 'failed', 'cancelled')",
            name=op.f("ck_notifications_state"),
        ),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["projects.id"],
            name=op.f("fk_notifications_project_id_projects"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_notifications_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_notifications")),
    )
    with op.batch_alter_table("notifications", schema=None) as batch_op:
        batch_op.create_index(
            "ix_notifications_run_id_channel_target", ["run_id", "channel", "target"], unique=False
        )
        batch_op.create_index(
            "ix_notifications_state_next_attempt_at", ["state", "next_attempt_at"], unique=False
        )

    op.create_table(
        "alert_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("alert_id", sa.Integer(), nullable=False),
        sa.Column("at", sa.Double(), nullable=False),
        sa.Column("type", sa.String(length=24), nullable=False),
        sa.Column("by", sa.Text(), nullable=False),
        sa.Column("detail", sa.Text(), server_default="", nullable=False),
        sa.ForeignKeyConstraint(
            ["alert_id"],
            ["alerts.id"],
            name=op.f("fk_alert_events_alert_id_alerts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alert_events")),
    )
    with op.batch_alter_table("alert_events", schema=None) as batch_op:
        batch_op.create_index("ix_alert_events_alert_id_id", ["alert_id", "id"], unique=False)

    op.create_table(
        "delivery_attempts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("notification_id", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("at", sa.Double(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("duration", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(
            ["notification_id"],
            ["notifications.id"],
            name=op.f("fk_delivery_attempts_notification_id_notifications"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_delivery_attempts")),
    )
    with op.batch_alter_table("delivery_attempts", schema=None) as batch_op:
        batch_op.create_index(
            "ix_delivery_attempts_notification_id_id", ["notification_id", "id"], unique=False
        )

    op.create_table(
        "notification_alerts",
        sa.Column("notification_id", sa.Integer(), nullable=False),
        sa.Column("alert_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["alert_id"],
            ["alerts.id"],
            name=op.f("fk_notification_alerts_alert_id_alerts"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["notification_id"],
            ["notifications.id"],
            name=op.f("fk_notification_alerts_notification_id_notifications"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("notification_id", "alert_id", name=op.f("pk_notification_alerts")),
    )
    with op.batch_alter_table("notification_alerts", schema=None) as batch_op:
        batch_op.create_index("ix_notification_alerts_alert_id", ["alert_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("notification_alerts", schema=None) as batch_op:
        batch_op.drop_index("ix_notification_alerts_alert_id")

    op.drop_table("notification_alerts")
    with op.batch_alter_table("delivery_attempts", schema=None) as batch_op:
        batch_op.drop_index("ix_delivery_attempts_notification_id_id")

    op.drop_table("delivery_attempts")
    with op.batch_alter_table("alert_events", schema=None) as batch_op:
        batch_op.drop_index("ix_alert_events_alert_id_id")

    op.drop_table("alert_events")
    with op.batch_alter_table("notifications", schema=None) as batch_op:
        batch_op.drop_index("ix_notifications_state_next_attempt_at")
        batch_op.drop_index("ix_notifications_run_id_channel_target")

    op.drop_table("notifications")
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.drop_index("ix_alerts_run_id_id")
        batch_op.drop_index("ix_alerts_resolve_at")
        batch_op.drop_index("ix_alerts_project_id_state_id")
        batch_op.drop_index("ix_alerts_next_at")

    op.drop_table("alerts")
    with op.batch_alter_table("silences", schema=None) as batch_op:
        batch_op.drop_index("ix_silences_project_id_ends_at")

    op.drop_table("silences")
    with op.batch_alter_table("webhook_receipts", schema=None) as batch_op:
        batch_op.drop_index("ix_webhook_receipts_at")

    op.drop_table("webhook_receipts")
    op.drop_table("server_secrets")
