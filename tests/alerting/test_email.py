"""The e-mail notifier against a real SMTP server (aiosmtpd) on 127.0.0.1: plain, STARTTLS
with a login, TLS from the first byte, and the ways a server says no."""

from __future__ import annotations

import socket
import ssl
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import AuthResult, LoginPassword

from runwatch.alerting.message import AlertView, Message
from runwatch.alerting.notifiers.base import DeliveryError
from runwatch.alerting.notifiers.email import EmailNotifier, SmtpConfig
from tests.alerting import builders
from tests.alerting.fake_smtp import Recorder, smtp_server

USER, PASSWORD = "runwatch", "hunter2-very-secret"


def alert(id: int, **kw: Any) -> AlertView:
    return builders.alert(id, **({"count": 3, "summary": "loss <diverged> & climbing"} | kw))


def message(**kw: Any) -> Message:
    fields: dict[str, Any] = {
        "alerts": (alert(1), alert(2, kind="hang", key="", severity="warning")),
        "run_url": "https://runwatch.example/runs/7",
        "ack_url": "https://runwatch.example/ack/TOKEN?x=1&y=2",
    }
    return builders.message(**(fields | kw))


@dataclass(frozen=True)
class Cert:
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert, self.key)
        return ctx


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Cert:
    """A self-signed certificate for 127.0.0.1, made with the openssl CLI."""
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
        ],
        check=True,
        capture_output=True,
    )
    return Cert(cert, key)


def authenticator(
    server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and auth_data == (USER.encode(), PASSWORD.encode())
    return AuthResult(success=ok, handled=False)


def plain(port: int, **kw: Any) -> SmtpConfig:
    return SmtpConfig(host="127.0.0.1", port=port, starttls=False, timeout=5, **kw)


def test_plain_delivery() -> None:
    handler = Recorder()
    msg = message()
    with smtp_server(handler) as server:
        ref = EmailNotifier(plain(server.port)).send(msg, "oncall@example.com")
    assert len(handler.received) == 1
    envelope = handler.received[0]
    assert envelope.mail_from == "runwatch@localhost"
    assert envelope.rcpt_tos == ["oncall@example.com"]
    mail = handler.parsed()
    assert ref is not None and ref == mail["Message-ID"]
    assert ref.startswith("<") and ref.endswith("@runwatch>")
    assert mail["Subject"] == msg.title
    assert mail["To"] == "oncall@example.com"
    assert mail["X-Runwatch-Alerts"] == "1,2"
    assert mail["X-Runwatch-Event"] == "firing"
    assert mail["In-Reply-To"] is None
    text = mail.get_body(("plain",))
    html = mail.get_body(("html",))
    assert text is not None and html is not None
    assert text.get_content().replace("\r\n", "\n").rstrip("\n") == msg.text
    html_text = html.get_content()
    assert 'href="https://runwatch.example/ack/TOKEN?x=1&amp;y=2"' in html_text
    assert ">Acknowledge</a>" in html_text
    assert 'href="https://runwatch.example/runs/7"' in html_text
    # Escaped, not injected.
    assert "loss &lt;diverged&gt; &amp; climbing" in html_text
    assert "<diverged>" not in html_text


def test_state_event_replies_in_the_thread() -> None:
    handler = Recorder()
    acked = (alert(1, state="acknowledged", acknowledged_by="slack:ana"),)
    with smtp_server(handler) as server:
        notifier = EmailNotifier(plain(server.port, from_addr="alerts@runwatch.example"))
        first = notifier.send(message(), "oncall@example.com")
        second = notifier.send(
            message(event="acknowledged", step=None, alerts=acked, ack_url=None, thread_ref=first),
            "oncall@example.com",
        )
    assert first != second
    mail = handler.parsed(1)
    assert mail["Message-ID"] == second
    assert mail["In-Reply-To"] == first
    assert mail["References"] == first
    assert mail["Subject"].startswith("[ACKNOWLEDGED] llm/run-12")
    assert handler.received[1].mail_from == "alerts@runwatch.example"
    html = mail.get_body(("html",))
    assert html is not None
    assert "acknowledged by slack:ana" in html.get_content()
    assert "Acknowledge</a>" not in html.get_content()


def test_thread_ref_that_is_not_a_message_id_is_ignored() -> None:
    handler = Recorder()
    with smtp_server(handler) as server:
        EmailNotifier(plain(server.port)).send(
            message(thread_ref="C0001:1234.5"), "oncall@example.com"
        )
    assert handler.parsed()["In-Reply-To"] is None


def test_several_recipients_and_a_partial_refusal() -> None:
    handler = Recorder(refuse_rcpt={"nobody": "550 5.1.1 no such user"})
    with smtp_server(handler) as server:
        ref = EmailNotifier(plain(server.port)).send(
            message(), "Ana <ana@example.com>, nobody@example.com"
        )
    assert ref is not None
    assert handler.received[0].rcpt_tos == ["ana@example.com"]


def test_target_without_an_address_is_not_retryable() -> None:
    with pytest.raises(DeliveryError) as err:
        EmailNotifier(plain(1)).send(message(), "oncall")
    assert not err.value.retryable


@pytest.mark.parametrize(
    ("reply", "retryable"), [("550 5.1.1 no such user", False), ("450 4.2.1 busy", True)]
)
def test_every_recipient_refused(reply: str, retryable: bool) -> None:
    handler = Recorder(refuse_rcpt={"": reply})
    with smtp_server(handler) as server, pytest.raises(DeliveryError) as err:
        EmailNotifier(plain(server.port)).send(message(), "a@example.com, b@example.com")
    assert err.value.retryable is retryable
    assert "every recipient refused" in err.value.detail
    assert handler.received == []


@pytest.mark.parametrize(
    ("reply", "retryable"), [("554 5.7.1 rejected as spam", False), ("451 4.3.0 try later", True)]
)
def test_data_refused(reply: str, retryable: bool) -> None:
    handler = Recorder(data_reply=reply)
    with smtp_server(handler) as server, pytest.raises(DeliveryError) as err:
        EmailNotifier(plain(server.port)).send(message(), "oncall@example.com")
    assert err.value.retryable is retryable
    assert reply.split()[0] in err.value.detail


def test_starttls_and_login(cert: Cert) -> None:
    handler = Recorder()
    config = SmtpConfig(
        host="127.0.0.1",
        username=USER,
        password=PASSWORD,
        cafile=str(cert.cert),
        timeout=5,
        port=0,
    )
    with smtp_server(
        handler,
        tls_context=cert.server_context(),
        require_starttls=True,
        authenticator=authenticator,
        auth_required=True,
    ) as server:
        ref = EmailNotifier(replace(config, port=server.port)).send(message(), "oncall@example.com")
    assert handler.parsed()["Message-ID"] == ref
    assert PASSWORD not in repr(config)


def test_login_refused_is_not_retryable(cert: Cert) -> None:
    handler = Recorder()
    with smtp_server(
        handler,
        tls_context=cert.server_context(),
        require_starttls=True,
        authenticator=authenticator,
        auth_required=True,
    ) as server:
        config = SmtpConfig(
            host="127.0.0.1",
            port=server.port,
            username=USER,
            password="wrong-" + PASSWORD,
            cafile=str(cert.cert),
            timeout=5,
        )
        with pytest.raises(DeliveryError) as err:
            EmailNotifier(config).send(message(), "oncall@example.com")
    assert not err.value.retryable
    assert "login refused" in err.value.detail
    assert PASSWORD not in err.value.detail and PASSWORD not in str(err.value)
    assert handler.received == []


def test_untrusted_certificate_is_not_retryable(cert: Cert) -> None:
    handler = Recorder()
    with smtp_server(handler, tls_context=cert.server_context()) as server:
        config = SmtpConfig(host="127.0.0.1", port=server.port, timeout=5)  # no cafile
        with pytest.raises(DeliveryError) as err:
            EmailNotifier(config).send(message(), "oncall@example.com")
    assert not err.value.retryable
    assert "certificate" in err.value.detail


def test_server_without_starttls_is_refused() -> None:
    """Told to insist on STARTTLS, the notifier does not fall back to clear text."""
    handler = Recorder()
    with smtp_server(handler) as server:
        config = SmtpConfig(host="127.0.0.1", port=server.port, username=USER, password=PASSWORD)
        with pytest.raises(DeliveryError) as err:
            EmailNotifier(config).send(message(), "oncall@example.com")
    assert not err.value.retryable
    assert "STARTTLS" in err.value.detail
    assert handler.received == []


def test_server_without_auth_is_not_retryable() -> None:
    handler = Recorder()
    with smtp_server(handler) as server:
        config = plain(server.port, username=USER, password=PASSWORD)
        with pytest.raises(DeliveryError) as err:
            EmailNotifier(config).send(message(), "oncall@example.com")
    assert not err.value.retryable
    assert PASSWORD not in err.value.detail


def test_implicit_tls(cert: Cert) -> None:
    handler = Recorder()
    with smtp_server(handler, ssl_context=cert.server_context()) as server:
        config = SmtpConfig(
            host="127.0.0.1", port=server.port, ssl=True, cafile=str(cert.cert), timeout=5
        )
        ref = EmailNotifier(config).send(message(), "oncall@example.com")
    assert handler.parsed()["Message-ID"] == ref


def test_missing_cafile_is_not_retryable(tmp_path: Path) -> None:
    config = SmtpConfig(host="127.0.0.1", port=1, cafile=str(tmp_path / "missing.pem"))
    with pytest.raises(DeliveryError) as err:
        EmailNotifier(config).send(message(), "oncall@example.com")
    assert not err.value.retryable
    assert "cafile" in err.value.detail


def test_server_down_is_retryable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DeliveryError) as err:
        EmailNotifier(plain(port)).send(message(), "oncall@example.com")
    assert err.value.retryable
    assert f"127.0.0.1:{port}" in err.value.detail


def test_silent_server_times_out_retryably() -> None:
    """A server that accepts the connection and never greets: the timeout bounds the send."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        config = SmtpConfig(
            host="127.0.0.1", port=listener.getsockname()[1], starttls=False, timeout=0.3
        )
        with pytest.raises(DeliveryError) as err:
            EmailNotifier(config).send(message(), "oncall@example.com")
    assert err.value.retryable
    assert "timed out" in err.value.detail
