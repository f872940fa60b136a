"""A signed JSON POST to a URL of the user's: the channel for everything runwatch has no
notifier for (PagerDuty-style services, chat bots, a team's own automation).

The body is one JSON document per notification (``version`` 1, see :func:`payload`), signed
as :mod:`runwatch.alerting.tokens` describes, so that the receiver can reject anyone else's
calls and replays. Receivers should deduplicate on ``notification_id``: a call whose answer
was lost is sent again.

Webhook URLs often carry a secret in their path (Slack's and Discord's incoming webhooks do),
so errors name the scheme and host only, never the full URL.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import orjson

from runwatch import __version__
from runwatch.alerting.message import Message
from runwatch.alerting.notifiers.base import DeliveryError
from runwatch.alerting.tokens import webhook_signature


def payload(message: Message) -> dict[str, Any]:
    """The JSON document of ``message``."""
    return {
        "version": 1,
        "event": message.event,
        "step": message.step,
        "notification_id": message.notification_id,
        "severity": message.severity,
        "title": message.title,
        "alerts": [asdict(a) for a in message.alerts],
        "run_url": message.run_url,
        "ack_url": message.ack_url,
    }


class WebhookNotifier:
    """POSTs every message to one URL; the target is ignored (the URL is the channel's)."""

    type = "webhook"

    def __init__(
        self,
        url: str,
        secret: bytes | str,
        *,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
    ):
        parsed = httpx.URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError("a webhook URL must be http:// or https:// with a host")
        if not secret:
            raise ValueError("a webhook needs a secret to sign its calls")
        self.url = url
        self.timeout = timeout
        self._secret = secret.encode() if isinstance(secret, str) else secret
        self._clock = clock
        self._where = f"webhook {parsed.scheme}://{parsed.netloc.decode('ascii')}"

    def __repr__(self) -> str:
        return f"WebhookNotifier({self._where!r})"

    def send(self, message: Message, target: str) -> str | None:
        body = orjson.dumps(payload(message))
        timestamp = str(int(self._clock()))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"runwatch/{__version__}",
            "X-Runwatch-Event": message.event,
            "X-Runwatch-Timestamp": timestamp,
            "X-Runwatch-Signature": webhook_signature(self._secret, timestamp, body),
        }
        try:
            with httpx.Client(timeout=self.timeout, follow_redirects=False) as client:
                response = client.post(self.url, content=body, headers=headers)
        except httpx.TimeoutException:
            raise DeliveryError(f"{self._where}: timed out after {self.timeout:g} s") from None
        except httpx.HTTPError as exc:
            detail = str(exc).replace(self.url, "<url>")  # the URL may hold a secret
            raise DeliveryError(f"{self._where}: {type(exc).__name__}: {detail}") from None
        status = response.status_code
        if 200 <= status < 300:
            return None
        detail = f"{self._where}: HTTP {status}"
        snippet = " ".join(response.text[:200].split())
        if snippet:
            detail += f": {snippet}"
        if status == 429 or status >= 500:
            raise DeliveryError(
                detail, retry_after=retry_after(response.headers.get("Retry-After"), self._clock)
            )
        if 300 <= status < 400:
            detail += " (a redirect: configure the URL it points to)"
        raise DeliveryError(detail, retryable=False)


def retry_after(value: str | None, clock: Callable[[], float] = time.time) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (seconds or an HTTP date); None if absent
    or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - clock())
