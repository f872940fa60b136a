"""A fake Twilio REST API on 127.0.0.1, for the real ``twilio`` client to talk to.

It plays ``POST /2010-04-01/Accounts/{sid}/Messages.json`` and ``.../Calls.json`` the way
Twilio does for what runwatch sends: form bodies in, ``201`` JSON out with an ``SM...`` or
``CA...`` SID, and Twilio's error bodies (``{"code", "message", "more_info", "status"}``) for
a missing or malformed number, an over-long SMS and bad credentials. Every request is
recorded. ``fail_next`` and ``delay_next`` inject failures and slowness.

>>> with FakeTwilio() as fake:  # doctest: +SKIP
...     SmsNotifier(fake.config()).send(message, "+15551234567")
...     fake.messages[0].form["Body"]
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import re
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl

from twilio.request_validator import RequestValidator

from runwatch.alerting.notifiers.twilio import TwilioConfig

ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
AUTH_TOKEN = "fake-twilio-auth-token-7f3a"
FROM_NUMBER = "+15005550006"

_PATH = re.compile(r"^/2010-04-01/Accounts/(?P<sid>[^/]+)/(?P<resource>Messages|Calls)\.json$")
_E164 = re.compile(r"^\+[1-9]\d{6,14}$")


def sign(url: str, params: Mapping[str, str], auth_token: str) -> str:
    """The ``X-Twilio-Signature`` Twilio would send with a webhook to ``url``."""
    return RequestValidator(auth_token).compute_signature(url, params)


@dataclass(frozen=True, slots=True)
class TwilioRequest:
    """One request the fake received, and what it answered."""

    method: str
    path: str
    resource: str | None
    """``Messages`` or ``Calls``; None for a path the fake does not play."""
    form: dict[str, str]
    auth_user: str | None
    status: int
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Failure:
    status: int
    code: int | None
    message: str
    retry_after: str | None
    body: dict[str, Any] | None


class FakeTwilio:
    """Twilio's Messages and Calls resources on a loopback port; a context manager.

    ``auth_token``: when set, requests whose basic-auth password differs get Twilio's 401
    (code 20003); by default any credentials pass (and the user is recorded).
    """

    def __init__(self, *, auth_token: str | None = AUTH_TOKEN) -> None:
        self.auth_token = auth_token
        self.requests: list[TwilioRequest] = []
        self._failures: deque[_Failure] = deque()
        self._delays: deque[float] = deque()
        self._sids = itertools.count(1)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="fake-twilio", daemon=True
        )
        self._started = False

    @property
    def api_url(self) -> str:
        """``http://127.0.0.1:PORT``, for ``TwilioConfig.api_url``."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def config(self, *, from_number: str = FROM_NUMBER, timeout: float = 5.0) -> TwilioConfig:
        """A config that sends to this fake with its credentials."""
        return TwilioConfig(
            account_sid=ACCOUNT_SID,
            auth_token=self.auth_token or AUTH_TOKEN,
            from_number=from_number,
            api_url=self.api_url,
            timeout=timeout,
        )

    @property
    def messages(self) -> list[TwilioRequest]:
        """The SMS requests that were answered 201."""
        return [r for r in self.requests if r.resource == "Messages" and r.status == 201]

    @property
    def calls(self) -> list[TwilioRequest]:
        """The call requests that were answered 201."""
        return [r for r in self.requests if r.resource == "Calls" and r.status == 201]

    def fail_next(
        self,
        n: int = 1,
        *,
        status: int = 500,
        code: int | None = None,
        message: str = "Internal Server Error",
        retry_after: float | str | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        """Answer the next ``n`` requests with ``status`` and Twilio's error body (``code``
        defaults to the status), a ``Retry-After`` header when given; ``body`` replaces the
        JSON body entirely (e.g. an RFC 9457 problem)."""
        failure = _Failure(
            status, code, message, None if retry_after is None else str(retry_after), body
        )
        with self._lock:
            self._failures.extend([failure] * n)

    def delay_next(self, n: int = 1, *, seconds: float) -> None:
        """Sleep ``seconds`` before answering each of the next ``n`` requests."""
        with self._lock:
            self._delays.extend([seconds] * n)

    def start(self) -> FakeTwilio:
        if not self._started:
            self._thread.start()
            self._started = True
        return self

    def stop(self) -> None:
        """Stop serving and free the port (a later request fails to connect)."""
        if self._started:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._started = False
        self._server.server_close()

    def __enter__(self) -> FakeTwilio:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what the handler calls -----------------------------------------------------------

    def _answer(
        self, path: str, form: dict[str, str], user: str | None, password: str | None
    ) -> tuple[int, dict[str, Any], dict[str, str], str | None]:
        """(status, JSON body, extra headers, resource) for one POST."""
        with self._lock:
            delay = self._delays.popleft() if self._delays else 0.0
            failure = self._failures.popleft() if self._failures else None
        if delay:
            time.sleep(delay)
        match = _PATH.match(path)
        resource = match["resource"] if match else None
        if failure is not None:
            headers = {"Retry-After": failure.retry_after} if failure.retry_after else {}
            body = failure.body or _error(failure.status, failure.code, failure.message)
            return failure.status, body, headers, resource
        if match is None:
            return 404, _error(404, 20404, f"The requested resource {path} was not found"), {}, None
        if self.auth_token is not None and (user != match["sid"] or password != self.auth_token):
            return 401, _error(401, 20003, "Authenticate"), {}, resource
        invalid = _validate(resource, form)
        if invalid is not None:
            return 400, _error(400, *invalid), {}, resource
        return 201, self._created(match["sid"], resource, form), {}, resource

    def _created(self, account_sid: str, resource: str, form: dict[str, str]) -> dict[str, Any]:
        prefix = "SM" if resource == "Messages" else "CA"
        sid = f"{prefix}{next(self._sids):032x}"
        now = formatdate(usegmt=True)
        common = {
            "sid": sid,
            "account_sid": account_sid,
            "to": form["To"],
            "from": form["From"],
            "status": "queued",
            "date_created": now,
            "date_updated": now,
            "api_version": "2010-04-01",
            "uri": f"/2010-04-01/Accounts/{account_sid}/{resource}/{sid}.json",
        }
        if resource == "Messages":
            segments = max(1, -(-len(form["Body"]) // 153))
            return common | {
                "body": form["Body"],
                "num_segments": str(segments),
                "num_media": "0",
                "direction": "outbound-api",
                "price": None,
                "error_code": None,
                "error_message": None,
            }
        return common | {"direction": "outbound-api", "duration": None, "price": None}

    def _record(self, request: TwilioRequest) -> None:
        with self._lock:
            self.requests.append(request)


def _validate(resource: str, form: dict[str, str]) -> tuple[int, str] | None:
    """Twilio's (code, message) for a request it would refuse, or None."""
    to, from_ = form.get("To"), form.get("From")
    if not to:
        return 21604, "A 'To' phone number is required."
    if not from_:
        return 21603, "A 'From' phone number is required."
    if not _E164.match(to):
        return 21211, f"Invalid 'To' Phone Number: {to}"
    if resource == "Messages":
        body = form.get("Body")
        if not body:
            return 21602, "Message body is required."
        if len(body) > 1600:
            return 21617, "The concatenated message body exceeds the 1600 character limit."
    elif not (form.get("Twiml") or form.get("Url") or form.get("ApplicationSid")):
        return 21205, "Url, ApplicationSid or Twiml is required."
    return None


def _error(status: int, code: int | None, message: str) -> dict[str, Any]:
    code = status if code is None else code
    return {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }


def _handler(fake: FakeTwilio) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length).decode("utf-8") if length else ""
            form = dict(parse_qsl(raw, keep_blank_values=True))
            user, password = _basic_auth(self.headers.get("Authorization"))
            path = self.path.split("?", 1)[0]
            status, body, headers, resource = fake._answer(path, form, user, password)
            fake._record(
                TwilioRequest(
                    method="POST",
                    path=path,
                    resource=resource,
                    form=form,
                    auth_user=user,
                    status=status,
                    headers={k: v for k, v in self.headers.items() if k != "Authorization"},
                )
            )
            self._send(status, body, headers)

        def do_GET(self) -> None:
            fake._record(TwilioRequest("GET", self.path, None, {}, None, 405))
            self._send(405, _error(405, 20004, "Method not allowed"), {})

        def _send(self, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
            payload = json.dumps(body).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(payload)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (a timeout test); nothing to answer

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


def _basic_auth(header: str | None) -> tuple[str | None, str | None]:
    if not header or not header.startswith("Basic "):
        return None, None
    try:
        user, _, password = base64.b64decode(header[6:]).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None, None
    return user, password
