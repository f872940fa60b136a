"""The protocol every notifier follows, and the error that tells the service what to do."""

from __future__ import annotations

from typing import Protocol

from runwatch.alerting.message import Message


class DeliveryError(Exception):
    """A send that did not reach its provider.

    ``retryable`` False means trying again cannot help (a bad token, an unknown channel, a
    malformed number): the service gives up on this notification at once. ``retry_after``
    is the provider's own advice in seconds (Slack's and Twilio's 429s), which the service
    honours instead of its backoff.
    """

    def __init__(self, detail: str, *, retryable: bool = True, retry_after: float | None = None):
        super().__init__(detail)
        self.detail = detail
        self.retryable = retryable
        self.retry_after = retry_after


class Notifier(Protocol):
    """Sends messages to one channel's targets; called from the delivery thread only."""

    type: str
    """The channel type: ``console``, ``slack``, ``sms``, ``call``, ``email``, ``webhook``."""

    def send(self, message: Message, target: str) -> str | None:
        """Deliver ``message`` to ``target`` (a phone number, an address, a Slack channel, a URL)
        and return the provider's reference to it (a Slack ``channel_id:ts``, a Twilio SID, a
        Message-ID), or None. Raise :class:`DeliveryError` on failure; never block longer than
        the notifier's timeout."""
        ...
