"""``make demo`` end to end, shortened: a watched training run lands in the embedded collector."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from runwatch import demo


def test_demo_trains_under_the_agent_and_reports_what_was_recorded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    demo.main(["--steps", "6", "--workdir", str(tmp_path / "demo"), "--no-hang"])
    out = capsys.readouterr().out
    assert "is finished" in out and "train/loss" in out
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'demo' / 'runwatch.db'}")
    with engine.connect() as conn:
        keys = set(conn.execute(sa.text("SELECT key FROM series")).scalars())
        losses = conn.execute(
            sa.text(
                "SELECT COUNT(*) FROM points p JOIN series s ON s.id = p.series_id "
                "WHERE s.key = 'train/loss'"
            )
        ).scalar_one()
    engine.dispose()
    assert {"train/loss", "val/loss", "train/grad_norm", "train/lr", "sys/proc_rss_gb"} <= keys
    assert any(key.startswith("act/blocks.") for key in keys)
    assert losses == 6


def test_demo_fault_is_detected_rolled_back_and_the_run_ends_healthy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``make demo``: 20 garbage batches at batch 150, with 300 more steps (150 in the demo)
    for detection and delivery on a loaded machine: a rollback that arrives after the last
    step is never applied. Then a trainer hangs, is paged and acknowledged from the CLI."""
    demo.main(["--workdir", str(tmp_path / "demo"), "--steps", "450"])
    out = capsys.readouterr().out
    assert "what happened" in out and "rollback" in out
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'demo' / 'runwatch.db'}")
    with engine.connect() as conn:
        rollbacks = conn.execute(
            sa.text("SELECT source, state, args FROM commands WHERE type = 'rollback'")
        ).all()
        last_loss = conn.execute(
            sa.text(
                "SELECT s.last_value FROM series s JOIN runs r ON r.id = s.run_id "
                "WHERE s.key = 'train/loss' AND r.name LIKE 'tiny-lm-%'"
            )
        ).scalar_one()
        hang = conn.execute(
            sa.text("SELECT id, state, acknowledged_by FROM alerts WHERE kind = 'hang'")
        ).one()
        paged = conn.execute(
            sa.text(
                "SELECT n.channel FROM notifications n JOIN notification_alerts na "
                "ON na.notification_id = n.id WHERE na.alert_id = :id AND n.event != "
                "'acknowledged' ORDER BY n.id"
            ),
            {"id": hang.id},
        ).scalars()
        paged = list(paged)
    engine.dispose()
    assert (hang.state, hang.acknowledged_by) == ("acknowledged", "api:open")
    assert paged == ["team-chat", "oncall-sms", "oncall-call"]  # never the manager
    assert f"$ runwatch alerts ack {hang.id}" in out and "messages to the manager: 0" in out
    assert len(rollbacks) == 1, rollbacks
    source, state, args = rollbacks[0]
    assert source.startswith("policy:") and state == "applied"
    assert '"skip_batches": 200' in args or "'skip_batches': 200" in str(args)
    assert last_loss is not None and 0 < last_loss < 3.0  # healthy again, not NaN
