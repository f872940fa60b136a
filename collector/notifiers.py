"""One notifier per configured channel, built from the settings that hold the secrets."""

from __future__ import annotations

import os
import secrets
import time

from sqlalchemy import select

from runwatch.alerting.config import (
    AlertingConfig,
    CallChannel,
    ConsoleChannel,
    EmailChannel,
    SlackChannel,
    SmsChannel,
    WebhookChannel,
)
from runwatch.alerting.notifiers.base import Notifier
from runwatch.alerting.notifiers.console import ConsoleNotifier
from runwatch.alerting.notifiers.email import EmailNotifier, SmtpConfig
from runwatch.alerting.notifiers.slack import SlackNotifier
from runwatch.alerting.notifiers.twilio import CallNotifier, SmsNotifier, TwilioConfig
from runwatch.alerting.notifiers.webhook import WebhookNotifier
from runwatch.collector.storage.sql import insert_or_ignore
from runwatch.collector.storage.store import Store
from runwatch.collector.storage.tables import server_secrets
from runwatch.settings import Settings

LINK_KEY = "link_key"


def build_notifiers(config: AlertingConfig, settings: Settings) -> dict[str, Notifier]:
    """Channel name -> its notifier. Settings were checked to hold what each one needs."""
    built: dict[str, Notifier] = {}
    for name, channel in config.channels.items():
        built[name] = _build(channel, settings)
    return built


def _build(channel: object, settings: Settings) -> Notifier:
    if isinstance(channel, ConsoleChannel):
        return ConsoleNotifier()
    if isinstance(channel, SlackChannel):
        assert settings.slack_bot_token is not None
        return SlackNotifier(
            settings.slack_bot_token.get_secret_value(), base_url=settings.slack_api_url
        )
    if isinstance(channel, SmsChannel | CallChannel):
        assert settings.twilio_account_sid and settings.twilio_auth_token
        assert settings.twilio_from_number
        twilio = TwilioConfig(
            settings.twilio_account_sid,
            settings.twilio_auth_token.get_secret_value(),
            settings.twilio_from_number,
            api_url=settings.twilio_api_url,
        )
        return SmsNotifier(twilio) if isinstance(channel, SmsChannel) else CallNotifier(twilio)
    if isinstance(channel, EmailChannel):
        assert settings.smtp_host
        return EmailNotifier(
            SmtpConfig(
                settings.smtp_host,
                settings.smtp_port,
                username=settings.smtp_username,
                password=None
                if settings.smtp_password is None
                else settings.smtp_password.get_secret_value(),
                starttls=settings.smtp_starttls,
                ssl=settings.smtp_ssl,
                from_addr=settings.smtp_from,
            )
        )
    if isinstance(channel, WebhookChannel):
        return WebhookNotifier(channel.url, os.environ[channel.secret_env])
    raise TypeError(f"no notifier for {type(channel).__name__}")


def link_secret(store: Store, settings: Settings) -> str:
    """The key that signs acknowledge links: the setting, or one made once and kept in the
    database, so that links survive a restart and every replica accepts them."""
    if settings.secret_key is not None:
        return settings.secret_key.get_secret_value()
    with store.write() as conn:
        insert_or_ignore(
            conn,
            server_secrets,
            {"name": LINK_KEY, "value": secrets.token_urlsafe(32), "created_at": time.time()},
        )
        return str(
            conn.execute(
                select(server_secrets.c.value).where(server_secrets.c.name == LINK_KEY)
            ).scalar_one()
        )
