"""A real SMTP server (aiosmtpd) on 127.0.0.1 that keeps what it receives.

The e-mail notifier's tests and the end-to-end hook tests point ``smtplib`` at it, so a
test reads the message exactly as a mail server got it (headers, both bodies, the
envelope). :class:`Recorder` can refuse recipients or the data, as a server does.

>>> handler = Recorder()
>>> with smtp_server(handler) as server:  # doctest: +SKIP
...     EmailNotifier(SmtpConfig("127.0.0.1", server.port, starttls=False)).send(msg, "a@b.c")
...     handler.parsed()["Subject"]
"""

from __future__ import annotations

import email
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.policy import default as default_policy
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import Envelope


@dataclass
class Recorder:
    """An aiosmtpd handler that keeps what it receives and refuses what it is told to."""

    received: list[Envelope] = field(default_factory=list)
    refuse_rcpt: dict[str, str] = field(default_factory=dict)
    """Address prefix -> the SMTP reply refusing it (``"550 5.1.1 no such user"``)."""
    data_reply: str = "250 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Envelope, address: str, options: Any
    ) -> str:
        for prefix, reply in self.refuse_rcpt.items():
            if address.startswith(prefix):
                return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Envelope) -> str:
        if self.data_reply.startswith("250"):
            self.received.append(envelope)
        return self.data_reply

    def parsed(self, i: int = -1) -> EmailMessage:
        """Received message ``i`` (default: the last), parsed."""
        content = self.received[i].original_content
        assert content is not None
        msg = email.message_from_bytes(content, policy=default_policy)
        assert isinstance(msg, EmailMessage)
        return msg

    @property
    def messages(self) -> list[EmailMessage]:
        """Every message received so far, parsed, oldest first."""
        return [self.parsed(i) for i in range(len(self.received))]


class LoopbackController(Controller):
    """Binds port 0 and learns the port the system gave it before checking the server."""

    def _trigger_server(self) -> None:
        assert self.server is not None
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


@contextmanager
def smtp_server(handler: Recorder, **kwargs: Any) -> Iterator[LoopbackController]:
    """Serve ``handler`` on 127.0.0.1 (``.port``) while the block runs; ``kwargs`` go to the
    aiosmtpd controller (``tls_context``, ``require_starttls``, ``authenticator`` ...)."""
    controller = LoopbackController(
        handler, hostname="127.0.0.1", port=0, server_hostname="smtp.test", **kwargs
    )
    controller.start()
    try:
        yield controller
    finally:
        controller.stop()
