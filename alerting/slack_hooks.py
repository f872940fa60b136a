"""What Slack sends back when someone clicks a button: checked, then parsed.

Slack signs every interactivity request with the app's signing secret
(``X-Slack-Signature: v0=<hmac>`` over ``v0:<timestamp>:<body>``) and dates it
(``X-Slack-Request-Timestamp``). :func:`verify_slack_request` refuses a request whose
signature does not match or whose date is more than five minutes away from ``now``, which
also bounds replays. Only then does :func:`parse_slack_action` read the body, a form with
one ``payload`` field holding the ``block_actions`` JSON.

The collector's ``POST /api/v1/hooks/slack/interactivity`` route calls both, with the raw
body: verification needs the exact bytes Slack signed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qs

from slack_sdk.signature import Clock, SignatureVerifier

from runwatch.alerting.notifiers.slack import ACK_ACTION, RESOLVE_ACTION
from runwatch.alerting.tokens import ForgedRequest

MAX_SKEW = 300
MAX_DIGITS = 12
"""Unix seconds have 10 digits until 2286; a longer timestamp is not one."""
"""Seconds a request's timestamp may be away from ``now`` (Slack's own recommendation)."""

_ACTIONS: dict[str, Literal["ack", "resolve"]] = {ACK_ACTION: "ack", RESOLVE_ACTION: "resolve"}


class _FixedClock(Clock):
    """The verifier's clock, stopped at the ``now`` it is given."""

    def __init__(self, now: float) -> None:
        self._now = now

    def now(self) -> float:
        return self._now


def verify_slack_request(
    body: bytes, timestamp: str | None, signature: str | None, signing_secret: str, now: float
) -> None:
    """Raise :class:`ForgedRequest` unless Slack signed ``body`` at ``timestamp``, within
    five minutes of ``now``. An empty ``signing_secret`` is a configuration error
    (``ValueError``), not a forged request.

    >>> import hashlib, hmac
    >>> body = b"payload=%7B%7D"
    >>> sig = "v0=" + hmac.new(b"s3cret", b"v0:1700000000:" + body, hashlib.sha256).hexdigest()
    >>> verify_slack_request(body, "1700000000", sig, "s3cret", now=1700000060.0)
    >>> verify_slack_request(body, "1700000000", sig, "s3cret", now=1700000400.0)
    Traceback (most recent call last):
    ...
    runwatch.alerting.tokens.ForgedRequest: stale timestamp
    """
    verifier = SignatureVerifier(signing_secret, clock=_FixedClock(now))
    if not timestamp:
        raise ForgedRequest("missing X-Slack-Request-Timestamp header")
    if not signature:
        raise ForgedRequest("missing X-Slack-Signature header")
    if not timestamp.isascii() or not timestamp.isdigit() or len(timestamp) > MAX_DIGITS:
        raise ForgedRequest("malformed X-Slack-Request-Timestamp header")
    if abs(now - int(timestamp)) > MAX_SKEW:
        raise ForgedRequest("stale timestamp")
    try:
        valid = verifier.is_valid(body=body, timestamp=timestamp, signature=signature)
    except UnicodeDecodeError:
        # Slack sends URL-encoded ASCII; anything else was not written by Slack.
        raise ForgedRequest("bad signature") from None
    if not valid:
        raise ForgedRequest("bad signature")


@dataclass(frozen=True, slots=True)
class SlackAction:
    """One button click: what to do, to which alerts, by whom."""

    action: Literal["ack", "resolve"]
    alert_ids: tuple[int, ...]
    user: str
    """``slack:<username>`` (the user's id when Slack gives no name), as the alert records it."""
    response_url: str | None
    """Where Slack accepts a reply to the click for 30 minutes (an ephemeral note)."""


def parse_slack_action(body: bytes) -> SlackAction:
    """Read a verified ``block_actions`` request; ``ValueError`` says what is wrong with it.

    >>> import json
    >>> from urllib.parse import urlencode
    >>> payload = {"type": "block_actions", "user": {"id": "U1", "username": "ada"},
    ...            "actions": [{"action_id": "runwatch_ack", "value": '{"alerts": [3, 4]}'}]}
    >>> parse_slack_action(urlencode({"payload": json.dumps(payload)}).encode())
    SlackAction(action='ack', alert_ids=(3, 4), user='slack:ada', response_url=None)
    """
    try:
        form = parse_qs(body.decode("utf-8"), strict_parsing=True)
    except (UnicodeDecodeError, ValueError):
        raise ValueError("body is not a URL-encoded form") from None
    fields = form.get("payload")
    if not fields or len(fields) != 1:
        raise ValueError("body has no single 'payload' field")
    payload = _json_object(fields[0], "payload")
    if payload.get("type") != "block_actions":
        raise ValueError(f"payload type is {payload.get('type')!r}, not 'block_actions'")
    actions = payload.get("actions")
    if not isinstance(actions, list):
        raise ValueError("payload has no 'actions' list")
    ours = [a for a in actions if isinstance(a, dict) and a.get("action_id") in _ACTIONS]
    if not ours:
        raise ValueError(f"no runwatch action among the payload's actions ({ACK_ACTION!r} ...)")
    action = ours[0]
    value = action.get("value")
    if not isinstance(value, str):
        raise ValueError("action has no 'value'")
    alerts = _json_object(value, "action value").get("alerts")
    if (
        not isinstance(alerts, list)
        or not alerts
        or not all(type(i) is int and i > 0 for i in alerts)
    ):
        raise ValueError("action value has no 'alerts' list of positive integers")
    user = payload.get("user")
    if not isinstance(user, dict):
        raise ValueError("payload has no 'user'")
    name = user.get("username") or user.get("name") or user.get("id")
    if not isinstance(name, str) or not name:
        raise ValueError("payload user has neither a name nor an id")
    response_url = payload.get("response_url")
    return SlackAction(
        action=_ACTIONS[action["action_id"]],
        alert_ids=tuple(alerts),
        user=f"slack:{name}",
        response_url=response_url if isinstance(response_url, str) and response_url else None,
    )


def _json_object(text: str, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except ValueError:
        raise ValueError(f"{what} is not JSON") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{what} is not a JSON object")
    return obj
