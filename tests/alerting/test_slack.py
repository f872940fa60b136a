"""Slack: the real slack_sdk against a loopback fake; request signatures; button payloads."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import time
from collections.abc import Iterator
from urllib.parse import urlencode

import pytest

from runwatch.alerting.message import AlertView, Message
from runwatch.alerting.notifiers.base import DeliveryError, Notifier
from runwatch.alerting.notifiers.slack import SlackNotifier
from runwatch.alerting.slack_hooks import (
    SlackAction,
    parse_slack_action,
    verify_slack_request,
)
from runwatch.alerting.tokens import ForgedRequest
from tests.alerting import builders
from tests.alerting.fake_slack import FakeSlack

TOKEN = "xoxb-1111-2222-secretsecret"
SECRET = "8f742231b10e8888abcd99yyyzzz85a5"


def alert(id: int = 12, **kw: object) -> AlertView:
    return builders.alert(id, **({"run_id": 3} | kw))


def page(*alerts: AlertView, **kw: object) -> Message:
    fields: dict[str, object] = {
        "notification_id": 7,
        "alerts": alerts or (alert(),),
        "run_url": "http://runwatch.example/runs/3",
        "ack_url": "http://runwatch.example/ack/abc",
    }
    return builders.message(**(fields | kw))


@pytest.fixture
def slack() -> Iterator[FakeSlack]:
    with FakeSlack(token=TOKEN) as fake:
        yield fake


@pytest.fixture
def notifier(slack: FakeSlack) -> SlackNotifier:
    return SlackNotifier(TOKEN, base_url=slack.base_url, timeout=2.0)


def blocks_of(slack: FakeSlack, ref: str) -> dict[str, dict]:
    """The message's blocks by type (one of each in our messages)."""
    return {b["type"]: b for b in slack.message(ref).blocks or []}


# ---- pages


def test_a_page_has_the_summary_the_run_link_and_two_buttons(
    slack: FakeSlack, notifier: SlackNotifier
) -> None:
    message = page(alert(12), alert(13, kind="hang", key="", step=None, severity="warning"))
    ref = notifier.send(message, "#train-alerts")

    assert ref == "C0001:1700000000.000001"
    (req,) = slack.requests
    assert req.method == "chat.postMessage"
    assert req.authorization == f"Bearer {TOKEN}"
    assert req.body["channel"] == "#train-alerts"
    assert req.body["text"] == message.text
    assert "thread_ts" not in req.body
    blocks = blocks_of(slack, ref)
    assert blocks["header"]["text"]["text"] == message.title
    lines = blocks["section"]["text"]["text"].splitlines()
    assert lines == [
        "• #12 [critical] divergence on train/loss at step 1200: loss diverged",
        "• #13 [warning] hang: loss diverged",
    ]
    assert "<http://runwatch.example/runs/3|Open run>" in blocks["context"]["elements"][0]["text"]
    ack, resolve = blocks["actions"]["elements"]
    assert (ack["action_id"], ack["style"], ack["text"]["text"]) == (
        "runwatch_ack",
        "primary",
        "Acknowledge",
    )
    assert (resolve["action_id"], resolve["text"]["text"]) == ("runwatch_resolve", "Resolve")
    assert json.loads(ack["value"]) == json.loads(resolve["value"]) == {"alerts": [12, 13]}


def test_notifier_follows_the_protocol(notifier: SlackNotifier) -> None:
    sender: Notifier = notifier
    assert sender.type == "slack"
    assert TOKEN not in repr(notifier)


def test_without_run_url_there_is_no_link(slack: FakeSlack, notifier: SlackNotifier) -> None:
    ref = notifier.send(page(run_url=None), "C0ALERTS")
    assert ref is not None and ref.startswith("C0ALERTS:")
    assert "context" not in blocks_of(slack, ref)


def test_buttons_carry_at_most_50_alerts(slack: FakeSlack, notifier: SlackNotifier) -> None:
    many = tuple(alert(1_000_000_000 + i) for i in range(80))
    ref = notifier.send(page(*many), "#train-alerts")
    value = json.loads(blocks_of(slack, ref)["actions"]["elements"][0]["value"])
    assert value["alerts"] == [a.id for a in many[:50]]


def test_long_text_stays_within_block_kit_limits(slack: FakeSlack, notifier: SlackNotifier) -> None:
    # The fake refuses what Slack refuses (invalid_blocks), so a successful send is the check.
    many = tuple(alert(i, key="k" * 300, summary="s" * 500) for i in range(1, 40))
    ref = notifier.send(page(*many), "#train-alerts")
    blocks = blocks_of(slack, ref)
    assert len(blocks["header"]["text"]["text"]) <= 150
    assert blocks["section"]["text"]["text"].endswith("more")


def test_alert_text_cannot_make_links_or_mentions(
    slack: FakeSlack, notifier: SlackNotifier
) -> None:
    ref = notifier.send(page(alert(summary="<!channel> & <http://evil|x>")), "#a")
    section = blocks_of(slack, ref)["section"]["text"]["text"]
    assert "&lt;!channel&gt; &amp; &lt;http://evil|x&gt;" in section
    assert "<!channel>" not in slack.message(ref).text


def test_an_escalation_is_a_broadcast_reply_in_the_first_thread(
    slack: FakeSlack, notifier: SlackNotifier
) -> None:
    first = notifier.send(page(), "#train-alerts")
    assert first is not None
    again = notifier.send(page(event="escalated", step=1, thread_ref=first), "#train-alerts")

    req = slack.calls("chat.postMessage")[-1]
    channel, ts = first.split(":")
    assert (req.body["channel"], req.body["thread_ts"], req.body["reply_broadcast"]) == (
        channel,
        ts,
        True,
    )
    assert again is not None and again != first and again.startswith(f"{channel}:")
    assert slack.message(first).replies == [again.split(":")[1]]
    reply = blocks_of(slack, again)
    assert "Escalated (step 1)" in reply["context"]["elements"][0]["text"]
    assert reply["actions"]["elements"][0]["action_id"] == "runwatch_ack"


# ---- state changes


@pytest.mark.parametrize(
    ("event", "field", "note"),
    [
        ("acknowledged", "acknowledged_by", "Acknowledged by slack:ada"),
        ("resolved", "resolved_by", "Resolved by slack:ada"),
    ],
)
def test_a_state_change_rewrites_the_first_message_and_replies(
    slack: FakeSlack, notifier: SlackNotifier, event: str, field: str, note: str
) -> None:
    first = notifier.send(page(alert(12), alert(13)), "#train-alerts")
    assert first is not None
    handled = (alert(12, state=event, **{field: "slack:ada"}), alert(13, state=event))
    done = page(*handled, event=event, step=None, ack_url=None, thread_ref=first)

    assert notifier.send(done, "#train-alerts") == first

    update = slack.calls("chat.update")[-1]
    assert (update.body["channel"], update.body["ts"]) == tuple(first.split(":"))
    shown = slack.message(first)
    assert shown.updates == 1
    blocks = {b["type"]: b for b in shown.blocks or []}
    assert "actions" not in blocks, "the buttons are gone"
    assert blocks["header"]["text"]["text"] == done.title
    assert any(
        note == b["elements"][0]["text"] for b in shown.blocks or [] if b["type"] == "context"
    )
    (reply_ts,) = shown.replies
    reply = slack.message(f"{shown.channel}:{reply_ts}")
    assert reply.text == f"{note}: #12, #13"
    assert not reply.reply_broadcast


def test_a_state_change_without_thread_is_a_plain_message(
    slack: FakeSlack, notifier: SlackNotifier
) -> None:
    done = page(alert(resolved_by=None), event="resolved", step=None, ack_url=None)
    ref = notifier.send(done, "#train-alerts")
    assert ref is not None
    assert [r.method for r in slack.requests] == ["chat.postMessage"]
    blocks = slack.message(ref).blocks or []
    assert "actions" not in {b["type"] for b in blocks}
    assert blocks[-1]["elements"][0]["text"] == "Resolved"


def test_a_vanished_first_message_still_gets_the_reply(
    slack: FakeSlack, notifier: SlackNotifier
) -> None:
    first = notifier.send(page(), "#train-alerts")
    assert first is not None
    slack.fail_next(status=200, error="message_not_found")
    done = page(alert(acknowledged_by="slack:ada"), event="acknowledged", thread_ref=first)
    assert notifier.send(done, "#train-alerts") == first
    assert [r.method for r in slack.requests] == ["chat.postMessage"] * 1 + [
        "chat.update",
        "chat.postMessage",
    ]
    assert slack.message(first).replies


# ---- failures


@pytest.mark.parametrize(
    ("status", "error", "retryable"),
    [
        (200, "channel_not_found", False),  # a typo in the policy: retrying cannot help
        (200, "not_in_channel", False),  # the bot was never invited
        (200, "is_archived", False),
        (200, "token_revoked", False),
        (200, "account_inactive", False),
        (200, "invalid_blocks", False),  # our bug, not Slack's outage
        (200, "invalid_arguments", False),  # an API error at 200 is an answer
        (200, "internal_error", True),  # ... except Slack's own transient trouble
        (200, "service_unavailable", True),
        (500, "fatal_error", True),  # Slack is down
        (503, "service_unavailable", True),
    ],
)
def test_api_errors_are_classified(
    slack: FakeSlack, notifier: SlackNotifier, status: int, error: str, retryable: bool
) -> None:
    slack.fail_next(status=status, error=error)
    with pytest.raises(DeliveryError) as caught:
        notifier.send(page(), "#train-alerts")
    assert caught.value.retryable is retryable
    assert error in caught.value.detail
    assert caught.value.retry_after is None
    assert len(slack.requests) == 1, "the client makes one attempt; the outbox retries"


def test_rate_limit_is_retryable_after_slacks_delay(
    slack: FakeSlack, notifier: SlackNotifier
) -> None:
    slack.fail_next(status=429, retry_after=30)
    with pytest.raises(DeliveryError) as caught:
        notifier.send(page(), "#train-alerts")
    assert caught.value.retryable
    assert caught.value.retry_after == 30.0
    assert "ratelimited" in caught.value.detail
    assert len(slack.requests) == 1


def test_rate_limit_without_delay(slack: FakeSlack, notifier: SlackNotifier) -> None:
    slack.fail_next(status=429)
    with pytest.raises(DeliveryError) as caught:
        notifier.send(page(), "#train-alerts")
    assert caught.value.retryable and caught.value.retry_after is None


@pytest.mark.parametrize(("token", "error"), [("xoxb-wrong", "invalid_auth"), ("", "not_authed")])
def test_a_bad_token_is_final_and_not_repeated(slack: FakeSlack, token: str, error: str) -> None:
    with pytest.raises(DeliveryError) as caught:
        SlackNotifier(token, base_url=slack.base_url).send(page(), "#train-alerts")
    assert not caught.value.retryable
    assert error in caught.value.detail
    assert TOKEN not in caught.value.detail
    if token:
        assert token not in caught.value.detail


def test_a_state_update_failing_with_an_outage_is_retryable(
    slack: FakeSlack, notifier: SlackNotifier
) -> None:
    first = notifier.send(page(), "#train-alerts")
    slack.fail_next(status=502)
    done = page(alert(acknowledged_by="slack:ada"), event="acknowledged", thread_ref=first)
    with pytest.raises(DeliveryError) as caught:
        notifier.send(done, "#train-alerts")
    assert caught.value.retryable
    assert [r.method for r in slack.requests] == ["chat.postMessage", "chat.update"]


def test_server_down_is_retryable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens on the port any more: the connection is refused.
    notifier = SlackNotifier(TOKEN, base_url=f"http://127.0.0.1:{port}/api/", timeout=2.0)
    with pytest.raises(DeliveryError) as caught:
        notifier.send(page(), "#train-alerts")
    assert caught.value.retryable
    assert "network error" in caught.value.detail
    assert TOKEN not in caught.value.detail


def test_a_slow_server_times_out_as_retryable(slack: FakeSlack) -> None:
    slack.stall_next(seconds=5)
    notifier = SlackNotifier(TOKEN, base_url=slack.base_url, timeout=0.3)
    started = time.monotonic()
    with pytest.raises(DeliveryError) as caught:
        notifier.send(page(), "#train-alerts")
    assert time.monotonic() - started < 3
    assert caught.value.retryable
    assert "network error" in caught.value.detail


def test_secrets_stay_out_of_logs(
    slack: FakeSlack, notifier: SlackNotifier, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    slack.fail_next(status=500)
    with pytest.raises(DeliveryError):
        notifier.send(page(), "#train-alerts")
    first = notifier.send(page(), "#train-alerts")
    slack.fail_next(status=200, error="message_not_found")
    notifier.send(page(event="acknowledged", thread_ref=first), "#train-alerts")
    assert TOKEN not in caplog.text


# ---- request signatures


def sign(body: bytes, timestamp: str, secret: str = SECRET) -> str:
    """What Slack puts in X-Slack-Signature (written out here, independent of slack_sdk)."""
    base = f"v0:{timestamp}:".encode() + body
    return "v0=" + hmac.new(secret.encode(), base, hashlib.sha256).hexdigest()


NOW = 1_700_000_000.0
BODY = b"payload=%7B%22type%22%3A%22block_actions%22%7D"


def test_a_signed_request_passes() -> None:
    ts = str(int(NOW) - 10)
    verify_slack_request(BODY, ts, sign(BODY, ts), SECRET, now=NOW)


@pytest.mark.parametrize(
    ("body", "timestamp", "signature", "reason"),
    [
        # another secret signed it
        (BODY, "1700000000", sign(BODY, "1700000000", "other"), "bad signature"),
        # the body was altered after signing
        (BODY + b"x", "1700000000", sign(BODY, "1700000000"), "bad signature"),
        # the timestamp was altered (a replay with a fresh date)
        (BODY, "1700000001", sign(BODY, "1700000000"), "bad signature"),
        # signed six minutes ago: a replay
        (BODY, "1699999640", sign(BODY, "1699999640"), "stale timestamp"),
        # dated six minutes ahead
        (BODY, "1700000360", sign(BODY, "1700000360"), "stale timestamp"),
        # no timestamp header
        (BODY, None, sign(BODY, "1700000000"), "missing X-Slack-Request-Timestamp"),
        # no signature header
        (BODY, "1700000000", None, "missing X-Slack-Signature"),
        (BODY, "1700000000", "", "missing X-Slack-Signature"),
        # a timestamp that is no number
        (BODY, "yesterday", sign(BODY, "yesterday"), "malformed"),
        # a body that is not UTF-8 cannot come from Slack
        (b"\xff\xfe", "1700000000", sign(b"\xff\xfe", "1700000000"), "bad signature"),
    ],
)
def test_forged_requests_are_refused(
    body: bytes, timestamp: str | None, signature: str | None, reason: str
) -> None:
    with pytest.raises(ForgedRequest, match=reason):
        verify_slack_request(body, timestamp, signature, SECRET, now=NOW)


def test_the_five_minute_window_is_inclusive() -> None:
    for ts in ("1699999700", "1700000300"):
        verify_slack_request(BODY, ts, sign(BODY, ts), SECRET, now=NOW)


def test_an_empty_signing_secret_is_a_configuration_error() -> None:
    with pytest.raises(ValueError):
        verify_slack_request(BODY, "1700000000", sign(BODY, "1700000000"), "", now=NOW)


# ---- button payloads


def click(**kw: object) -> dict:
    payload: dict = {
        "type": "block_actions",
        "user": {"id": "U0ADA", "username": "ada", "name": "ada", "team_id": "T1"},
        "response_url": "https://hooks.slack.com/actions/T1/1/abc",
        "container": {"type": "message", "channel_id": "C0001", "message_ts": "1.2"},
        "actions": [
            {
                "type": "button",
                "action_id": "runwatch_ack",
                "block_id": "runwatch_actions",
                "value": '{"alerts":[12,13]}',
                "action_ts": "1700000000.1",
            }
        ],
    }
    payload.update(kw)
    return payload


def form(payload: object) -> bytes:
    return urlencode({"payload": json.dumps(payload)}).encode()


def test_a_click_on_acknowledge() -> None:
    assert parse_slack_action(form(click())) == SlackAction(
        action="ack",
        alert_ids=(12, 13),
        user="slack:ada",
        response_url="https://hooks.slack.com/actions/T1/1/abc",
    )


def test_a_click_on_resolve_by_a_user_without_name() -> None:
    resolve = {"action_id": "runwatch_resolve", "value": '{"alerts": [5]}'}
    action = parse_slack_action(form(click(actions=[resolve], user={"id": "U9"})))
    assert (action.action, action.alert_ids, action.user) == ("resolve", (5,), "slack:U9")


def test_the_buttons_we_post_parse_back(slack: FakeSlack, notifier: SlackNotifier) -> None:
    ref = notifier.send(page(alert(3), alert(4)), "#a")
    for button in blocks_of(slack, ref)["actions"]["elements"]:
        clicked = parse_slack_action(form(click(actions=[button])))
        assert clicked.alert_ids == (3, 4)
        assert (
            clicked.action
            == {"runwatch_ack": "ack", "runwatch_resolve": "resolve"}[button["action_id"]]
        )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "payload"),  # empty
        (b"\xff", "URL-encoded form"),  # not UTF-8
        (b"text=hello", "payload"),  # a slash command, not an interaction
        (b"payload=%7Bnot+json", "not JSON"),
        (form([1, 2]), "not a JSON object"),
        (form(click(type="view_submission")), "block_actions"),
        (form(click(actions=None)), "actions"),
        (form(click(actions=[{"action_id": "other", "value": "{}"}])), "no runwatch action"),
        (form(click(actions=[{"action_id": "runwatch_ack"}])), "value"),
        (form(click(actions=[{"action_id": "runwatch_ack", "value": "12"}])), "JSON object"),
        (form(click(actions=[{"action_id": "runwatch_ack", "value": '{"alerts": []}'}])), "alerts"),
        (
            form(click(actions=[{"action_id": "runwatch_ack", "value": '{"alerts": ["1"]}'}])),
            "alerts",
        ),
        (
            form(click(actions=[{"action_id": "runwatch_ack", "value": '{"alerts": [true]}'}])),
            "alerts",
        ),
        (form(click(user=None)), "user"),
        (form(click(user={"team_id": "T1"})), "user"),
    ],
)
def test_malformed_payloads_are_refused(body: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_slack_action(body)


def test_two_payload_fields_are_refused() -> None:
    body = form(click()) + b"&" + form(click())
    with pytest.raises(ValueError, match="single 'payload'"):
        parse_slack_action(body)
