"""Collector settings: one class, read from ``RUNWATCH_*`` variables and CLI flags.

Only the server imports this module (pydantic-settings is a server extra).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from functools import cached_property
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from pydantic import (
    Field,
    PrivateAttr,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from runwatch.collector.policy.model import Policy

DEFAULT_DB_URL = "sqlite:///./runwatch.db"
MIN_SECRET_LENGTH = 32


class Settings(BaseSettings):
    """Everything the collector needs to start. Bad values fail at start-up, not later."""

    # Errors name the setting and the problem, never the values: the input holds secrets.
    model_config = SettingsConfigDict(
        env_prefix="RUNWATCH_", extra="ignore", hide_input_in_errors=True
    )
    _loaded_policy: Policy | None = PrivateAttr(default=None)

    db: str = Field(DEFAULT_DB_URL, description="SQLAlchemy URL of the database.")
    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8000, ge=0, le=65535, description="Port to bind (0: any free port).")
    max_body_bytes: int = Field(
        16 * 1024 * 1024, gt=0, description="Largest request body accepted (HTTP 413 beyond)."
    )
    max_points_per_batch: int = Field(
        100_000, gt=0, description="Most points one ingest batch may carry."
    )
    key_cache_seconds: float = Field(
        5.0,
        ge=0,
        description="How long a key lookup is remembered; a revoked key works at most this long.",
    )
    log_level: str = Field("info", description="Log level of the server.")
    detection: bool = Field(
        True, description="Feed stored points to the detectors and store their anomalies."
    )
    detector_check_seconds: float = Field(
        5.0,
        ge=0.01,
        le=3600,
        description="How often running runs are checked for findings made of time passing "
        "(hangs, silent ranks).",
    )
    detector_time_scale: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Multiplies the detectors' hang timeouts (5 min after the last step, 30 min "
        "before the first): below 1 only for runs on a compressed clock, such as the scenario "
        "benchmark's.",
    )
    detector_snapshot_seconds: float = Field(
        30.0,
        ge=0.01,
        le=86_400,
        description="How often detector state is saved to the database; a crash (not a clean "
        "stop, which saves it) forgets at most this much of what the detectors learned.",
    )

    command_ttl_seconds: float = Field(
        600.0,
        ge=1,
        le=7 * 86_400,
        description="How long a command stays deliverable when its issuer gives no "
        "expires_in; one that rank 0 has not acknowledged by then is expired.",
    )
    checkpoint_suspect_before: int = Field(
        50,
        ge=0,
        le=10**9,
        description="A checkpoint is suspect when a training-signal anomaly (a loss or gradient "
        "spike, a non-finite value, divergence...) lies up to this many steps before it ...",
    )
    checkpoint_verify_steps: int = Field(
        100,
        ge=0,
        le=10**9,
        description="... or up to this many steps after it; it is unverified until the run "
        "has gone this many steps past it (or has ended), good afterwards.",
    )

    policy: str = Field(
        "default",
        description="What the collector does about anomalies: 'default' (the shipped policy, "
        "see 'runwatch policy show-default'), 'off' (detect only), or the path of a policy "
        "YAML file, checked at start-up.",
    )

    public_url: str | None = Field(
        None,
        description="The collector's address as people and providers reach it (e.g. "
        "'https://runwatch.example.com'): the base of run links, acknowledge links and "
        "Twilio's keypress webhook. Without it messages carry no links.",
    )
    secret_key: SecretStr | None = Field(
        None,
        description="Signs acknowledge links. Unset: a random key is made once and kept in the "
        "database.",
    )
    alert_tick_seconds: float = Field(
        1.0, ge=0.01, le=60, description="How often escalation timers and the outbox are checked."
    )
    slack_bot_token: SecretStr | None = Field(
        None, description="Bot token (xoxb-...) of the Slack app that posts alerts."
    )
    slack_signing_secret: SecretStr | None = Field(
        None, description="Signing secret of that Slack app: checks its button clicks."
    )
    slack_api_url: str = Field("https://slack.com/api/", description="Slack's Web API.")
    twilio_account_sid: str | None = Field(None, description="Twilio account for texts and calls.")
    twilio_auth_token: SecretStr | None = Field(
        None, description="Its auth token: signs its requests and checks Twilio's webhooks."
    )
    twilio_from_number: str | None = Field(
        None, description="The number texts and calls come from."
    )
    twilio_api_url: str | None = Field(
        None, description="Where Twilio API requests go instead of api.twilio.com (a proxy)."
    )
    smtp_host: str | None = Field(None, description="SMTP server for e-mail alerts.")
    smtp_port: int = Field(587, ge=1, le=65535)
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_starttls: bool = Field(True, description="Upgrade the connection with STARTTLS.")
    smtp_ssl: bool = Field(False, description="Connect with TLS from the start (port 465).")
    smtp_from: str = Field("runwatch@localhost", description="From address of e-mail alerts.")

    @field_validator(
        "secret_key",
        "slack_bot_token",
        "slack_signing_secret",
        "twilio_account_sid",
        "twilio_auth_token",
        "twilio_from_number",
        "smtp_host",
        "smtp_username",
        "smtp_password",
        "public_url",
        "twilio_api_url",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """An empty secret is no secret: treated as unset, never used as a key."""
        return None if value == "" else value

    @field_validator("secret_key")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_SECRET_LENGTH:
            raise ValueError(
                f"secret_key must be at least {MIN_SECRET_LENGTH} characters (or unset: the "
                "collector then makes one)"
            )
        return value

    @field_validator("public_url", "twilio_api_url", "slack_api_url")
    @classmethod
    def _base_url(cls, value: str | None, info: ValidationInfo) -> str | None:
        """An http(s) URL with a host and nothing after its path: links are built on it.
        Slack's Web API client wants a trailing slash, the others none."""
        if value is None:
            return None
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError for a port that is not one
        except ValueError:
            parts = None
        if (
            parts is None
            or parts.scheme not in ("http", "https")
            or not parts.hostname
            or parts.query
            or parts.fragment
        ):
            raise ValueError(
                "must be an http(s) URL with a host and no query or fragment, such as "
                "'https://runwatch.example.com'"
            )
        return value.rstrip("/") + ("/" if info.field_name == "slack_api_url" else "")

    @model_validator(mode="after")
    def _usable_policy(self) -> Settings:
        """The policy file loads (read once, here: :attr:`loaded_policy`), and every channel
        type its alerting uses has what it needs to send."""
        from runwatch.alerting.config import WebhookChannel
        from runwatch.collector.policy.model import PolicyError, policy_from_setting

        try:
            policy = policy_from_setting(self.policy)
        except PolicyError as exc:
            raise ValueError(str(exc)) from None
        self._loaded_policy = policy
        if policy is None:
            return self
        missing = []
        for name, channel in policy.alerting.channels.items():
            kind = channel.type
            if kind == "slack" and (
                self.slack_bot_token is None or self.slack_signing_secret is None
            ):
                missing.append(
                    f"{name} (slack): RUNWATCH_SLACK_BOT_TOKEN and RUNWATCH_SLACK_SIGNING_SECRET"
                )
            elif kind in ("sms", "call") and not (
                self.twilio_account_sid and self.twilio_auth_token and self.twilio_from_number
            ):
                missing.append(
                    f"{name} ({kind}): RUNWATCH_TWILIO_ACCOUNT_SID, RUNWATCH_TWILIO_AUTH_TOKEN and "
                    "RUNWATCH_TWILIO_FROM_NUMBER"
                )
            elif kind == "call" and self.public_url is None:
                missing.append(
                    f"{name} (call): RUNWATCH_PUBLIC_URL, where Twilio reports the keypress"
                )
            elif kind == "email" and not self.smtp_host:
                missing.append(f"{name} (email): RUNWATCH_SMTP_HOST")
            elif isinstance(channel, WebhookChannel) and not os.environ.get(channel.secret_env):
                missing.append(f"{name} (webhook): {channel.secret_env}")
        if missing:
            raise ValueError("alert channels need settings: " + "; ".join(missing))
        return self

    @field_validator("db")
    @classmethod
    def _db_is_a_url(cls, value: str) -> str:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            url = make_url(value)
        except ArgumentError as exc:
            raise ValueError(f"not a database URL: {value!r} ({exc})") from None
        if url.get_backend_name() not in ("sqlite", "postgresql"):
            raise ValueError(
                f"unsupported database {url.get_backend_name()!r}: use sqlite or postgresql"
            )
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        levels = ("critical", "error", "warning", "info", "debug", "trace")
        if value.lower() not in levels:
            raise ValueError(f"log_level must be one of {', '.join(levels)}")
        return value.lower()

    @property
    def loaded_policy(self) -> Policy | None:
        """The policy ``policy`` names, as loaded when these settings were made (None: off)."""
        return self._loaded_policy

    @cached_property
    def is_loopback(self) -> bool:
        """True when ``host`` only accepts connections from this machine."""
        return is_loopback_host(self.host)


def is_loopback_host(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and names that resolve only to them (``localhost``)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)
