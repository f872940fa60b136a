"""E-mail over SMTP: the slow channel that everyone has, and the one that keeps a record.

One message per notification, plain text with an HTML alternative whose first thing is an
"Acknowledge" link. Updates (acknowledged, resolved) and re-notifications reply to the first
message (``In-Reply-To``/``References``), so a mail client shows one thread per incident.
The ``Message-ID`` is the provider reference the service keeps for that.

Errors follow SMTP's own classes: a 4xx reply is "try again later", a 5xx reply is
permanent, and so are a refused login or a server that does not offer the STARTTLS we were
told to insist on (sending a password in clear instead would be worse than not sending).
"""

from __future__ import annotations

import html
import logging
import smtplib
import socket
import ssl
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate, getaddresses, make_msgid

from runwatch.alerting.message import STATE_EVENTS, Message
from runwatch.alerting.notifiers.base import DeliveryError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    """Where and how to send. ``ssl`` is TLS from the first byte (port 465) and makes
    ``starttls`` moot; ``starttls`` upgrades a plain connection (port 587) and refuses a
    server that cannot. ``cafile`` trusts a private CA (or a self-signed server) besides the
    system's."""

    host: str
    port: int = 587
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    starttls: bool = True
    ssl: bool = False
    from_addr: str = "runwatch@localhost"
    timeout: float = 10.0
    cafile: str | None = None


class EmailNotifier:
    """Sends each message as one e-mail; the target is an address (or several, comma
    separated)."""

    type = "email"

    def __init__(self, config: SmtpConfig):
        self.config = config

    def send(self, message: Message, target: str) -> str | None:
        recipients = [addr for _, addr in getaddresses([target]) if "@" in addr]
        if not recipients:
            raise DeliveryError(f"no e-mail address in target {target!r}", retryable=False)
        try:
            mail = build_email(message, self.config.from_addr, ", ".join(recipients))
        except (ValueError, TypeError) as exc:
            raise DeliveryError(f"cannot build the e-mail: {exc}", retryable=False) from None
        msgid = str(mail["Message-ID"])
        where = f"SMTP {self.config.host}:{self.config.port}"
        try:
            context = ssl.create_default_context(cafile=self.config.cafile)
        except (OSError, ssl.SSLError) as exc:
            raise DeliveryError(f"cannot read cafile: {exc}", retryable=False) from None
        try:
            refused = self._deliver(mail, recipients, context)
        except DeliveryError:
            raise
        except smtplib.SMTPAuthenticationError as exc:
            raise DeliveryError(
                f"{where}: login refused ({exc.smtp_code})", retryable=False
            ) from None
        except smtplib.SMTPNotSupportedError as exc:
            raise DeliveryError(f"{where}: {exc}", retryable=False) from None
        except smtplib.SMTPRecipientsRefused as exc:
            codes = {code for code, _ in exc.recipients.values()}
            detail = "; ".join(
                f"{rcpt}: {code} {_text(reply)}" for rcpt, (code, reply) in exc.recipients.items()
            )
            raise DeliveryError(
                f"{where}: every recipient refused ({detail})",
                retryable=all(400 <= c < 500 for c in codes),
            ) from None
        except smtplib.SMTPResponseException as exc:
            # Sender refused, data refused, HELO refused, or any other reply code.
            raise DeliveryError(
                f"{where}: {exc.smtp_code} {_text(exc.smtp_error)}",
                retryable=not 500 <= exc.smtp_code < 600,
            ) from None
        except ssl.SSLCertVerificationError as exc:
            raise DeliveryError(
                f"{where}: certificate not trusted ({exc.verify_message})", retryable=False
            ) from None
        except (smtplib.SMTPException, OSError) as exc:
            # Disconnects, refused connections, timeouts, TLS failures: the server may be back.
            kind = "timed out" if isinstance(exc, socket.timeout) else type(exc).__name__
            raise DeliveryError(f"{where}: {kind}: {exc}") from None
        if refused:
            log.warning("e-mail %s: some recipients refused: %s", msgid, ", ".join(sorted(refused)))
        return msgid

    def _deliver(
        self, mail: EmailMessage, recipients: list[str], context: ssl.SSLContext
    ) -> dict[str, tuple[int, bytes]]:
        cfg = self.config
        smtp: smtplib.SMTP
        if cfg.ssl:
            smtp = smtplib.SMTP_SSL(cfg.host, cfg.port, timeout=cfg.timeout, context=context)
        else:
            smtp = smtplib.SMTP(cfg.host, cfg.port, timeout=cfg.timeout)
        with smtp:
            smtp.ehlo()
            if cfg.starttls and not cfg.ssl:
                if not smtp.has_extn("starttls"):
                    raise DeliveryError(
                        f"SMTP {cfg.host}:{cfg.port} does not offer STARTTLS "
                        "(set starttls: false only for a trusted local relay)",
                        retryable=False,
                    )
                smtp.starttls(context=context)
                smtp.ehlo()
            if cfg.username is not None:
                smtp.login(cfg.username, cfg.password or "")
            return smtp.send_message(mail, cfg.from_addr, recipients)


def build_email(message: Message, from_addr: str, to: str) -> EmailMessage:
    """The e-mail for ``message``: subject the title, the text, an HTML alternative with the
    links, ``X-Runwatch-Alerts`` (the alert ids) and a new ``Message-ID``."""
    mail = EmailMessage()
    mail["From"] = from_addr
    mail["To"] = to
    mail["Subject"] = _one_line(message.title)
    mail["Date"] = formatdate(usegmt=True)
    mail["Message-ID"] = make_msgid(domain="runwatch")
    mail["X-Runwatch-Alerts"] = ",".join(str(a.id) for a in message.alerts)
    mail["X-Runwatch-Event"] = message.event
    ref = message.thread_ref
    if ref and ref.startswith("<") and ref.endswith(">") and _one_line(ref) == ref:
        mail["In-Reply-To"] = ref
        mail["References"] = ref
    mail.set_content(message.text)
    mail.add_alternative(_html(message), subtype="html")
    return mail


def _html(message: Message) -> str:
    e = html.escape
    parts = [f"<h2>{e(message.title)}</h2>"]
    if message.ack_url:
        parts.append(
            f'<p><a href="{e(message.ack_url)}" style="display:inline-block;padding:8px 16px;'
            'background:#1d6f42;color:#fff;text-decoration:none;border-radius:4px">'
            "Acknowledge</a></p>"
        )
    parts.append("<ul>")
    parts += [f"<li>#{a.id} <b>[{e(a.severity)}]</b> {e(a.headline)}</li>" for a in message.alerts]
    parts.append("</ul>")
    if message.event in STATE_EVENTS:
        names = (
            a.acknowledged_by if message.event == "acknowledged" else a.resolved_by
            for a in message.alerts
        )
        by = sorted({name for name in names if name})
        if by:
            parts.append(f"<p>{e(message.event)} by {e(', '.join(by))}</p>")
    if message.run_url:
        parts.append(f'<p>Run: <a href="{e(message.run_url)}">{e(message.run_url)}</a></p>')
    return "<html><body>" + "\n".join(parts) + "</body></html>\n"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _text(reply: bytes | str) -> str:
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply
    return _one_line(text)[:200]
