"""Signed things that cross the trust boundary: acknowledge links and webhook signatures.

An alert's message carries a link that acknowledges its alerts without a login (a person
paged at night taps it on a phone). Whoever holds the link may acknowledge, so the link is a
token: the notification, the alerts and the target it was sent to, signed with the
collector's secret and dated, so that it expires. ``itsdangerous`` does the signing; the
clock is injectable so that expiry is tested without sleeping.

Webhooks go the other way: runwatch calls a receiver, which must be able to tell runwatch's
calls from anyone's. Each call carries ``X-Runwatch-Timestamp`` and
``X-Runwatch-Signature: sha256=<hex>``, an HMAC-SHA256 of ``"<timestamp>." + body`` with the
webhook's shared secret (the scheme of Stripe and Slack, so receivers know it). A receiver
checks it with :func:`verify_webhook_signature`, or with the same three lines in any language.

Every verifier here, and the Slack and Twilio ones beside it, raises :class:`ForgedRequest`
on failure, which the routes answer with 403 (or a page saying the link expired).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from itsdangerous import BadSignature, SignatureExpired, TimestampSigner, URLSafeTimedSerializer

ACK_SALT = "runwatch.ack"


class ForgedRequest(Exception):
    """A request that is not what it claims to be: bad signature, stale timestamp, replay,
    bad token."""


@dataclass(frozen=True, slots=True)
class AckToken:
    """What an acknowledge link stands for: these alerts of this notification, as sent to
    this target (so the acknowledgement can say who it came from)."""

    notification_id: int
    alert_ids: tuple[int, ...]
    target: str


class _ClockSigner(TimestampSigner):
    """A timestamp signer that reads the time from a given clock instead of ``time.time``."""

    def __init__(self, *args: Any, clock: Callable[[], float] = time.time, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._clock = clock

    def get_timestamp(self) -> int:
        return int(self._clock())


def _serializer(secret: str | bytes, at: float) -> URLSafeTimedSerializer:
    if not secret:
        raise ValueError("the signing secret is empty")
    return URLSafeTimedSerializer(
        secret, salt=ACK_SALT, signer=_ClockSigner, signer_kwargs={"clock": lambda: at}
    )


def sign_ack(secret: str | bytes, token: AckToken, *, now: float | None = None) -> str:
    """The URL-safe text of ``token``, signed with ``secret`` and dated ``now`` (default: the
    current time)."""
    payload = {"n": token.notification_id, "a": list(token.alert_ids), "t": token.target}
    return _serializer(secret, time.time() if now is None else now).dumps(payload)


def read_ack(secret: str | bytes, text: str, max_age: float, now: float | None = None) -> AckToken:
    """The token signed into ``text``, if ``secret`` signed it at most ``max_age`` seconds
    before ``now`` (default: the current time).

    Raises :class:`ForgedRequest` ``"link expired"`` past ``max_age``, ``"bad signature"``
    for a tampered text, another secret or a date in the future, ``"malformed token"`` for a
    signed payload that is not a token.
    """
    at = time.time() if now is None else now
    try:
        payload = _serializer(secret, at).loads(text, max_age=max_age)
    except SignatureExpired as exc:
        if exc.date_signed is not None and exc.date_signed.timestamp() > at:
            raise ForgedRequest("bad signature (dated in the future)") from None
        raise ForgedRequest("link expired") from None
    except BadSignature:
        raise ForgedRequest("bad signature") from None
    try:
        notification_id = payload["n"]
        alert_ids = payload["a"]
        target = payload["t"]
        ok = (
            _is_int(notification_id)
            and isinstance(alert_ids, list)
            and all(_is_int(i) for i in alert_ids)
            and isinstance(target, str)
        )
    except (TypeError, KeyError):
        ok = False
    if not ok:
        raise ForgedRequest("malformed token")
    return AckToken(notification_id, tuple(alert_ids), target)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def webhook_signature(secret: bytes, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>``: the HMAC-SHA256 of ``"<timestamp>." + body`` with ``secret``."""
    digest = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def verify_webhook_signature(
    secret: bytes,
    timestamp: str | None,
    body: bytes,
    signature: str | None,
    now: float,
    tolerance: float = 300,
) -> None:
    """Check a webhook call as its receiver: ``timestamp`` and ``signature`` are the values of
    ``X-Runwatch-Timestamp`` and ``X-Runwatch-Signature``, ``body`` the raw request body.

    Raises :class:`ForgedRequest` when a header is missing, the timestamp is more than
    ``tolerance`` seconds away from ``now`` (either way: a replay, or a skewed clock), or the
    signature does not match.
    """
    if not timestamp or not signature:
        raise ForgedRequest("missing X-Runwatch-Timestamp or X-Runwatch-Signature header")
    if not timestamp.isascii() or not timestamp.isdigit() or len(timestamp) > 12:
        raise ForgedRequest("malformed timestamp")
    if abs(now - int(timestamp)) > tolerance:
        raise ForgedRequest("stale timestamp")
    expected = webhook_signature(secret, timestamp, body)
    if not hmac.compare_digest(expected.encode(), signature.encode()):
        raise ForgedRequest("bad signature")
