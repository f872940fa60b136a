"""What the dispatcher tests share: a clock to move by hand, a notifier that records, runs."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from runwatch.alerting.config import AlertingConfig
from runwatch.alerting.message import Message
from runwatch.alerting.notifiers.base import DeliveryError
from runwatch.collector.alert_intake import Signal
from runwatch.collector.alerts import Alerter
from runwatch.collector.storage.runs import create_or_resume
from runwatch.collector.storage.store import Store
from runwatch.collector.telemetry import Telemetry

START = 1_800_000_000.0


class Clock:
    """Wall time that moves only when told to."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Sent:
    at: float
    target: str
    message: Message

    @property
    def alert_ids(self) -> list[int]:
        return [a.id for a in self.message.alerts]


@dataclass
class RecordingNotifier:
    """A notifier that keeps what it is given; ``failures`` makes the next sends fail."""

    clock: Clock
    type: str = "console"
    sent: list[Sent] = field(default_factory=list)
    failures: int = 0
    retryable: bool = True
    tries: int = 0

    def send(self, message: Message, target: str) -> str | None:
        self.tries += 1
        if self.failures:
            self.failures -= 1
            raise DeliveryError("provider down (test)", retryable=self.retryable)
        self.sent.append(Sent(self.clock(), target, message))
        return f"ref-{self.tries}"


def make_run(store: Store, name: str = "run-1", project: str = "llm") -> int:
    with store.write() as conn:
        run, _ = create_or_resume(conn, project, name)
    return run.id


def make_alerter(
    store: Store,
    config: dict[str, Any],
    clock: Clock,
    notifiers: dict[str, RecordingNotifier],
    *,
    public_url: str | None = None,
) -> Alerter:
    return Alerter(
        store,
        AlertingConfig.model_validate(config),
        notifiers,
        Telemetry(),
        secret="test-secret",
        public_url=public_url,
        clock=clock,
        workers=1,
    )


def signal(
    run_id: int,
    kind: str = "loss_spike",
    *,
    key: str = "train/loss",
    severity: str = "critical",
    step: int = 1,
    summary: str = "loss 9.1 at z=7",
) -> Signal:
    return Signal(run_id, kind, key, severity, summary, "detector", step)


ESCALATION = {
    "group_wait": "30s",
    "channels": {
        "slack": {"type": "console", "label": "#train-alerts"},
        "sms": {"type": "console", "label": "sms oncall"},
        "call": {"type": "console", "label": "call oncall"},
        "manager": {"type": "console", "label": "call manager"},
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
    "routes": [{"severities": ["critical", "warning"], "escalation": "page"}],
    "resolve_after": "never",
}
"""The issue's example policy: Slack, after 5 min a text, after 15 a call, after 30 the manager."""


def notifiers(clock: Clock, *names: str) -> dict[str, RecordingNotifier]:
    return {name: RecordingNotifier(clock) for name in names}


def config(**changes: Any) -> dict[str, Any]:
    """:data:`ESCALATION` with top-level ``changes``."""
    found = copy.deepcopy(ESCALATION)
    found.update(changes)
    return found


def advance_to(alerter: Alerter, clock: Clock, seconds: float, step: float = 10.0) -> None:
    """Move the clock ``seconds`` ahead in ``step`` hops, running the dispatcher at each."""
    end = clock.now + seconds
    while clock.now < end:
        clock.advance(min(step, end - clock.now))
        alerter.run_once()
