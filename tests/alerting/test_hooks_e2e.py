"""Acknowledging from where the page reached a person, end to end.

A real collector under uvicorn sends its alerts with the real notifiers to loopback fakes
(Slack's Web API, Twilio's REST API, an SMTP server, a webhook receiver). Each test then
plays the person and the provider: it takes the button, the ``<Gather>`` action or the link
out of what the fake received, answers the collector the way Slack, Twilio or a browser
would (signed as they sign), and checks that the alert is acknowledged by whom it should
be, that the escalation stops, that the channels showing state are told, and that forged,
stale, tampered, expired and replayed requests change nothing.

Escalation steps are seconds apart (``alert_tick_seconds=0.05``, ``group_wait: 0``), so a
later step that must *not* happen is waited out for real; each test does so once.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import html
import json
import re
import socket
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
import yaml

from runwatch.alerting.tokens import ForgedRequest, verify_webhook_signature
from runwatch.collector.server import ServerThread
from runwatch.collector.storage import alerts as db
from runwatch.collector.storage import notifications as outbox_db
from runwatch.settings import Settings
from tests.alerting.fake_slack import FakeSlack, SlackRequest
from tests.alerting.fake_smtp import Recorder, smtp_server
from tests.alerting.fake_twilio import ACCOUNT_SID, AUTH_TOKEN, FROM_NUMBER, FakeTwilio, sign
from tests.conftest import Collector, wait_for

T = TypeVar("T")

PHONE = "+15550100"
EMAIL = "oncall@example.com"
SLACK_CHANNEL = "#train-alerts"
BOT_TOKEN = "xoxb-e2e-bot-token"
SIGNING_SECRET = "e2e-slack-signing-secret"
WEBHOOK_SECRET = "e2e-webhook-secret"
WEBHOOK_SECRET_ENV = "RUNWATCH_E2E_WEBHOOK_SECRET"
WEBHOOK_PATH = "/services/T0001/B0001/s3cr3tPathT0ken"
"""Incoming-webhook URLs (Slack's, Discord's) carry a secret in their path, as this one does."""
INTERACTIVITY = "/api/v1/hooks/slack/interactivity"
DEADLINE = 10.0
wait = functools.partial(wait_for, timeout=DEADLINE)


# ---- a webhook receiver ------------------------------------------------------------------


@dataclass(frozen=True)
class HookCall:
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.body)  # type: ignore[no-any-return]


class WebhookReceiver:
    """An HTTP server on 127.0.0.1 that answers 200 to every POST and keeps it."""

    def __init__(self) -> None:
        self.calls: list[HookCall] = []
        lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with lock:
                    receiver.calls.append(HookCall(dict(self.headers.items()), body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="webhook-receiver", daemon=True
        )
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_port}{WEBHOOK_PATH}"

    def events(self) -> list[tuple[str, list[int]]]:
        """(event, alert ids) of every call so far."""
        return [(c.json["event"], [a["id"] for a in c.json["alerts"]]) for c in list(self.calls)]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


# ---- the world: fakes, a policy, a collector ------------------------------------------------


@dataclass
class World:
    slack: FakeSlack
    twilio: FakeTwilio
    mail: Recorder
    smtp_port: int
    hook: WebhookReceiver
    tmp_path: Path
    db_url: str

    def policy(self, steps: list[dict[str, Any]], **alerting: Any) -> str:
        """A policy file whose one escalation takes ``steps``, for every alert."""
        config = {
            "group_wait": 0,
            "group_interval": 0,
            "resolve_after": "never",
            "channels": {
                "slack": {"type": "slack", "channel": SLACK_CHANNEL},
                "sms": {"type": "sms", "to": [PHONE]},
                "call": {"type": "call", "to": [PHONE]},
                "email": {"type": "email", "to": [EMAIL]},
                "hook": {"type": "webhook", "url": self.hook.url, "secret_env": WEBHOOK_SECRET_ENV},
                "log": {"type": "console", "label": "log"},
            },
            "escalations": {"page": {"steps": steps, "then": "stop"}},
            "routes": [{"escalation": "page"}],
            **alerting,
        }
        path = self.tmp_path / "policy.yaml"
        path.write_text(yaml.safe_dump({"version": 1, "rules": [], "alerting": config}))
        return str(path)

    @contextmanager
    def collector(self, steps: list[dict[str, Any]], **alerting: Any) -> Iterator[Collector]:
        """A collector on a port chosen first, so that its public URL is its own."""
        port = free_port()
        settings = Settings(
            db=self.db_url,
            host="127.0.0.1",
            port=port,
            public_url=f"http://127.0.0.1:{port}",
            policy=self.policy(steps, **alerting),
            alert_tick_seconds=0.05,
            secret_key="e2e-link-secret-of-at-least-32-characters",
            slack_bot_token=BOT_TOKEN,
            slack_signing_secret=SIGNING_SECRET,
            slack_api_url=self.slack.base_url,
            twilio_account_sid=ACCOUNT_SID,
            twilio_auth_token=AUTH_TOKEN,
            twilio_from_number=FROM_NUMBER,
            twilio_api_url=self.twilio.api_url,
            smtp_host="127.0.0.1",
            smtp_port=self.smtp_port,
            smtp_starttls=False,
        )
        thread = ServerThread(settings).start()
        try:
            assert thread.url == settings.public_url
            with httpx.Client(base_url=thread.url, timeout=30) as http:
                yield Collector(thread, http)
        finally:
            thread.stop()


@pytest.fixture
def world(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    monkeypatch.setenv(WEBHOOK_SECRET_ENV, WEBHOOK_SECRET)
    mail = Recorder()
    hook = WebhookReceiver()
    try:
        with FakeSlack(token=BOT_TOKEN) as slack, FakeTwilio() as twilio, smtp_server(mail) as smtp:
            yield World(slack, twilio, mail, smtp.port, hook, tmp_path, db_url)
    finally:
        hook.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---- helpers ----------------------------------------------------------------------------------


def raise_alert(collector: Collector, run_name: str, kind: str, key: str = "") -> int:
    with collector.client() as client:
        run = client.create_run("llm", run_name)["id"]
    alerter = collector.thread.app.state.alerter
    return alerter.raise_alert(  # type: ignore[no-any-return]
        run_id=run,
        kind=kind,
        key=key,
        severity="critical",
        summary=f"{kind} on {run_name}",
        source="test",
    ).id


def alert(collector: Collector, alert_id: int) -> db.AlertRecord:
    with collector.store.read() as conn:
        return db.get_alert(conn, alert_id)


def transitions(collector: Collector, alert_id: int) -> list[tuple[str, str]]:
    """(type, by) of the alert's acknowledged/resolved events."""
    with collector.store.read() as conn:
        return [
            (e.type, e.by)
            for e in db.events_of(conn, alert_id)
            if e.type in ("acknowledged", "resolved")
        ]


def notifications(collector: Collector, alert_id: int) -> list[outbox_db.NotificationRecord]:
    with collector.store.read() as conn:
        return outbox_db.notifications_of(conn, alert_id)


def assert_firing(collector: Collector, alert_id: int) -> None:
    found = alert(collector, alert_id)
    assert (found.state, found.acknowledged_by, found.resolved_by) == ("firing", None, None)
    assert transitions(collector, alert_id) == []


def sleep_until(at: float) -> None:
    time.sleep(max(0.0, at - time.time()))


# ---- Slack ----------------------------------------------------------------------------------


def posted_buttons(slack: FakeSlack) -> dict[int, tuple[SlackRequest, str]]:
    """Alert id -> (the chat.postMessage with buttons about it, the buttons' value)."""
    found: dict[int, tuple[SlackRequest, str]] = {}
    for request in slack.calls("chat.postMessage"):
        blocks = request.body.get("blocks") or []
        if isinstance(blocks, str):
            blocks = json.loads(blocks)
        for block in blocks:
            if block.get("type") != "actions":
                continue
            values = {e["action_id"]: e["value"] for e in block["elements"]}
            assert values["runwatch_ack"] == values["runwatch_resolve"]
            for alert_id in json.loads(values["runwatch_ack"])["alerts"]:
                found[alert_id] = (request, values["runwatch_ack"])
    return found


def click(value: str, action_id: str, user: str, ref: str) -> bytes:
    """The form body Slack posts when ``user`` clicks a button of message ``ref``."""
    channel, ts = ref.split(":")
    payload = {
        "type": "block_actions",
        "user": {"id": f"U{user.upper()}", "username": user, "name": user, "team_id": "T0001"},
        "api_app_id": "A0001",
        "token": "deprecated-verification-token",
        "container": {"type": "message", "message_ts": ts, "channel_id": channel},
        "trigger_id": "1.2.3",
        "team": {"id": "T0001", "domain": "example"},
        "channel": {"id": channel, "name": SLACK_CHANNEL.lstrip("#")},
        "message": {"type": "message", "ts": ts, "text": "..."},
        "response_url": "https://hooks.slack.com/actions/T0001/1/unused",
        "actions": [
            {
                "action_id": action_id,
                "block_id": "runwatch_actions",
                "type": "button",
                "value": value,
                "action_ts": f"{time.time():.6f}",
            }
        ],
    }
    return urlencode({"payload": json.dumps(payload)}).encode()


def slack_headers(
    body: bytes, *, at: float | None = None, secret: str = SIGNING_SECRET
) -> dict[str, str]:
    """Headers as Slack signs a request: ``v0=HMAC-SHA256(secret, "v0:<ts>:<body>")``."""
    ts = str(int(time.time() if at is None else at))
    digest = hmac.new(secret.encode(), f"v0:{ts}:".encode() + body, hashlib.sha256).hexdigest()
    return {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Slack-Request-Timestamp": ts,
        "X-Slack-Signature": f"v0={digest}",
    }


def context_texts(blocks: list[dict[str, Any]] | None) -> list[str]:
    return [
        e["text"] for b in blocks or [] if b["type"] == "context" for e in b.get("elements", [])
    ]


def test_slack_buttons_acknowledge_and_resolve_and_refuse_forgeries(world: World) -> None:
    steps = [
        {"notify": ["slack", "hook", "log"]},
        {"after": "3s", "notify": ["sms"]},
        {"after": "4s", "notify": ["call"]},
    ]
    with world.collector(steps) as collector:
        raised_at = time.time()
        first = raise_alert(collector, "nightly-a", "divergence", "train/loss")
        second = raise_alert(collector, "nightly-b", "hang")
        buttons = wait(
            lambda: (found := posted_buttons(world.slack)).keys() >= {first, second} and found,
            "both Slack messages",
        )
        (ack_post, ack_value), (resolve_post, resolve_value) = buttons[first], buttons[second]
        assert json.loads(ack_value) == {"alerts": [first]}
        assert ack_post.body["channel"] == SLACK_CHANNEL
        assert ack_post.authorization == f"Bearer {BOT_TOKEN}"
        ack_ref = f"{ack_post.response['channel']}:{ack_post.response['ts']}"
        resolve_ref = f"{resolve_post.response['channel']}:{resolve_post.response['ts']}"

        body = click(ack_value, "runwatch_ack", "ana", ack_ref)
        now = time.time()
        refused = {
            "bad signature": (body, slack_headers(body, secret="not-the-signing-secret")),
            "body altered after signing": (
                body.replace(b"runwatch_ack", b"runwatch_resolve"),
                slack_headers(body),
            ),
            "6 minutes old": (body, slack_headers(body, at=now - 360)),
            "6 minutes ahead": (body, slack_headers(body, at=now + 360)),
            "no headers": (body, {"Content-Type": "application/x-www-form-urlencoded"}),
            "no signature": (
                body,
                {k: v for k, v in slack_headers(body).items() if k != "X-Slack-Signature"},
            ),
            "no timestamp": (
                body,
                {k: v for k, v in slack_headers(body).items() if k != "X-Slack-Request-Timestamp"},
            ),
        }
        for case, (content, headers) in refused.items():
            response = collector.http.post(INTERACTIVITY, content=content, headers=headers)
            assert response.status_code == 401, (case, response.text)
            assert response.json()["error"] == "unauthorized", case
            assert_firing(collector, first)
        stale = slack_headers(body, at=now - 360)
        assert (
            "stale timestamp"
            in collector.http.post(INTERACTIVITY, content=body, headers=stale).json()["detail"]
        )

        # Ana clicks Acknowledge.
        headers = slack_headers(body)
        response = collector.http.post(INTERACTIVITY, content=body, headers=headers)
        assert response.status_code == 200, response.text
        acked = alert(collector, first)
        assert (acked.state, acked.acknowledged_by) == ("acknowledged", "slack:ana")
        assert acked.next_at is None  # the escalation stopped
        assert transitions(collector, first) == [("acknowledged", "slack:ana")]

        # The very same request again (a replay) changes nothing.
        response = collector.http.post(INTERACTIVITY, content=body, headers=headers)
        assert response.status_code == 409, response.text
        assert alert(collector, first) == acked
        assert transitions(collector, first) == [("acknowledged", "slack:ana")]

        # The message loses its buttons and says who acknowledged; the thread says so too.
        wait(lambda: world.slack.message(ack_ref).updates, "the Slack message's update")
        shown = world.slack.message(ack_ref)
        assert not any(b["type"] == "actions" for b in shown.blocks or [])
        assert "Acknowledged by slack:ana" in context_texts(shown.blocks)
        wait(lambda: shown.replies, "a reply in the thread")
        update = world.slack.calls("chat.update")[0]
        assert (update.body["channel"], update.body["ts"]) == tuple(ack_ref.split(":"))

        # Bo clicks Resolve on the other message.
        body = click(resolve_value, "runwatch_resolve", "bo", resolve_ref)
        response = collector.http.post(INTERACTIVITY, content=body, headers=slack_headers(body))
        assert response.status_code == 200, response.text
        resolved = alert(collector, second)
        assert (resolved.state, resolved.resolved_by, resolved.next_at) == (
            "resolved",
            "slack:bo",
            None,
        )
        wait(lambda: world.slack.message(resolve_ref).updates, "the second message's update")
        assert "Resolved by slack:bo" in context_texts(world.slack.message(resolve_ref).blocks)

        # The webhook was paged and then told, each call signed.
        expected = [("firing", [first]), ("firing", [second])]
        told = [("acknowledged", [first]), ("resolved", [second])]
        wait(lambda: len(world.hook.calls) >= 4, "four webhook calls")
        assert sorted(world.hook.events()) == sorted(expected + told)
        for call in world.hook.calls:
            verify_webhook_signature(
                WEBHOOK_SECRET.encode(),
                call.headers.get("X-Runwatch-Timestamp"),
                call.body,
                call.headers.get("X-Runwatch-Signature"),
                now=time.time(),
            )
            assert call.headers["X-Runwatch-Event"] == call.json["event"]
        acknowledged = next(c.json for c in world.hook.calls if c.json["event"] == "acknowledged")
        assert acknowledged["alerts"][0]["acknowledged_by"] == "slack:ana"
        with pytest.raises(ForgedRequest):  # the check is not vacuous
            call = world.hook.calls[0]
            verify_webhook_signature(
                WEBHOOK_SECRET.encode(),
                call.headers["X-Runwatch-Timestamp"],
                call.body.replace(b"firing", b"resolved"),
                call.headers["X-Runwatch-Signature"],
                now=time.time(),
            )

        # Neither the text (3 s) nor the call (4 s) ever goes out.
        sleep_until(raised_at + 4.6)
        assert world.twilio.requests == []
        assert {n.channel for a in (first, second) for n in notifications(collector, a)} == {
            "slack",
            "hook",
            "log",
        }


# ---- a phone call -----------------------------------------------------------------------------


def gather_action(twiml: str) -> str:
    gather = ET.fromstring(twiml).find("Gather")
    assert gather is not None, twiml
    assert (gather.get("numDigits"), gather.get("method")) == ("1", "POST")
    assert "Press 1 to acknowledge" in "".join(gather.itertext())
    action = gather.get("action")
    assert action is not None
    return action


def keypress(digits: str, call_sid: str) -> dict[str, str]:
    """The form Twilio posts to a ``<Gather>`` action of an outbound call."""
    return {
        "AccountSid": ACCOUNT_SID,
        "ApiVersion": "2010-04-01",
        "CallSid": call_sid,
        "CallStatus": "in-progress",
        "Called": PHONE,
        "Caller": FROM_NUMBER,
        "Digits": digits,
        "Direction": "outbound-api",
        "FinishedOnKey": "",
        "From": FROM_NUMBER,
        "To": PHONE,
    }


def tampered(token: str, alert_ids: list[int]) -> str:
    """``token`` with its payload rewritten to name other alerts, its signature kept."""
    payload, _, rest = token.partition(".")
    assert payload, "a compressed token (leading '.') is not expected for so few alerts"
    data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    data["a"] = alert_ids
    text = json.dumps(data, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(text).decode().rstrip("=") + "." + rest


def test_phone_keypress_acknowledges_and_refuses_forgeries(world: World) -> None:
    steps = [{"notify": ["call"]}, {"after": "3s", "notify": ["sms"]}]
    with world.collector(steps) as collector:
        raised_at = time.time()
        alert_id = raise_alert(collector, "nightly", "loss_spike", "train/loss")
        other = raise_alert(collector, "other-run", "hang")
        calls = wait(lambda: len(world.twilio.calls) >= 2 and world.twilio.calls, "two calls")
        assert all(c.form["To"] == PHONE and c.form["From"] == FROM_NUMBER for c in calls)

        def sid() -> str | None:
            sent = [n for n in notifications(collector, alert_id) if n.state == "sent"]
            return sent[0].provider_ref if sent else None

        call_sid = wait(sid, "the call's SID")  # Twilio posts the keypress with it
        assert call_sid.startswith("CA")
        # Each run got its own call; this is the one about our alert.
        actions = [gather_action(c.form["Twiml"]) for c in calls]
        url = next(a for a in actions if json.loads(_token_payload(a))["a"] == [alert_id])
        assert url.startswith(f"{collector.url}/api/v1/hooks/twilio/voice?token=")
        path = url.removeprefix(collector.url)

        def press(
            params: dict[str, str],
            *,
            to: str = url,
            signature: str | None = None,
            signed: dict[str, str] | None = None,
        ) -> httpx.Response:
            if signature is None:
                signature = sign(to, signed or params, AUTH_TOKEN)
            headers = {"X-Twilio-Signature": signature} if signature else {}
            return collector.http.post(to.removeprefix(collector.url), data=params, headers=headers)

        # Pressing 2 acknowledges nothing.
        response = press(keypress("2", call_sid))
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/xml")
        assert "Not acknowledged" in response.text
        assert_firing(collector, alert_id)

        params = keypress("1", call_sid)
        token = parse_qs(urlsplit(url).query)["token"][0]
        forged_url = f"{collector.url}{path.split('?')[0]}?token={tampered(token, [other])}"
        refused = {
            "signed with another token": press(params, signature=sign(url, params, "not-it")),
            "no signature": press(params, signature=""),
            "digit changed after signing": press(params, signed=keypress("2", call_sid)),
            "signed for another URL": press(
                params, signature=sign(collector.url, params, AUTH_TOKEN)
            ),
            "token tampered, signed again": press(params, to=forged_url),
        }
        for case, response in refused.items():
            assert response.status_code == 403, (case, response.text)
            assert_firing(collector, alert_id)
            assert_firing(collector, other)
        # Twilio's own request with a link that cannot be used: the caller hears why.
        tampered_reply = refused["token tampered, signed again"]
        assert tampered_reply.headers["content-type"].startswith("text/xml")
        assert "cannot be acknowledged by phone: bad signature" in tampered_reply.text

        # Pressing 1.
        response = press(params)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/xml")
        say = ET.fromstring(response.text).findtext("Say")
        assert say is not None and say.startswith("Acknowledged.") and "Not" not in say
        acked = alert(collector, alert_id)
        assert (acked.state, acked.acknowledged_by, acked.next_at) == (
            "acknowledged",
            f"phone:{PHONE}",
            None,
        )
        assert_firing(collector, other)

        # Twilio delivering the same keypress again is a replay.
        response = press(params)
        assert response.status_code == 409, response.text
        assert alert(collector, alert_id) == acked
        assert transitions(collector, alert_id) == [("acknowledged", f"phone:{PHONE}")]

        # The text due at 3 s goes out for the other alert only.
        sleep_until(raised_at + 3.6)
        (text,) = wait(lambda: world.twilio.messages, "the other alert's text")
        assert text.form["Body"].startswith("[CRITICAL] llm/other-run: hang")
        assert [n.channel for n in notifications(collector, alert_id)] == ["call"]
        assert sorted(n.channel for n in notifications(collector, other)) == ["call", "sms"]


def _token_payload(url: str) -> str:
    token = parse_qs(urlsplit(url).query)["token"][0]
    payload = token.split(".")[0]
    return base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)).decode()


# ---- links: e-mail and SMS ----------------------------------------------------------------


def link_in(text: str, label: str) -> str:
    found = re.search(rf"^{label}: (\S+)", text, re.MULTILINE)
    assert found is not None, text
    return found.group(1)


def mail_link(world: World, i: int) -> str:
    mail = world.mail.parsed(i)
    assert mail["To"] == EMAIL
    body = mail.get_body(("plain",))
    assert body is not None
    return link_in(body.get_content(), "acknowledge")


def form_token(page: str) -> str:
    assert "<form method='post'>" in page, page
    found = re.search(r"name='token' value='([^']*)'", page)
    assert found is not None, page
    return html.unescape(found.group(1))


def open_link(collector: Collector, link: str) -> str:
    """GET the link as a browser (or a mail scanner) does; the page's form token."""
    assert link.startswith(f"{collector.url}/api/v1/hooks/ack?token=")
    response = collector.http.get(link.removeprefix(collector.url))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/html")
    return form_token(response.text)


def post_token(collector: Collector, token: str) -> httpx.Response:
    return collector.http.post("/api/v1/hooks/ack", data={"token": token})


def test_email_link_acknowledges_on_post_only(world: World) -> None:
    """Two e-mails 4 s apart; links live 3 s: the first link has expired once 3 s (and the
    signature's one-second resolution) have passed since its e-mail came, the second
    acknowledges."""
    steps = [{"notify": ["email"]}, {"after": "4s", "notify": ["email"]}]
    with world.collector(steps, link_ttl="3s") as collector:
        alert_id = raise_alert(collector, "nightly", "divergence", "train/loss")
        wait(lambda: world.mail.received, "the first e-mail")
        first_came = time.monotonic()
        first_link = mail_link(world, 0)
        html_body = world.mail.parsed(0).get_body(("html",))
        assert html_body is not None and html.escape(first_link) in html_body.get_content()

        # Opening the link shows a button and changes nothing (mail scanners open links).
        token = open_link(collector, first_link)
        page = collector.http.get(first_link.removeprefix(collector.url)).text
        assert f"#{alert_id}" in page and "(firing)" in page
        assert_firing(collector, alert_id)

        for bad in (tampered(token, [alert_id, alert_id + 1]), token[:-3] + "xyz", ""):
            response = collector.http.get("/api/v1/hooks/ack", params={"token": bad})
            assert response.status_code == 403, response.text
            assert "cannot be used" in response.text
            response = post_token(collector, bad)
            assert response.status_code == 403, response.text
            assert_firing(collector, alert_id)

        # The escalation's second e-mail comes 4 s in; the first link expires after 3 s.
        wait(lambda: len(world.mail.received) >= 2, "the second e-mail")
        time.sleep(max(0.0, first_came + 4.2 - time.monotonic()))  # however late it came
        response = post_token(collector, token)
        assert response.status_code == 403, response.text
        assert "link expired" in response.text
        assert collector.http.get(first_link.removeprefix(collector.url)).status_code == 403
        assert_firing(collector, alert_id)

        second = open_link(collector, mail_link(world, 1))
        assert second != token
        response = post_token(collector, second)
        assert response.status_code == 200, response.text
        assert f"by email:{EMAIL}" in response.text
        acked = alert(collector, alert_id)
        assert (acked.state, acked.acknowledged_by, acked.next_at) == (
            "acknowledged",
            f"email:{EMAIL}",
            None,
        )
        # A second POST of the link is harmless: still acknowledged, by the same person.
        assert post_token(collector, second).status_code == 200
        assert transitions(collector, alert_id) == [("acknowledged", f"email:{EMAIL}")]


def test_sms_link_acknowledges(world: World) -> None:
    steps = [{"notify": ["sms"]}, {"after": "2.5s", "notify": ["call"]}]
    with world.collector(steps) as collector:
        raised_at = time.time()
        alert_id = raise_alert(collector, "nightly", "nonfinite_loss", "train/loss")
        (text,) = wait(lambda: world.twilio.messages, "the text message")
        assert text.form["To"] == PHONE
        link = link_in(text.form["Body"], "ack")

        token = open_link(collector, link)
        assert_firing(collector, alert_id)
        response = post_token(collector, token)
        assert response.status_code == 200, response.text
        acked = alert(collector, alert_id)
        assert (acked.state, acked.acknowledged_by, acked.next_at) == (
            "acknowledged",
            f"sms:{PHONE}",
            None,
        )

        # The call due at 2.5 s never happens.
        sleep_until(raised_at + 3.1)
        assert world.twilio.calls == []
        assert [n.channel for n in notifications(collector, alert_id)] == ["sms"]


# ---- what a link's page and an acknowledgement show -------------------------------------------


def test_link_page_names_who_resolved(world: World) -> None:
    """A link used after its alert was resolved says so, and by whom it was resolved."""
    with world.collector([{"notify": ["email"]}]) as collector:
        alert_id = raise_alert(collector, "nightly", "divergence", "train/loss")
        wait(lambda: world.mail.received, "the e-mail")
        token = open_link(collector, mail_link(world, 0))
        alerter = collector.thread.app.state.alerter
        alerter.acknowledge([alert_id], by="slack:ana", project_id=None)
        alerter.resolve([alert_id], by="api:open", project_id=None)

        response = post_token(collector, token)
        assert response.status_code == 200, response.text
        assert alert(collector, alert_id).resolved_by == "api:open"
        assert "resolved by slack:ana" not in response.text  # ana acknowledged, not resolved
        assert f"#{alert_id}: resolved by api:open" in response.text


def test_webhook_ack_link_does_not_spread_the_webhook_url(world: World) -> None:
    """The webhook's own ack_url acknowledges, without writing the webhook's URL (a secret,
    see :mod:`runwatch.alerting.notifiers.webhook`) where others read it: the alert's
    ``acknowledged_by``, the Slack thread, the deliveries' ``target``."""
    with world.collector([{"notify": ["hook", "slack"]}]) as collector:
        alert_id = raise_alert(collector, "nightly", "divergence", "train/loss")
        (call,) = wait(lambda: world.hook.calls, "the webhook call")
        assert call.json["event"] == "firing"
        token = open_link(collector, call.json["ack_url"])
        response = post_token(collector, token)
        assert response.status_code == 200, response.text
        acked = alert(collector, alert_id)
        assert acked.state == "acknowledged"
        assert acked.acknowledged_by is not None
        assert acked.acknowledged_by.startswith("webhook:")
        (update,) = wait(lambda: world.slack.calls("chat.update"), "the Slack update")

        secret = WEBHOOK_PATH.rsplit("/", 1)[-1]
        assert secret not in acked.acknowledged_by
        assert secret not in response.text
        assert secret not in json.dumps(update.body)
        assert all(secret not in n.target for n in notifications(collector, alert_id))
