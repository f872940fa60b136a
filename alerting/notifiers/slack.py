"""Slack: one message per page, buttons to acknowledge or resolve, updates in its thread.

A page is a ``chat.postMessage`` with Block Kit blocks: the title, one line per alert, the
run link and two buttons (``runwatch_ack``, ``runwatch_resolve``) whose value lists the
alert ids. A click comes back to the collector as a Slack interactivity request (see
:mod:`runwatch.alerting.slack_hooks`). Re-notifications of the same alerts (escalations,
repeats) are replies in the first message's thread, broadcast to the channel so that they
are seen; a state change (acknowledged, resolved) rewrites the first message without its
buttons, so nobody clicks on a page that is already handled, and says so in the thread.

The client makes one attempt per call (``retry_handlers=[]``): retries belong to the
service's outbox, which knows the backoff and Slack's ``Retry-After``.
"""

from __future__ import annotations

import http.client
import json
import logging
from typing import Any
from urllib.parse import quote

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError, SlackClientError

from runwatch.alerting.message import STATE_EVENTS, Message
from runwatch.alerting.notifiers.base import DeliveryError

log = logging.getLogger(__name__)

ACK_ACTION = "runwatch_ack"
RESOLVE_ACTION = "runwatch_resolve"
ACTIONS_BLOCK = "runwatch_actions"
MAX_BUTTON_ALERTS = 50
"""Alert ids a button carries at most (Slack caps a button's value at 2,000 characters)."""

# Slack's Block Kit limits (https://api.slack.com/reference/block-kit/blocks).
_HEADER_MAX = 150
_SECTION_MAX = 3000
_LINE_MAX = 500
"""Characters of one alert's line, so that one long summary cannot hide the others."""

FINAL_ERRORS = frozenset(
    {
        "invalid_auth",
        "not_authed",
        "account_inactive",
        "channel_not_found",
        "not_in_channel",
        "is_archived",
        "token_revoked",
    }
)
"""API errors that say the token or the channel is wrong: retrying cannot help."""

TRANSIENT_ERRORS = frozenset(
    {"internal_error", "fatal_error", "service_unavailable", "request_timeout"}
)
"""API errors Slack may answer with HTTP 200 that its docs describe as passing trouble on
its side: retryable, like a 5xx (a page sent twice beats a page lost)."""

_STALE_MESSAGE_ERRORS = frozenset(
    {"message_not_found", "cant_update_message", "edit_window_closed"}
)
"""``chat.update`` errors after which the thread reply is still worth sending."""


class SlackNotifier:
    """Posts pages to Slack channels with a bot token (scope ``chat:write``).

    The target is a channel name (``#train-alerts``) or id (``C0123ABCD``); the bot must be a
    member of it. ``base_url`` points the client elsewhere (a test server).

    >>> SlackNotifier("xoxb-1-2-3", timeout=5.0).type
    'slack'
    """

    type = "slack"

    def __init__(
        self, token: str, *, base_url: str = "https://slack.com/api/", timeout: float = 10.0
    ) -> None:
        self.base_url = base_url
        self.timeout = timeout
        # WebClient's timeout is annotated as int; urllib takes any number of seconds.
        self._client = WebClient(
            token=token,
            base_url=base_url,
            timeout=timeout,  # type: ignore[arg-type]
            retry_handlers=[],
        )

    def __repr__(self) -> str:
        return f"SlackNotifier(base_url={self.base_url!r}, timeout={self.timeout!r})"

    def send(self, message: Message, target: str) -> str | None:
        """Post ``message`` to channel ``target``; return ``"<channel_id>:<ts>"``."""
        thread = _split_ref(message.thread_ref)
        if message.event in STATE_EVENTS:
            return self._send_state(message, target, thread)
        return self._send_page(message, target, thread)

    def _send_page(self, message: Message, target: str, thread: tuple[str, str] | None) -> str:
        blocks = [*summary_blocks(message), actions_block(message)]
        if thread is None:
            return self._post(target, target, message, blocks)
        # The reply goes where the first message is, which is also how Slack knows it by id
        # when the target is a #name.
        channel, ts = thread
        return self._post(target, channel, message, blocks, thread_ts=ts, reply_broadcast=True)

    def _post(
        self, target: str, channel: str, message: Message, blocks: list[dict], **kwargs: Any
    ) -> str:
        """``chat.postMessage`` of ``message`` with ``blocks``; its ``"<channel_id>:<ts>"``."""
        resp = self._call(
            "chat.postMessage",
            target,
            channel=channel,
            text=escape(message.text),
            blocks=blocks,
            unfurl_links=False,
            unfurl_media=False,
            **kwargs,
        )
        return f"{resp['channel']}:{resp['ts']}"

    def _send_state(self, message: Message, target: str, thread: tuple[str, str] | None) -> str:
        note = state_note(message)
        blocks = [*summary_blocks(message), _context(escape(note))]
        if thread is None:
            return self._post(target, target, message, blocks)
        channel, ts = thread
        # The rewrite is cosmetic: if the first message is gone, the reply still tells.
        self._call(
            "chat.update",
            target,
            tolerate=_STALE_MESSAGE_ERRORS,
            channel=channel,
            ts=ts,
            text=escape(message.text),
            blocks=blocks,
        )
        ids = ", ".join(f"#{a.id}" for a in message.alerts)
        self._call(
            "chat.postMessage",
            target,
            channel=channel,
            thread_ts=ts,
            text=escape(f"{note}: {ids}"),
            unfurl_links=False,
            unfurl_media=False,
        )
        return f"{channel}:{ts}"

    def _call(
        self, method: str, target: str, *, tolerate: frozenset[str] = frozenset(), **kwargs: Any
    ) -> Any:
        """One API call; every failure comes out as a :class:`DeliveryError`, except the API
        errors named in ``tolerate``, which are logged and answered with None."""
        try:
            return self._client.api_call(method, json=kwargs)
        except SlackApiError as exc:
            err = api_error(method, target, exc)
            if _error_code(exc) in tolerate:
                log.info("%s; going on", err.detail)
                return None
            raise err from None
        except (OSError, http.client.HTTPException) as exc:
            # URLError (refused, DNS), TimeoutError, ConnectionResetError, RemoteDisconnected.
            reason = getattr(exc, "reason", None) or exc
            raise DeliveryError(f"slack {method} to {target}: network error: {reason}") from None
        except SlackClientError as exc:
            raise DeliveryError(
                f"slack {method} to {target}: {type(exc).__name__}", retryable=False
            ) from None


def api_error(method: str, target: str, exc: SlackApiError) -> DeliveryError:
    """Classify a Slack API error: 429/``ratelimited``, 5xx and Slack's transient errors
    retryable; bad token or channel and every other API error (our request) final."""
    status = int(getattr(exc.response, "status_code", 0) or 0)
    error = _error_code(exc)
    detail = f"slack {method} to {target}: {error} (HTTP {status})"
    if status == 429 or error == "ratelimited":
        headers = getattr(exc.response, "headers", None) or {}
        return DeliveryError(detail, retryable=True, retry_after=_retry_after(headers))
    if error in FINAL_ERRORS:
        return DeliveryError(detail, retryable=False)
    return DeliveryError(detail, retryable=status >= 500 or error in TRANSIENT_ERRORS)


def _error_code(exc: SlackApiError) -> str:
    data = getattr(exc.response, "data", None)
    return str(data.get("error") or "unknown_error") if isinstance(data, dict) else "bad_response"


def summary_blocks(message: Message) -> list[dict[str, Any]]:
    """Title, one line per alert and the run link: what every Slack message shows."""
    blocks: list[dict[str, Any]] = [
        {
            "type": "header",
            "text": {"type": "plain_text", "text": _clip(message.title, _HEADER_MAX)},
        },
        {"type": "section", "text": {"type": "mrkdwn", "text": _alert_lines(message)}},
    ]
    notes = []
    if message.run_url:
        notes.append(f"<{_link(message.run_url)}|Open run>")
    if message.event == "escalated":
        notes.append(
            f"Escalated (step {message.step})" if message.step is not None else "Escalated"
        )
    elif message.event == "repeat":
        notes.append("Still firing")
    if notes:
        blocks.append(_context("  ·  ".join(notes)))
    return blocks


def actions_block(message: Message) -> dict[str, Any]:
    """The Acknowledge and Resolve buttons for (at most 50 of) the message's alerts."""
    value = json.dumps(
        {"alerts": [a.id for a in message.alerts[:MAX_BUTTON_ALERTS]]}, separators=(",", ":")
    )
    return {
        "type": "actions",
        "block_id": ACTIONS_BLOCK,
        "elements": [
            {
                "type": "button",
                "action_id": ACK_ACTION,
                "style": "primary",
                "text": {"type": "plain_text", "text": "Acknowledge"},
                "value": value,
            },
            {
                "type": "button",
                "action_id": RESOLVE_ACTION,
                "text": {"type": "plain_text", "text": "Resolve"},
                "value": value,
            },
        ],
    }


def state_note(message: Message) -> str:
    """``Acknowledged by slack:alice`` (or without ``by`` when nobody is recorded)."""
    if message.event == "acknowledged":
        who = next((a.acknowledged_by for a in message.alerts if a.acknowledged_by), None)
    else:
        who = next((a.resolved_by for a in message.alerts if a.resolved_by), None)
    verb = message.event.capitalize()
    return f"{verb} by {who}" if who else verb


def escape(text: str) -> str:
    """Slack's three control characters, so alert text cannot make links or mentions."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _alert_lines(message: Message) -> str:
    lines: list[str] = []
    size = 0
    for i, a in enumerate(message.alerts):
        line = _clip(f"• #{a.id} [{a.severity}] {escape(a.headline)}", _LINE_MAX)
        rest = len(message.alerts) - i
        if size + len(line) + 1 > _SECTION_MAX - 40:
            lines.append(f"… and {rest} more")
            break
        lines.append(line)
        size += len(line) + 1
    return _clip("\n".join(lines), _SECTION_MAX)


def _context(mrkdwn: str) -> dict[str, Any]:
    return {"type": "context", "elements": [{"type": "mrkdwn", "text": mrkdwn}]}


def _link(url: str) -> str:
    """The URL with the characters that end a Slack link (``|``, ``>``, space) encoded."""
    return quote(url, safe=":/?#[]@!$&'()*+,;=%~")


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _split_ref(ref: str | None) -> tuple[str, str] | None:
    """``"C0123:1700000000.000100"`` -> ``("C0123", "1700000000.000100")``."""
    if not ref:
        return None
    channel, sep, ts = ref.partition(":")
    return (channel, ts) if sep and channel and ts else None


def _retry_after(headers: Any) -> float | None:
    for key, value in dict(headers).items():
        if str(key).lower() == "retry-after":
            if isinstance(value, list):
                value = value[0] if value else None
            try:
                return max(0.0, float(value))
            except (TypeError, ValueError):
                return None
    return None
