"""Twilio: a text message or a phone call that can be acknowledged with one key.

An SMS carries the title, the first alerts' headlines and the acknowledge link; a call reads
a short spoken summary inside a ``<Gather>`` whose action is the message's ``voice_url``, so
pressing 1 comes back to the collector as a signed Twilio webhook (see
:mod:`runwatch.alerting.twilio_hooks`) that acknowledges the alerts.

Both go through the real ``twilio`` client with an HTTP client of our own: it sends every
request to ``TwilioConfig.api_url`` when one is set (a loopback fake in the tests, a proxy in
a locked-down network), makes one attempt per call (retries belong to the service's outbox,
which knows the backoff) and keeps the last response's headers, because a
``TwilioRestException`` drops them and a 429's ``Retry-After`` is wanted.
"""

from __future__ import annotations

import email.utils
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests
from twilio.base.exceptions import TwilioException, TwilioRestException, TwilioServiceException
from twilio.http.http_client import TwilioHttpClient
from twilio.http.response import Response
from twilio.rest import Client
from twilio.twiml.voice_response import VoiceResponse

from runwatch.alerting.message import STATE_EVENTS, AlertView, Message
from runwatch.alerting.notifiers.base import DeliveryError

SMS_MAX_CHARS = 1600
"""Twilio refuses a longer body (error 21617)."""
SMS_MAX_ALERTS = 3
"""Headlines an SMS lists; the title already counts the others."""
VOICE_MAX_KINDS = 3
"""Alert kinds a call reads out before "and N more"."""
_SPOKEN_NAME_MAX = 60
_HEADLINE_MAX = 300

# ClientBase falls back to os.environ for an empty mapping and would then take TWILIO_EDGE and
# TWILIO_REGION from there. This mapping is not empty and names neither, so requests go where
# the config says and nowhere an environment variable says.
_NO_ENVIRONMENT: Mapping[str, str] = {"TWILIO_EDGE": "", "TWILIO_REGION": ""}


@dataclass(frozen=True, slots=True)
class TwilioConfig:
    """An account and the number pages come from.

    >>> TwilioConfig("AC123", "secret", "+15005550006")
    TwilioConfig(account_sid='AC123', from_number='+15005550006', api_url=None, timeout=10.0)
    """

    account_sid: str
    auth_token: str = field(repr=False)
    from_number: str
    api_url: str | None = None
    """Where requests go instead of ``https://api.twilio.com`` (scheme, host, port and an
    optional path prefix), e.g. ``http://127.0.0.1:8025``; None: Twilio itself."""
    timeout: float = 10.0
    """Seconds to connect, and to wait for each read of the answer."""

    def __post_init__(self) -> None:
        for name in ("account_sid", "auth_token", "from_number"):
            if not getattr(self, name):
                raise ValueError(f"TwilioConfig.{name} is empty")
        if self.api_url is not None and urlsplit(self.api_url).scheme not in ("http", "https"):
            raise ValueError(f"TwilioConfig.api_url must be an http(s) URL, got {self.api_url!r}")
        if not self.timeout > 0:
            raise ValueError(f"TwilioConfig.timeout must be positive, got {self.timeout!r}")


class _RoutedHttpClient(TwilioHttpClient):
    """Sends every request to ``api_url`` when given; remembers the last answer's headers."""

    def __init__(self, api_url: str | None, timeout: float) -> None:
        super().__init__(timeout=timeout, max_retries=0)
        self.api_url = api_url
        self._last = threading.local()

    @property
    def last_headers(self) -> Mapping[str, str] | None:
        """Headers of this thread's last answer (None: there was none)."""
        return getattr(self._last, "headers", None)

    def request(
        self,
        method: str,
        url: str,
        params: dict[str, object] | None = None,
        data: dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        timeout: float | None = None,
        allow_redirects: bool = False,
    ) -> Response:
        """One attempt, at ``api_url`` instead of Twilio's host when one is set."""
        if self.api_url is not None:
            url = _rebase(url, self.api_url)
        self._last.headers = None
        response = super().request(
            method,
            url,
            params=params,
            data=data,
            headers=headers,
            auth=auth,
            timeout=timeout,
            allow_redirects=allow_redirects,
        )
        self._last.headers = response.headers
        return response


def _rebase(url: str, base: str) -> str:
    """``url`` with the scheme and host of ``base``, and ``base``'s path in front of its path."""
    target, new = urlsplit(url), urlsplit(base)
    path = new.path.rstrip("/") + target.path
    return urlunsplit((new.scheme, new.netloc, path, target.query, target.fragment))


class _TwilioNotifier:
    """What SMS and calls share: the client and the mapping of its errors."""

    type: str
    _what: str

    def __init__(self, config: TwilioConfig) -> None:
        self.config = config
        self._http = _RoutedHttpClient(config.api_url, config.timeout)
        self._client = Client(
            username=config.account_sid,
            password=config.auth_token,
            account_sid=config.account_sid,
            http_client=self._http,
            environment=_NO_ENVIRONMENT,
        )

    def _create(self, create: Callable[..., Any], target: str, **fields: str) -> str | None:
        try:
            instance = create(to=target, from_=self.config.from_number, **fields)
        except (TwilioRestException, TwilioServiceException) as exc:
            raise self._rest_error(exc, target) from None
        except requests.RequestException as exc:
            # The exception's text names the URL and the pool, never the credentials; the type
            # (ConnectTimeout, ReadTimeout, ConnectionError) is what a person needs.
            raise DeliveryError(
                f"twilio {self._what} to {target}: network error ({type(exc).__name__})"
            ) from None
        except (TwilioException, ValueError) as exc:
            # A 2xx whose body is not JSON: Twilio took the request, so a retry could page twice.
            raise DeliveryError(
                f"twilio {self._what} to {target}: unreadable answer ({type(exc).__name__})",
                retryable=False,
            ) from None
        return instance.sid

    def _rest_error(
        self, exc: TwilioRestException | TwilioServiceException, target: str
    ) -> DeliveryError:
        status = int(exc.status)
        if isinstance(exc, TwilioServiceException):
            text = exc.title + (f": {exc.detail}" if exc.detail else "")
        else:
            text = exc.msg
        code = f" (code {exc.code})" if exc.code and exc.code != status else ""
        detail = f"twilio {self._what} to {target}: HTTP {status}{code}: {text}"
        if status == 429:
            return DeliveryError(
                detail, retryable=True, retry_after=_retry_after(self._http.last_headers)
            )
        # 408: Twilio (or a proxy in front of it) timed out reading the request.
        return DeliveryError(detail, retryable=status >= 500 or status == 408)


def _retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), if any."""
    value = (headers or {}).get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class SmsNotifier(_TwilioNotifier):
    """Texts pages to phone numbers (E.164, ``+15551234567``); returns the message SID."""

    type = "sms"
    _what = "sms"

    def send(self, message: Message, target: str) -> str | None:
        """Send ``sms_body(message)`` to ``target``."""
        return self._create(self._client.messages.create, target, body=sms_body(message))


class CallNotifier(_TwilioNotifier):
    """Phones numbers and reads the page out; pressing 1 acknowledges. Returns the call SID."""

    type = "call"
    _what = "call"

    def send(self, message: Message, target: str) -> str | None:
        """Call ``target`` with ``voice_twiml(message)`` inline (no TwiML URL to host)."""
        return self._create(self._client.calls.create, target, twiml=voice_twiml(message))


def sms_body(message: Message) -> str:
    """The title, up to three headlines, the state change or the acknowledge link.

    Never longer than :data:`SMS_MAX_CHARS`: headlines are cut, the link is kept whole.
    """
    lines = [message.title]
    lines += [f"- {_cut(a.headline, _HEADLINE_MAX)}" for a in message.alerts[:SMS_MAX_ALERTS]]
    tail = []
    by = _changed_by(message)
    if by:
        tail.append(f"{message.event} by {by}")
    if message.ack_url and message.event not in STATE_EVENTS:
        tail.append(f"ack: {message.ack_url}")
    tail_text = "\n".join(tail)
    room = SMS_MAX_CHARS - (len(tail_text) + 1 if tail_text else 0)
    head = _cut("\n".join(lines), max(room, 0))
    return "\n".join(part for part in (head, tail_text) if part)[:SMS_MAX_CHARS]


def spoken_summary(message: Message) -> str:
    """``critical. project llm, run run 12. divergence, loss spike, and 2 more`` (no full stop).

    The severity, the project and run, the kinds of the first alerts and how many others.
    """
    first = message.alerts[0]
    kinds = list(dict.fromkeys(_speakable(a.kind) for a in message.alerts[:VOICE_MAX_KINDS]))
    others = len(message.alerts) - VOICE_MAX_KINDS
    what = ", ".join(kinds) + (f", and {others} more" if others > 0 else "")
    return (
        f"{message.severity}. project {_speakable(first.project)}, "
        f"run {_speakable(first.run_name)}. {what}"
    )


def voice_twiml(message: Message) -> str:
    """The call's TwiML: the summary inside a one-digit ``<Gather>`` posting to ``voice_url``.

    Without a ``voice_url`` (no public URL) the call only reads the summary. State events
    (not expected on calls) read what changed and by whom.
    """
    response = VoiceResponse()
    summary = spoken_summary(message)
    if message.event in STATE_EVENTS:
        by = _changed_by(message)
        by_whom = f" by {_speakable(by)}" if by else ""
        response.say(f"runwatch update. {summary}. {message.event}{by_whom}.")
    elif message.voice_url is None:
        response.say(f"runwatch alert. {summary}.")
    else:
        gather = response.gather(num_digits=1, timeout=10, action=message.voice_url, method="POST")
        gather.say(f"runwatch alert. {summary}. Press 1 to acknowledge.")
        response.say("No key pressed. Goodbye.")
    return response.to_xml(xml_declaration=False)


def _changed_by(message: Message) -> str | None:
    if message.event not in STATE_EVENTS:
        return None
    return next((_by(a, message.event) for a in message.alerts if _by(a, message.event)), None)


def _by(alert: AlertView, event: str) -> str | None:
    return alert.acknowledged_by if event == "acknowledged" else alert.resolved_by


def _speakable(name: str) -> str:
    """``loss_spike`` -> ``loss spike``: text-to-speech reads underscores out loud."""
    return _cut(" ".join(name.replace("_", " ").replace("-", " ").split()), _SPOKEN_NAME_MAX)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(limit - 3, 0)] + "..."
