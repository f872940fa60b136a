"""Twilio calling back: proof that a webhook comes from Twilio, and what to say in answer.

When the person on a page call presses a key, Twilio posts the ``<Gather>`` result (form
fields ``Digits``, ``CallSid``, ...) to the call's ``voice_url`` and signs the request with
the account's auth token: ``X-Twilio-Signature`` is an HMAC-SHA1 of the full URL Twilio
called followed by the sorted form fields. The collector's route checks it with
:func:`verify_twilio_request` before it acknowledges anything, then answers TwiML built by
:func:`gather_reply`.

The URL must be the one Twilio called, as Twilio spelt it: behind a proxy that is the public
URL (scheme, host and query string included), not the one the collector sees.
"""

from __future__ import annotations

from collections.abc import Mapping

from twilio.request_validator import RequestValidator
from twilio.twiml.voice_response import VoiceResponse

from runwatch.alerting.tokens import ForgedRequest

SIGNATURE_HEADER = "X-Twilio-Signature"


def verify_twilio_request(
    url: str, params: Mapping[str, str], signature: str | None, auth_token: str
) -> None:
    """Raise :class:`ForgedRequest` unless ``signature`` signs ``url`` and ``params``.

    ``params`` are the POSTed form fields (a multi-dict with ``getlist`` works too);
    ``signature`` is the ``X-Twilio-Signature`` header, None when absent.
    """
    if not signature:
        raise ForgedRequest(f"missing {SIGNATURE_HEADER} header")
    if not RequestValidator(auth_token).validate(url, params, signature):
        raise ForgedRequest("bad signature")


def gather_reply(digits: str | None, acknowledged: bool, what: str) -> str:
    """TwiML answering a ``<Gather>``: confirm an acknowledgement, or say there was none.

    ``acknowledged`` is whether the key pressed (1) did acknowledge the alerts; ``what``
    completes "Acknowledged." (``"2 alerts on run 12."``).
    """
    response = VoiceResponse()
    if digits == "1" and acknowledged:
        response.say(f"Acknowledged. {what} Goodbye." if what else "Acknowledged. Goodbye.")
    else:
        response.say("Not acknowledged. Goodbye.")
    return response.to_xml()


def cannot_acknowledge(why: str) -> str:
    """TwiML for a keypress whose link cannot be used (expired, altered): say so, hang up."""
    response = VoiceResponse()
    response.say(f"This alert cannot be acknowledged by phone: {why}. Goodbye.")
    return response.to_xml()
