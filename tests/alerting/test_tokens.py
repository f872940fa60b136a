"""Acknowledge links and webhook signatures: what they accept and what they refuse."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

import orjson
import pytest
from itsdangerous import URLSafeTimedSerializer

from runwatch.alerting.tokens import (
    ACK_SALT,
    AckToken,
    ForgedRequest,
    read_ack,
    sign_ack,
    verify_webhook_signature,
    webhook_signature,
)

SECRET = "s3cret-of-the-collector"
T0 = 1_700_000_000.0
TOKEN = AckToken(notification_id=12, alert_ids=(3, 4, 5), target="+15550100")


def test_round_trip() -> None:
    text = sign_ack(SECRET, TOKEN, now=T0)
    assert read_ack(SECRET, text, max_age=3600, now=T0 + 10) == TOKEN
    # URL-safe: it goes into a path or a query string as it is.
    assert all(c.isalnum() or c in "-_." for c in text)


def test_round_trip_on_the_real_clock_and_bytes_secret() -> None:
    text = sign_ack(SECRET.encode(), TOKEN)
    assert read_ack(SECRET.encode(), text, max_age=60) == TOKEN
    assert read_ack(SECRET, text, max_age=60) == TOKEN


def test_tampered_payload_is_refused() -> None:
    text = sign_ack(SECRET, TOKEN, now=T0)
    _, rest = text.split(".", 1)
    forged = base64.urlsafe_b64encode(orjson.dumps({"n": 12, "a": [1], "t": "+15550100"}))
    with pytest.raises(ForgedRequest, match="bad signature"):
        read_ack(SECRET, forged.decode().rstrip("=") + "." + rest, max_age=3600, now=T0)
    flipped = text[:-1] + ("A" if text[-1] != "A" else "B")
    with pytest.raises(ForgedRequest, match="bad signature"):
        read_ack(SECRET, flipped, max_age=3600, now=T0)


@pytest.mark.parametrize("text", ["", "garbage", "a.b.c", "....", "\u00e9t\u00e9"])
def test_garbage_is_refused(text: str) -> None:
    with pytest.raises(ForgedRequest, match="bad signature"):
        read_ack(SECRET, text, max_age=3600, now=T0)


def test_wrong_secret_is_refused() -> None:
    text = sign_ack(SECRET, TOKEN, now=T0)
    with pytest.raises(ForgedRequest, match="bad signature"):
        read_ack("another secret", text, max_age=3600, now=T0)


def test_expired_link() -> None:
    text = sign_ack(SECRET, TOKEN, now=T0)
    assert read_ack(SECRET, text, max_age=3600, now=T0 + 3600) == TOKEN
    with pytest.raises(ForgedRequest, match="link expired"):
        read_ack(SECRET, text, max_age=3600, now=T0 + 3601)


def test_expired_on_the_real_clock() -> None:
    text = sign_ack(SECRET, TOKEN, now=time.time() - 120)
    with pytest.raises(ForgedRequest, match="link expired"):
        read_ack(SECRET, text, max_age=60)


def test_dated_in_the_future_is_refused() -> None:
    text = sign_ack(SECRET, TOKEN, now=T0 + 100)
    with pytest.raises(ForgedRequest, match="bad signature"):
        read_ack(SECRET, text, max_age=3600, now=T0)


def test_other_salt_is_refused() -> None:
    """A token the same secret signed for something else is not an ack link."""
    other = URLSafeTimedSerializer(SECRET, salt="runwatch.other").dumps({"n": 1, "a": [], "t": ""})
    with pytest.raises(ForgedRequest, match="bad signature"):
        read_ack(SECRET, other, max_age=3600)


@pytest.mark.parametrize(
    "payload",
    [
        [1, 2],
        "text",
        {"n": 1, "a": [1]},
        {"n": "1", "a": [1], "t": "x"},
        {"n": True, "a": [1], "t": "x"},
        {"n": 1, "a": "1", "t": "x"},
        {"n": 1, "a": [1.5], "t": "x"},
        {"n": 1, "a": [1], "t": None},
    ],
)
def test_malformed_payload_is_refused(payload: object) -> None:
    """Well signed (only the secret's holder could make one) but not a token."""
    text = URLSafeTimedSerializer(SECRET, salt=ACK_SALT).dumps(payload)
    with pytest.raises(ForgedRequest, match="malformed token"):
        read_ack(SECRET, text, max_age=3600)


def test_empty_secret_is_a_configuration_error() -> None:
    with pytest.raises(ValueError):
        sign_ack("", TOKEN)


WEBHOOK_SECRET = b"webhook-secret"
BODY = b'{"version":1,"event":"firing"}'


def test_webhook_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    sig = webhook_signature(WEBHOOK_SECRET, "1700000000", BODY)
    expected = hmac.new(WEBHOOK_SECRET, b"1700000000." + BODY, hashlib.sha256).hexdigest()
    assert sig == f"sha256={expected}"


def test_verify_webhook_signature_good() -> None:
    ts = str(int(T0))
    sig = webhook_signature(WEBHOOK_SECRET, ts, BODY)
    verify_webhook_signature(WEBHOOK_SECRET, ts, BODY, sig, now=T0 + 299)
    verify_webhook_signature(WEBHOOK_SECRET, ts, BODY, sig, now=T0 - 299)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"timestamp": None}, "missing"),
        ({"signature": None}, "missing"),
        ({"signature": ""}, "missing"),
        ({"timestamp": "soon"}, "malformed timestamp"),
        ({"now": T0 + 301}, "stale timestamp"),
        ({"now": T0 - 301}, "stale timestamp"),
        ({"body": BODY + b" "}, "bad signature"),
        ({"secret": b"other"}, "bad signature"),
        ({"signature": "sha256=" + "0" * 64}, "bad signature"),
        ({"signature": "sha256=\u00e9"}, "bad signature"),
    ],
)
def test_verify_webhook_signature_refuses(change: dict[str, object], reason: str) -> None:
    ts = str(int(T0))
    args: dict[str, object] = {
        "secret": WEBHOOK_SECRET,
        "timestamp": ts,
        "body": BODY,
        "signature": webhook_signature(WEBHOOK_SECRET, ts, BODY),
        "now": T0,
    }
    args.update(change)
    with pytest.raises(ForgedRequest, match=reason):
        verify_webhook_signature(**args)  # type: ignore[arg-type]


def test_replayed_timestamp_with_other_body_is_refused() -> None:
    """The timestamp is signed too: a captured signature does not fit a new timestamp."""
    sig = webhook_signature(WEBHOOK_SECRET, str(int(T0)), BODY)
    with pytest.raises(ForgedRequest, match="bad signature"):
        verify_webhook_signature(WEBHOOK_SECRET, str(int(T0) + 1000), BODY, sig, now=T0 + 1000)
