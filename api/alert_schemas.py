"""Request and response bodies of the alert and silence routes.

Apart from :mod:`runwatch.api.schemas` because alerting is a resource family of its own
(alerts, their events, their deliveries, silences) that the other routes never touch.
A silence's time window is checked in two places: its shape here (``ends_at`` or
``duration``, exactly one), its bounds in :func:`silence_window`, which needs the
collector's clock for a window that starts now.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from runwatch.alerting.config import seconds
from runwatch.api.schemas import Body, FiniteFloat
from runwatch.collector.errors import InvalidInput
from runwatch.collector.storage.alerts import MAX_SUMMARY_LENGTH, AlertEventRecord, AlertRecord
from runwatch.collector.storage.checkpoints import MAX_STEP
from runwatch.collector.storage.notifications import NotificationRecord
from runwatch.collector.storage.silences import SilenceRecord
from runwatch.wire import MAX_ID, MAX_KEY_LENGTH

Severity = Literal["info", "warning", "critical"]
KIND = re.compile(r"^[a-z0-9_:.-]{1,80}$")
MAX_COMMENT_LENGTH = 1000
MAX_GLOB_LENGTH = 256
MAX_SILENCE_SECONDS = 90 * 86400.0


def _no_nul(value: str | None) -> str | None:
    """PostgreSQL text cannot hold NUL (pydantic already refuses lone surrogates)."""
    if value is not None and "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


def _duration(value: object) -> float:
    """``seconds()`` with the message pydantic shows: a duration or a number of seconds."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("a duration must be a finite number of seconds")
    return seconds(value)


# -- alerts -------------------------------------------------------------------------------
class RaiseAlert(Body):
    """``POST /api/v1/alerts``: a trainer-side tool reports trouble with its own run."""

    run: int = Field(ge=1, le=MAX_ID, description="The run the alert is about.")
    kind: str = Field(
        description="What is wrong, 1-80 of `a-z 0-9 _ : . -`, e.g. `supervisor:restart_loop`."
    )
    key: str = Field(
        "",
        max_length=MAX_KEY_LENGTH,
        description="The series it is about; empty for the run as a whole. An open alert "
        "with the same run, kind and key is updated (its count goes up) instead of a new one.",
    )
    severity: Severity = "warning"
    summary: str = Field("", max_length=MAX_SUMMARY_LENGTH, description="One line for people.")
    step: int | None = Field(None, ge=0, le=MAX_STEP, description="The step it was seen at.")

    check_text = field_validator("key", "summary")(_no_nul)

    @field_validator("kind")
    @classmethod
    def _kind(cls, value: str) -> str:
        if not KIND.match(value):
            raise ValueError(
                f"kind {value[:100]!r} must be 1-80 characters of lowercase letters, digits, "
                "'_', ':', '.' or '-'"
            )
        return value


class AlertOut(Body):
    """An alert and where its escalation stands."""

    id: int = Field(description="Increases with every alert: the cursor for `before`.")
    project: str
    run_id: int
    run_name: str
    kind: str
    key: str = Field(description="The series it is about; empty for the run as a whole.")
    severity: str = Field(description="`info`, `warning` or `critical`.")
    summary: str
    source: str = Field(
        description="Who raised it: `detector:<name>`, `policy:<name>`, `api:<key prefix>`..."
    )
    state: str = Field(description="`firing`, `acknowledged` or `resolved`.")
    count: int = Field(description="How many times the condition fired into this alert.")
    first_seen_at: float
    last_seen_at: float
    first_step: int | None
    last_step: int | None
    acknowledged_at: float | None
    acknowledged_by: str | None
    resolved_at: float | None
    resolved_by: str | None
    route: str = Field(description="The route of the alerting policy that matched it.")
    escalation: str | None = Field(description="Its escalation policy; null: recorded only.")
    escalation_round: int = Field(description="Times the escalation started over (`repeat`).")
    escalation_step: int = Field(
        description="Steps of the escalation taken in this round: the index of the next one."
    )
    next_escalation_at: float | None = Field(
        description="When the next step notifies, unless acknowledged or resolved first."
    )
    notified_at: float | None = Field(description="Its latest message asking for attention.")
    resolve_at: float | None = Field(description="Resolved at this time if it stays quiet.")
    silenced_by: int | None = Field(description="The silence holding its notifications back.")


def alert_out(record: AlertRecord) -> AlertOut:
    return AlertOut(
        id=record.id,
        project=record.project,
        run_id=record.run_id,
        run_name=record.run_name,
        kind=record.kind,
        key=record.key,
        severity=record.severity,
        summary=record.summary,
        source=record.source,
        state=record.state,
        count=record.count,
        first_seen_at=record.first_seen_at,
        last_seen_at=record.last_seen_at,
        first_step=record.first_step,
        last_step=record.last_step,
        acknowledged_at=record.acknowledged_at,
        acknowledged_by=record.acknowledged_by,
        resolved_at=record.resolved_at,
        resolved_by=record.resolved_by,
        route=record.route,
        escalation=record.escalation,
        escalation_round=record.esc_round,
        escalation_step=record.esc_step,
        next_escalation_at=record.next_at,
        notified_at=record.notified_at,
        resolve_at=record.resolve_at,
        silenced_by=record.silenced_by,
    )


class AlertEventOut(Body):
    at: float
    type: str = Field(
        description="`fired`, `acknowledged`, `resolved`, `escalated`, `silenced`, ... "
    )
    by: str = Field(description="Who or what did it: `api:<key prefix>`, `slack:<user>`...")
    detail: str


class AlertDetail(AlertOut):
    events: list[AlertEventOut] = Field(description="Every transition, oldest first.")


def alert_detail(record: AlertRecord, events: list[AlertEventRecord]) -> AlertDetail:
    return AlertDetail(
        **alert_out(record).model_dump(),
        events=[AlertEventOut(at=e.at, type=e.type, by=e.by, detail=e.detail) for e in events],
    )


class AttemptOut(Body):
    attempt: int = Field(description="1 for the first try.")
    at: float
    status: str = Field(description="`sent`, or why it failed (`retry`, `failed`, ...).")
    error: str | None
    duration: float = Field(description="Seconds the provider took to answer.")


class DeliveryOut(Body):
    """One notification about the alert (it may be about others of its run too)."""

    id: int
    channel: str = Field(description="The channel's name in the alerting policy.")
    type: str = Field(description="`slack`, `sms`, `call`, `email`, `webhook` or `console`.")
    target: str = Field(description="Who it went to: a Slack channel, a number, an address.")
    event: str = Field(description="`firing`, `escalated`, `repeat`, `acknowledged` or `resolved`.")
    step: int | None = Field(
        description="The escalation step that sent it, counted from 1; null for a message "
        "about a change of state."
    )
    state: str = Field(description="`pending`, `sending`, `sent`, `failed` or `cancelled`.")
    attempts: int
    created_at: float
    next_attempt_at: float
    sent_at: float | None
    last_error: str | None
    provider_ref: str | None = Field(
        description="The provider's id of the message (a Slack ts, a Twilio SID, a Message-ID)."
    )
    alert_ids: list[int] = Field(description="Every alert the message was about.")
    log: list[AttemptOut] = Field(description="Every attempt, oldest first.")


def delivery_out(record: NotificationRecord) -> DeliveryOut:
    return DeliveryOut(
        id=record.id,
        channel=record.channel,
        type=record.channel_type,
        target=record.target,
        event=record.event,
        step=None if record.esc_step is None else record.esc_step + 1,
        state=record.state,
        attempts=record.attempts,
        created_at=record.created_at,
        next_attempt_at=record.next_attempt_at,
        sent_at=record.sent_at,
        last_error=record.last_error,
        provider_ref=record.provider_ref,
        alert_ids=list(record.alert_ids),
        log=[AttemptOut.model_validate(a, from_attributes=True) for a in record.log],
    )


# -- silences -----------------------------------------------------------------------------
Glob = Annotated[str, Field(min_length=1, max_length=MAX_GLOB_LENGTH)]


class SilenceMatchers(Body):
    """What a silence holds back: alerts matching every given field. Strings are globs
    (``*``, ``?``, ``[...]``); ``run`` matches the run's name, ``run_id`` its id exactly."""

    run: Glob | None = None
    run_id: int | None = Field(None, ge=1, le=MAX_ID, strict=True)
    kind: Glob | None = None
    key: Glob | None = None
    severity: Glob | None = None

    check_text = field_validator("run", "kind", "key", "severity")(_no_nul)

    @model_validator(mode="after")
    def _something(self) -> SilenceMatchers:
        if not self.given():
            raise ValueError(
                "a silence needs at least one matcher: run, run_id, kind, key or severity"
            )
        return self

    def given(self) -> dict[str, str | int]:
        return self.model_dump(exclude_none=True)


class CreateSilence(Body):
    """``POST /api/v1/silences``: hold back notifications about matching alerts for a while.

    The alerts are still recorded and still change state; only their messages wait, and go
    out when the silence ends if the alerts are still firing."""

    matchers: SilenceMatchers
    starts_at: FiniteFloat | None = Field(
        None, ge=0, description="Unix time it starts; default: now."
    )
    ends_at: FiniteFloat | None = Field(
        None, ge=0, description="Unix time it ends. Give this or `duration`, not both."
    )
    duration: Annotated[float, BeforeValidator(_duration)] | None = Field(
        None, description="How long it lasts from `starts_at`: seconds, or text such as `2h`."
    )
    comment: str = Field("", max_length=MAX_COMMENT_LENGTH, description="Why, for the others.")
    project: str | None = Field(
        None,
        description="The project it applies to. With a key: the key's project (naming "
        "another is 403). On an open server: needed unless `matchers.run_id` names a run.",
    )

    check_text = field_validator("comment")(_no_nul)

    @model_validator(mode="after")
    def _one_end(self) -> CreateSilence:
        if (self.ends_at is None) == (self.duration is None):
            raise ValueError("give either ends_at or duration, exactly one")
        return self


def silence_window(body: CreateSilence, now: float) -> tuple[float, float]:
    """``(starts_at, ends_at)`` of a new silence; :class:`InvalidInput` unless it ends after
    it starts, ends in the future and lasts at most 90 days."""
    starts_at = now if body.starts_at is None else body.starts_at
    ends_at = body.ends_at if body.ends_at is not None else starts_at + (body.duration or 0.0)
    if ends_at <= starts_at:
        raise InvalidInput("a silence must end after it starts (ends_at > starts_at, duration > 0)")
    if ends_at <= now:
        raise InvalidInput("this silence would have ended already: ends_at lies in the past")
    if ends_at - starts_at > MAX_SILENCE_SECONDS:
        raise InvalidInput("a silence lasts at most 90 days")
    return starts_at, ends_at


class SilenceOut(Body):
    id: int
    project_id: int
    matchers: dict[str, str | int]
    starts_at: float
    ends_at: float = Field(description="Moved to the time of expiry when expired by hand.")
    state: Literal["pending", "active", "expired"] = Field(
        description="At the time of the reply: not started yet, in force, or over."
    )
    comment: str
    created_by: str
    created_at: float
    expired_by: str | None = Field(description="Who ended it early, if anyone.")


def silence_state(record: SilenceRecord, now: float) -> Literal["pending", "active", "expired"]:
    if now >= record.ends_at or record.ends_at <= record.starts_at:
        return "expired"  # the second: a silence expired before it started
    return "pending" if now < record.starts_at else "active"


def silence_out(record: SilenceRecord, now: float) -> SilenceOut:
    return SilenceOut(
        id=record.id,
        project_id=record.project_id,
        matchers=record.matchers,
        starts_at=record.starts_at,
        ends_at=record.ends_at,
        state=silence_state(record, now),
        comment=record.comment,
        created_by=record.created_by,
        created_at=record.created_at,
        expired_by=record.expired_by,
    )
