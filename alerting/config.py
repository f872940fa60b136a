"""The ``alerting:`` section of the policy file: channels, escalation policies, routes.

It sits in the same YAML file as the policy's rules (``RUNWATCH_POLICY``), is validated
with it (every problem reported with its location) and has a working default: every
warning and critical alert is written to the collector's log, info alerts are only
recorded. Shape (``collector/policies/default.yaml`` carries a commented example)::

    alerting:
      group_wait: 30s        # a new alert waits for others of its run, then one message
      group_interval: 5m     # a new alert of a run notified lately joins the next message
      repeat_interval: 4h    # a policy that ends with `then: repeat` starts over after this
      resolve_after: 30m     # quiet for this long: resolved (`never`: only by hand)
      link_ttl: 24h          # acknowledge links in e-mails and texts expire after this
      channels:              # where messages go; secrets come from RUNWATCH_* settings
        log: {type: console}
        train-slack: {type: slack, channel: "#train-alerts"}
        oncall-sms: {type: sms, to: ["+15550100"]}
        oncall-phone: {type: call, to: ["+15550100"], rate_limit: 10/1h}
      escalations:
        page-oncall:
          steps:
            - notify: [train-slack]
            - {after: 5m, notify: [oncall-sms]}     # minutes since the first message
            - {after: 15m, notify: [oncall-phone]}
          then: repeat       # or stop
      routes:                # the first route that matches an alert picks its escalation
        - {severities: [critical], escalation: page-oncall, resolve_after: never}
        - {escalation: none}                 # record only
      quiet:                 # channel types never used for alerts of a severity
        info: [sms, call]

Durations are seconds (a number) or text such as ``90s``, ``5m``, ``1h30m``, ``2d``.
"""

from __future__ import annotations

import fnmatch
import itertools
import math
import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import httpx
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

SEVERITIES = ("info", "warning", "critical")
CHANNEL_TYPES = ("console", "slack", "sms", "call", "email", "webhook")
PAGING_TYPES = ("sms", "call")
NO_ESCALATION = "none"
"""A route's escalation that records the alert and notifies nobody."""
NEVER = "never"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"^(?:\d+(?:\.\d+)?[smhd])+$")
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
MAX_SECONDS = 366 * 86400
E164 = re.compile(r"^\+[1-9]\d{6,14}$")
EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
SEND_RESOLVED = {"console": True, "slack": True, "webhook": True}
"""Channel types told when an alert is acknowledged or resolved, unless configured otherwise:
those that thread or log. Nobody is woken up by a text or a call saying it is over."""


def seconds(value: object) -> float:
    """A duration as seconds: a number, or text of ``<n><unit>`` parts (``1h30m``)."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or text such as '5m'")
    if isinstance(value, int | float):
        try:
            found = float(value)
        except OverflowError:  # an int too large for a float
            found = math.inf
    elif isinstance(value, str) and _DURATION.match(value.strip()):
        found = sum(float(n) * _UNITS[u] for n, u in _PART.findall(value.strip()))
    else:
        raise ValueError(
            f"not a duration: {value!r} (use seconds or text such as '90s', '5m', '1h30m')"
        )
    if not 0 <= found <= MAX_SECONDS:
        raise ValueError(f"a duration lies between 0 and {MAX_SECONDS // 86400} days")
    return found


def optional_seconds(value: object) -> float | None:
    """A duration, or None for ``never``."""
    return None if value in (NEVER, None) else seconds(value)


Duration = Annotated[float, BeforeValidator(seconds)]
OptionalDuration = Annotated[float | None, BeforeValidator(optional_seconds)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RateLimit(_Strict):
    """At most ``count`` messages per ``per`` seconds on one channel; more wait their turn."""

    count: int = Field(ge=1, le=1_000_000)
    per: Duration = Field(gt=0)

    @model_validator(mode="before")
    @classmethod
    def _text(cls, value: Any) -> Any:
        """``10/1m`` is ``{count: 10, per: 1m}``."""
        if isinstance(value, str):
            count, sep, per = value.partition("/")
            if not sep or not count.strip().isdigit():
                raise ValueError(f"not a rate limit: {value!r} (use e.g. '10/1m')")
            return {"count": int(count), "per": per.strip()}
        return value

    @property
    def per_second(self) -> float:
        return self.count / self.per


class _Channel(_Strict):
    rate_limit: RateLimit | None = None
    retries: int = Field(4, ge=0, le=20, description="Attempts after the first one.")
    backoff: Duration = Field(2.0, gt=0, description="Wait before the first retry; doubles.")
    max_backoff: Duration = Field(300.0, gt=0)
    send_resolved: bool | None = Field(
        None, description="Tell this channel when its alerts are acknowledged or resolved."
    )

    @property
    def targets(self) -> tuple[str, ...]:
        """Who one step of an escalation reaches through this channel."""
        return (getattr(self, "type"),)  # noqa: B009 - every subclass defines it

    def tells_state(self) -> bool:
        kind = getattr(self, "type")  # noqa: B009
        return SEND_RESOLVED.get(kind, False) if self.send_resolved is None else self.send_resolved


class ConsoleChannel(_Channel):
    type: Literal["console"]
    label: str = Field("console", max_length=128, description="Shown as the message's target.")

    @property
    def targets(self) -> tuple[str, ...]:
        return (self.label,)


class SlackChannel(_Channel):
    type: Literal["slack"]
    channel: str = Field(min_length=1, max_length=128, description="'#name' or a channel id.")

    @property
    def targets(self) -> tuple[str, ...]:
        return (self.channel,)


def _listed(value: object) -> object:
    return [value] if isinstance(value, str) else value


class _PhoneChannel(_Channel):
    to: Annotated[list[str], BeforeValidator(_listed), Field(min_length=1, max_length=20)]

    @field_validator("to")
    @classmethod
    def _e164(cls, value: list[str]) -> list[str]:
        bad = [v for v in value if not E164.match(v)]
        if bad:
            raise ValueError(
                f"not an E.164 phone number: {', '.join(map(repr, bad))} (write '+15550100')"
            )
        return value

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(self.to)


class SmsChannel(_PhoneChannel):
    type: Literal["sms"]


class CallChannel(_PhoneChannel):
    type: Literal["call"]


class EmailChannel(_Channel):
    type: Literal["email"]
    to: Annotated[list[str], BeforeValidator(_listed), Field(min_length=1, max_length=50)]

    @field_validator("to")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        bad = [v for v in value if not EMAIL.match(v)]
        if bad:
            raise ValueError(f"not an e-mail address: {', '.join(map(repr, bad))}")
        return value

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(self.to)


class WebhookChannel(_Channel):
    type: Literal["webhook"]
    url: str = Field(max_length=2048)
    secret_env: str = Field(
        "RUNWATCH_WEBHOOK_SECRET",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Environment variable holding the HMAC-SHA256 key of the signature header.",
    )

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        """A URL the notifier can post to. The message names only its scheme and host: hook
        URLs often carry a secret in their path."""
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError for a port that is not one
            httpx.URL(value)
        except (ValueError, httpx.InvalidURL):
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            shown = (
                value.split("/")[0] + "//" + value.split("/")[2] if value.count("/") >= 2 else "?"
            )
            raise ValueError(f"not a usable http(s) URL (it starts {shown[:80]!r})")
        return value

    @property
    def targets(self) -> tuple[str, ...]:
        """Scheme and host only: hook URLs often carry a secret in their path, and a target
        is stored, shown in the API and signed into acknowledge links."""
        parts = urlsplit(self.url)
        port = f":{parts.port}" if parts.port else ""
        return (f"{parts.scheme}://{parts.hostname}{port}",)


Channel = Annotated[
    ConsoleChannel | SlackChannel | SmsChannel | CallChannel | EmailChannel | WebhookChannel,
    Field(discriminator="type"),
]


class Step(_Strict):
    after: Duration = Field(
        0.0, description="Seconds since the escalation's first message (of this round)."
    )
    notify: Annotated[list[str], BeforeValidator(_listed), Field(min_length=1)]


class Escalation(_Strict):
    steps: Annotated[list[Step], Field(min_length=1, max_length=20)]
    then: Literal["repeat", "stop"] = Field(
        "repeat",
        description="After the last step, unacknowledged: start over after repeat_interval, "
        "or stop.",
    )

    @field_validator("steps")
    @classmethod
    def _in_order(cls, value: list[Step]) -> list[Step]:
        for before, after in itertools.pairwise(value):
            if after.after < before.after:
                raise ValueError("steps must come in order of `after`")
        return value


Globs = Annotated[list[str], BeforeValidator(_listed), Field(min_length=1)]


class Route(_Strict):
    name: str | None = Field(None, max_length=64)
    projects: Globs | None = None
    severities: Annotated[
        list[Literal["info", "warning", "critical"]] | None, BeforeValidator(_listed)
    ] = None
    kinds: Globs | None = None
    keys: Globs | None = None
    escalation: str
    resolve_after: OptionalDuration | Literal["default"] = "default"

    def matches(self, project: str, severity: str, kind: str, key: str) -> bool:
        return (
            _any(self.projects, project)
            and (self.severities is None or severity in self.severities)
            and _any(self.kinds, kind)
            and _any(self.keys, key)
        )


def _any(globs: list[str] | None, value: str) -> bool:
    return globs is None or any(fnmatch.fnmatchcase(value, g) for g in globs)


def _default_channels() -> dict[str, Any]:
    return {"log": ConsoleChannel(type="console", label="log")}


def _default_escalations() -> dict[str, Escalation]:
    return {"log": Escalation(steps=[Step(notify=["log"])], then="stop")}


def _default_routes() -> list[Route]:
    return [
        Route(name="log", severities=["warning", "critical"], escalation="log"),
        Route(name="record", escalation=NO_ESCALATION),
    ]


class AlertingConfig(_Strict):
    group_wait: Duration = 30.0
    group_interval: Duration = 300.0
    repeat_interval: Duration = Field(4 * 3600.0, gt=0)
    resolve_after: OptionalDuration = 1800.0
    link_ttl: Duration = Field(86400.0, gt=0)
    channels: dict[str, Channel] = Field(default_factory=_default_channels)
    escalations: dict[str, Escalation] = Field(default_factory=_default_escalations)
    routes: list[Route] = Field(default_factory=_default_routes)
    quiet: dict[Literal["info", "warning", "critical"], list[Literal[CHANNEL_TYPES]]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: {"info": list(PAGING_TYPES)}
    )

    @model_validator(mode="after")
    def _names_resolve(self) -> AlertingConfig:
        problems = []
        for name in (*self.channels, *self.escalations):
            if not NAME.match(name) or name == NO_ESCALATION:
                problems.append(
                    f"{name!r} is not a usable name (1 to 64 letters, digits, '_', '.', '-'; "
                    f"not {NO_ESCALATION!r})"
                )
        for name, escalation in self.escalations.items():
            for i, step in enumerate(escalation.steps):
                for channel in step.notify:
                    if channel not in self.channels:
                        problems.append(
                            f"escalations.{name}.steps[{i}]: no channel named {channel!r} "
                            f"(channels: {', '.join(self.channels) or 'none'})"
                        )
        for i, route in enumerate(self.routes):
            if route.escalation != NO_ESCALATION and route.escalation not in self.escalations:
                problems.append(
                    f"routes[{i}]: no escalation named {route.escalation!r} "
                    f"(escalations: {', '.join(self.escalations) or 'none'}, or "
                    f"{NO_ESCALATION!r})"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def route(self, project: str, severity: str, kind: str, key: str) -> tuple[str, Route | None]:
        """The first matching route and its name; no route matches: (``"none"``, None)."""
        for i, route in enumerate(self.routes):
            if route.matches(project, severity, kind, key):
                return route.name or f"routes[{i}]", route
        return NO_ESCALATION, None

    def resolve_after_of(self, route: Route | None) -> float | None:
        if route is None or route.resolve_after == "default":
            return self.resolve_after
        return route.resolve_after  # type: ignore[return-value]

    def is_quiet(self, severity: str, channel_type: str) -> bool:
        """True when alerts of ``severity`` must not go out through ``channel_type``."""
        return channel_type in self.quiet.get(severity, ())  # type: ignore[call-overload]
