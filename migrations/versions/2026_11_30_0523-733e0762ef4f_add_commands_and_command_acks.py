"""add commands and command acks (the control channel and its audit log)

Revision ID: 733e0762ef4f
Revises: 762b26095894
Create Date: 2026-11-30 05:23:06.984526
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "733e0762ef4f"
down_revision: str | None = "762b26095894"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "commands",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("type", sa.String(length=32), nullable=False),
        sa.Column("args", sa.JSON(), nullable=False),
        sa.Column("at_step", sa.BigInteger(), nullable=True),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("delivered_at", sa.Double(), nullable=True),
        sa.Column("finished_at", sa.Double(), nullable=True),
        sa.Column("expires_at", sa.Double(), nullable=False),
        sa.Column("cancelled_by", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "state IN ('pending', 'delivered', 'applied', 'failed', 'expired', 'cancelled')",
            name=op.f("ck_commands_state"),
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_commands_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_commands")),
    )
    with op.batch_alter_table("commands", schema=None) as batch_op:
        batch_op.create_index("ix_commands_run_id_id", ["run_id", "id"], unique=False)

    op.create_table(
        "command_acks",
        sa.Column("command_id", sa.Integer(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("step", sa.BigInteger(), nullable=True),
        sa.Column("acked_at", sa.Double(), nullable=False),
        sa.CheckConstraint(
            "status IN ('applied', 'failed', 'expired')", name=op.f("ck_command_acks_status")
        ),
        sa.ForeignKeyConstraint(
            ["command_id"],
            ["commands.id"],
            name=op.f("fk_command_acks_command_id_commands"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("command_id", "rank", name=op.f("pk_command_acks")),
    )


def downgrade() -> None:
    op.drop_table("command_acks")
    with op.batch_alter_table("commands", schema=None) as batch_op:
        batch_op.drop_index("ix_commands_run_id_id")

    op.drop_table("commands")
