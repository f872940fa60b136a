"""The webhook notifier against a real HTTP receiver on 127.0.0.1 that checks its signature."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
import pytest

from runwatch import __version__
from runwatch.alerting.message import AlertView, Message
from runwatch.alerting.notifiers.base import DeliveryError
from runwatch.alerting.notifiers.webhook import WebhookNotifier, retry_after
from runwatch.alerting.tokens import ForgedRequest, verify_webhook_signature
from tests.alerting import builders

SECRET = b"shared-webhook-secret"
PATH_SECRET = "T000/B000/XXXXpathsecretXXXX"
T0 = 1_700_000_000.0


def alert(id: int, **kw: Any) -> AlertView:
    return builders.alert(id, **({"count": 3} | kw))


def message(**kw: Any) -> Message:
    fields: dict[str, Any] = {
        "event": "escalated",
        "step": 1,
        "alerts": (alert(1), alert(2, kind="hang", key="", severity="warning", step=None)),
        "run_url": "https://runwatch.example/runs/7",
        "ack_url": "https://runwatch.example/ack/TOKEN",
    }
    return builders.message(**(fields | kw))


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A webhook receiver: records each call and answers what it is told to (200 by default)."""

    calls: list[Received] = field(default_factory=list)
    replies: list[tuple[int, dict[str, str], bytes]] = field(default_factory=list)
    delay: float = 0.0
    url: str = ""


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            state.calls.append(Received(self.path, dict(self.headers.items()), body))
            if state.delay:
                time.sleep(state.delay)
            status, headers, reply = state.replies.pop(0) if state.replies else (200, {}, b"ok")
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/{PATH_SECRET}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_signed_json_post(receiver: Receiver) -> None:
    msg = message()
    ref = WebhookNotifier(receiver.url, SECRET, clock=lambda: T0).send(msg, "ignored")
    assert ref is None
    [call] = receiver.calls
    assert call.path == f"/hooks/{PATH_SECRET}"
    headers = {k.lower(): v for k, v in call.headers.items()}
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"] == f"runwatch/{__version__}"
    assert headers["x-runwatch-event"] == "escalated"
    assert headers["x-runwatch-timestamp"] == str(int(T0))
    verify_webhook_signature(
        SECRET,
        headers["x-runwatch-timestamp"],
        call.body,
        headers["x-runwatch-signature"],
        now=T0 + 1,
    )
    with pytest.raises(ForgedRequest):
        verify_webhook_signature(
            b"other",
            headers["x-runwatch-timestamp"],
            call.body,
            headers["x-runwatch-signature"],
            T0,
        )
    doc = orjson.loads(call.body)
    assert doc == {
        "version": 1,
        "event": "escalated",
        "step": 1,
        "notification_id": 12,
        "severity": "critical",
        "title": msg.title,
        "alerts": [
            {
                "id": 1,
                "project": "llm",
                "run_id": 7,
                "run_name": "run-12",
                "kind": "divergence",
                "key": "train/loss",
                "severity": "critical",
                "state": "firing",
                "summary": "loss diverged",
                "count": 3,
                "first_seen_at": 1.0,
                "last_seen_at": 2.0,
                "step": 1200,
                "acknowledged_by": None,
                "resolved_by": None,
            },
            doc["alerts"][1],
        ],
        "run_url": "https://runwatch.example/runs/7",
        "ack_url": "https://runwatch.example/ack/TOKEN",
    }
    assert doc["alerts"][1]["kind"] == "hang" and doc["alerts"][1]["step"] is None


def test_real_clock_and_str_secret(receiver: Receiver) -> None:
    WebhookNotifier(receiver.url, SECRET.decode()).send(
        message(event="resolved", step=None, ack_url=None), ""
    )
    [call] = receiver.calls
    headers = {k.lower(): v for k, v in call.headers.items()}
    verify_webhook_signature(
        SECRET,
        headers["x-runwatch-timestamp"],
        call.body,
        headers["x-runwatch-signature"],
        now=time.time(),
    )
    assert orjson.loads(call.body)["event"] == "resolved"


def test_any_2xx_is_success(receiver: Receiver) -> None:
    receiver.replies = [(204, {}, b""), (202, {}, b"queued")]
    notifier = WebhookNotifier(receiver.url, SECRET)
    assert notifier.send(message(), "") is None
    assert notifier.send(message(), "") is None


@pytest.mark.parametrize("status", [500, 502, 503])
def test_server_errors_are_retryable(receiver: Receiver, status: int) -> None:
    receiver.replies = [(status, {}, b"upstream\nbroke")]
    with pytest.raises(DeliveryError) as err:
        WebhookNotifier(receiver.url, SECRET).send(message(), "")
    assert err.value.retryable
    assert err.value.retry_after is None
    assert f"HTTP {status}: upstream broke" in err.value.detail
    assert PATH_SECRET not in err.value.detail
    assert "127.0.0.1" in err.value.detail


def test_503_with_retry_after(receiver: Receiver) -> None:
    receiver.replies = [(503, {"Retry-After": "7"}, b"")]
    with pytest.raises(DeliveryError) as err:
        WebhookNotifier(receiver.url, SECRET).send(message(), "")
    assert err.value.retryable and err.value.retry_after == 7


def test_429_honours_retry_after_seconds_and_dates(receiver: Receiver) -> None:
    receiver.replies = [
        (429, {"Retry-After": "30"}, b"slow down"),
        (429, {"Retry-After": formatdate(T0 + 90, usegmt=True)}, b""),
        (429, {}, b""),
    ]
    notifier = WebhookNotifier(receiver.url, SECRET, clock=lambda: T0)
    expected = [30.0, 90.0, None]
    for want in expected:
        with pytest.raises(DeliveryError) as err:
            notifier.send(message(), "")
        assert err.value.retryable
        assert err.value.retry_after == want


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410, 422])
def test_client_errors_are_not_retryable(receiver: Receiver, status: int) -> None:
    receiver.replies = [(status, {}, b"nope")]
    with pytest.raises(DeliveryError) as err:
        WebhookNotifier(receiver.url, SECRET).send(message(), "")
    assert not err.value.retryable
    assert f"HTTP {status}" in err.value.detail
    assert PATH_SECRET not in err.value.detail


def test_redirect_is_not_followed(receiver: Receiver) -> None:
    receiver.replies = [(301, {"Location": "http://127.0.0.1:1/elsewhere"}, b"")]
    with pytest.raises(DeliveryError) as err:
        WebhookNotifier(receiver.url, SECRET).send(message(), "")
    assert not err.value.retryable
    assert "redirect" in err.value.detail
    assert len(receiver.calls) == 1


def test_receiver_down_is_retryable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/hooks/{PATH_SECRET}"
    with pytest.raises(DeliveryError) as err:
        WebhookNotifier(url, SECRET).send(message(), "")
    assert err.value.retryable
    assert PATH_SECRET not in err.value.detail


def test_slow_receiver_times_out_retryably(receiver: Receiver) -> None:
    receiver.delay = 1.0
    started = time.monotonic()
    with pytest.raises(DeliveryError) as err:
        WebhookNotifier(receiver.url, SECRET, timeout=0.2).send(message(), "")
    assert time.monotonic() - started < 0.9
    assert err.value.retryable
    assert "timed out" in err.value.detail
    assert PATH_SECRET not in err.value.detail


def test_repr_hides_the_url_path() -> None:
    notifier = WebhookNotifier(f"https://hooks.example.com/{PATH_SECRET}?token=abc", SECRET)
    assert PATH_SECRET not in repr(notifier) and "abc" not in repr(notifier)
    assert "hooks.example.com" in repr(notifier)


@pytest.mark.parametrize("url", ["hooks.example.com/x", "ftp://example.com/x", "http:///x", ""])
def test_bad_url_is_a_configuration_error(url: str) -> None:
    with pytest.raises(ValueError):
        WebhookNotifier(url, SECRET)


def test_empty_secret_is_a_configuration_error() -> None:
    with pytest.raises(ValueError):
        WebhookNotifier("https://example.com/hook", b"")


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, None),
        ("", None),
        ("12", 12.0),
        (" 1.5 ", 1.5),
        ("-3", 0.0),
        ("inf", None),
        ("nan", None),
        ("soon", None),
        (formatdate(T0 + 60, usegmt=True), 60.0),
        (formatdate(T0 - 60, usegmt=True), 0.0),
    ],
)
def test_retry_after_parsing(value: str | None, seconds: float | None) -> None:
    assert retry_after(value, lambda: T0) == seconds
