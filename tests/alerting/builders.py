"""Alerts and messages as notifiers get them, for the notifier tests; override any field."""

from __future__ import annotations

from typing import Any

from runwatch.alerting.message import AlertView, Message


def alert(id: int = 1, **fields: Any) -> AlertView:
    values: dict[str, Any] = {
        "id": id,
        "project": "llm",
        "run_id": 7,
        "run_name": "run-12",
        "kind": "divergence",
        "key": "train/loss",
        "severity": "critical",
        "state": "firing",
        "summary": "loss diverged",
        "count": 1,
        "first_seen_at": 1.0,
        "last_seen_at": 2.0,
        "step": 1200,
    }
    return AlertView(**(values | fields))


def message(*alerts: AlertView, **fields: Any) -> Message:
    values: dict[str, Any] = {
        "notification_id": 12,
        "event": "firing",
        "step": 0,
        "alerts": alerts or (alert(),),
        "run_url": "http://runwatch.example/runs/7",
        "ack_url": "http://runwatch.example/ack/TOKEN",
    }
    return Message(**(values | fields))
