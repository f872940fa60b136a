"""What a notifier is given: one message about some alerts of one run, rendered per channel.

The service (``runwatch.collector.alerts``) builds a :class:`Message` when it sends a
notification, from the alerts' state at that moment, so an alert acknowledged while its
page waited is no longer in it (and a page left with no alert is not sent at all).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2}
Event = Literal["firing", "escalated", "repeat", "acknowledged", "resolved"]
STATE_EVENTS: tuple[Event, ...] = ("acknowledged", "resolved")
"""Events that report a change of state rather than ask for attention."""


@dataclass(frozen=True, slots=True)
class AlertView:
    """One alert as a notification shows it."""

    id: int
    project: str
    run_id: int
    run_name: str
    kind: str
    key: str
    """The series the alert is about; empty for run-level alerts (hang, straggler, ...)."""
    severity: str
    state: str
    summary: str
    count: int
    """How many times the condition fired (deduplicated into this alert)."""
    first_seen_at: float
    last_seen_at: float
    step: int | None
    acknowledged_by: str | None = None
    resolved_by: str | None = None

    @property
    def headline(self) -> str:
        """``divergence on train/loss at step 1200 (x37): loss diverged``."""
        where = f" on {self.key}" if self.key else ""
        at = f" at step {self.step}" if self.step is not None else ""
        times = f" (x{self.count})" if self.count > 1 else ""
        summary = f": {self.summary}" if self.summary else ""
        return f"{self.kind}{where}{at}{times}{summary}"


@dataclass(frozen=True, slots=True)
class Message:
    """One notification: alerts of one run, for one channel and target."""

    notification_id: int
    event: Event
    step: int | None
    """Escalation step (0: the first) for firing/escalated/repeat; None for state events."""
    alerts: tuple[AlertView, ...]
    run_url: str | None = None
    """Where a person looks at the run (the dashboard or the API); None without a public URL."""
    ack_url: str | None = None
    """A page that acknowledges every alert of this message for this target (signed, expiring);
    None for state events and without a public URL."""
    voice_url: str | None = None
    """Twilio's ``<Gather action>`` for this message's call (signed token inside)."""
    thread_ref: str | None = None
    """Provider reference of the first message about these alerts on the same channel and
    target (Slack ``channel_id:ts``), for threaded updates; None if there is none."""

    @property
    def severity(self) -> str:
        """The highest severity among the alerts."""
        return max((a.severity for a in self.alerts), key=SEVERITY_RANK.__getitem__)

    @property
    def title(self) -> str:
        """``[CRITICAL] llm/run-12: divergence on train/loss (+2 more)`` and, for state
        events, ``[ACKNOWLEDGED] ...``."""
        first = self.alerts[0]
        label = self.event.upper() if self.event in STATE_EVENTS else self.severity.upper()
        more = f" (+{len(self.alerts) - 1} more)" if len(self.alerts) > 1 else ""
        where = f" on {first.key}" if first.key else ""
        return f"[{label}] {first.project}/{first.run_name}: {first.kind}{where}{more}"

    @property
    def text(self) -> str:
        """Plain text: the title, one line per alert, then the links."""
        lines = [self.title]
        lines += [f"- #{a.id} [{a.severity}] {a.headline}" for a in self.alerts]
        if self.event in STATE_EVENTS:
            by = next(
                (a.acknowledged_by if self.event == "acknowledged" else a.resolved_by)
                for a in self.alerts
            )
            if by:
                lines.append(f"{self.event} by {by}")
        if self.run_url:
            lines.append(f"run: {self.run_url}")
        if self.ack_url:
            lines.append(f"acknowledge: {self.ack_url}")
        return "\n".join(lines)
