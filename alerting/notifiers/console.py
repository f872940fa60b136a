"""The console: alerts in the collector's log (and, if given, on a stream).

It needs no account and cannot fail, which makes it the channel of the demo, of a laptop
setup and of the tests, and a fallback worth keeping in production: every notification then
also leaves a line in the log. The target is only a label ("sms oncall"), printed so that a
demo shows who would have been paged.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TextIO

from runwatch.alerting.message import Message
from runwatch.alerting.notifiers.base import DeliveryError

log = logging.getLogger("runwatch.alerts")


def render(message: Message, target: str) -> str:
    """``[runwatch] escalated, step 2 -> sms oncall`` (steps counted from 1) then the
    message's text, indented, without the acknowledge link: logs are read by more people
    than the alert's (anyone with the link could acknowledge it)."""
    message = dataclasses.replace(message, ack_url=None, voice_url=None)
    step = f", step {message.step + 1}" if message.step is not None else ""
    to = f" -> {target}" if target else ""
    head = f"[runwatch] {message.event}{step}{to}"
    return "\n".join([head, *("  " + line for line in message.text.split("\n"))])


class ConsoleNotifier:
    """Logs every message at WARNING on ``runwatch.alerts`` and writes it to ``stream`` when
    one is given."""

    type = "console"

    def __init__(self, *, stream: TextIO | None = None):
        self.stream = stream

    def send(self, message: Message, target: str) -> str | None:
        text = render(message, target)
        log.warning("%s", text)
        if self.stream is not None:
            try:
                self.stream.write(text + "\n")
                self.stream.flush()
            except (OSError, ValueError) as exc:  # ValueError: a closed stream
                raise DeliveryError(f"console: cannot write: {exc}", retryable=False) from None
        return None
