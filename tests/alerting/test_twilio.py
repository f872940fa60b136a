"""The Twilio notifiers against a fake Twilio on loopback, through the real ``twilio`` client,
and the verification of Twilio's webhooks with the real ``RequestValidator``."""

from __future__ import annotations

import socket
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import replace
from email.utils import formatdate

import pytest

from runwatch.alerting.message import AlertView, Message
from runwatch.alerting.notifiers.base import DeliveryError
from runwatch.alerting.notifiers.twilio import (
    SMS_MAX_CHARS,
    CallNotifier,
    SmsNotifier,
    TwilioConfig,
    sms_body,
    spoken_summary,
    voice_twiml,
)
from runwatch.alerting.tokens import ForgedRequest
from runwatch.alerting.twilio_hooks import gather_reply, verify_twilio_request
from tests.alerting import builders
from tests.alerting.fake_twilio import ACCOUNT_SID, AUTH_TOKEN, FROM_NUMBER, FakeTwilio, sign

TO = "+15551234567"
ACK_URL = "https://runwatch.example/ack/eyJhbGciOi.signed"
VOICE_URL = "https://runwatch.example/api/v1/hooks/twilio/voice?token=abc.def"


def alert(id: int = 1, kind: str = "divergence", **fields: object) -> AlertView:
    values = {"run_id": 12, "count": 3, "first_seen_at": 1000.0, "last_seen_at": 1060.0}
    return builders.alert(id, kind=kind, **(values | fields))


def page(*alerts: AlertView, **fields: object) -> Message:
    values: dict[str, object] = {
        "notification_id": 7,
        "alerts": alerts or (alert(),),
        "run_url": "https://runwatch.example/runs/12",
        "ack_url": ACK_URL,
        "voice_url": VOICE_URL,
    }
    return builders.message(**(values | fields))


@pytest.fixture
def fake() -> Iterator[FakeTwilio]:
    with FakeTwilio() as server:
        yield server


# -- SMS ------------------------------------------------------------------------------------


def test_sms_goes_to_the_account_messages_resource(fake: FakeTwilio) -> None:
    ref = SmsNotifier(fake.config()).send(page(), TO)

    [request] = fake.requests
    assert request.path == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
    assert request.auth_user == ACCOUNT_SID
    assert request.form["To"] == TO and request.form["From"] == FROM_NUMBER
    assert ref is not None and ref.startswith("SM") and len(ref) == 34
    body = request.form["Body"]
    assert body.splitlines() == [
        "[CRITICAL] llm/run-12: divergence on train/loss",
        "- divergence on train/loss at step 1200 (x3): loss diverged",
        f"ack: {ACK_URL}",
    ]


def test_sms_lists_three_alerts_and_counts_the_others(fake: FakeTwilio) -> None:
    alerts = [alert(i, kind=f"kind{i}") for i in range(1, 6)]
    SmsNotifier(fake.config()).send(page(*alerts), TO)

    body = fake.messages[0].form["Body"]
    assert body.splitlines()[0].endswith("(+4 more)")
    assert [line for line in body.splitlines() if line.startswith("- ")] == [
        f"- kind{i} on train/loss at step 1200 (x3): loss diverged" for i in (1, 2, 3)
    ]


def test_a_long_sms_is_cut_but_keeps_its_ack_link(fake: FakeTwilio) -> None:
    long_url = ACK_URL + "x" * 600
    alerts = [alert(i, summary="s" * 2000, run_name="r" * 900) for i in range(1, 4)]
    message = page(*alerts, ack_url=long_url)

    SmsNotifier(fake.config()).send(message, TO)

    body = fake.messages[0].form["Body"]  # the fake refuses more than 1,600 characters
    assert len(body) <= SMS_MAX_CHARS
    assert body.endswith(f"\nack: {long_url}")
    assert body.startswith("[CRITICAL] llm/rrr")


def test_state_events_text_what_changed_without_a_link(fake: FakeTwilio) -> None:
    acked = alert(state="acknowledged", acknowledged_by="slack:alice")
    message = page(acked, event="acknowledged", step=None, ack_url=None, voice_url=None)

    SmsNotifier(fake.config()).send(message, TO)

    body = fake.messages[0].form["Body"]
    assert body.startswith("[ACKNOWLEDGED] llm/run-12")
    assert body.endswith("acknowledged by slack:alice")
    assert "\nack: " not in body


def test_sms_without_public_url_has_no_ack_line() -> None:
    assert "ack:" not in sms_body(page(ack_url=None))


# -- calls ----------------------------------------------------------------------------------


def test_call_gathers_one_digit_and_posts_it_to_the_voice_url(fake: FakeTwilio) -> None:
    alerts = [alert(1), alert(2, kind="loss_spike"), alert(3, kind="hang"), alert(4), alert(5)]
    ref = CallNotifier(fake.config()).send(page(*alerts), TO)

    [request] = fake.requests
    assert request.path == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Calls.json"
    assert ref is not None and ref.startswith("CA")
    assert request.form["To"] == TO and request.form["From"] == FROM_NUMBER
    assert "Url" not in request.form
    twiml = ET.fromstring(request.form["Twiml"])
    assert twiml.tag == "Response"
    gather, goodbye = list(twiml)
    assert gather.tag == "Gather"
    assert gather.attrib == {
        "action": VOICE_URL,
        "method": "POST",
        "numDigits": "1",
        "timeout": "10",
    }
    [say] = list(gather)
    assert say.text == (
        "runwatch alert. critical. project llm, run run 12. "
        "divergence, loss spike, hang, and 2 more. Press 1 to acknowledge."
    )
    assert (goodbye.tag, goodbye.text) == ("Say", "No key pressed. Goodbye.")


def test_call_twiml_escapes_what_it_reads() -> None:
    twiml = voice_twiml(page(alert(run_name='a<b>&"c"', kind="nan</Say><Hangup/>")))

    say = ET.fromstring(twiml).find("Gather/Say")
    assert say is not None and say.text is not None
    assert 'run a<b>&"c"' in say.text
    assert "nan</Say><Hangup/>" in say.text
    assert "<Hangup/>" not in twiml


def test_call_without_voice_url_only_reads_the_summary() -> None:
    twiml = ET.fromstring(voice_twiml(page(voice_url=None)))

    assert [child.tag for child in twiml] == ["Say"]
    assert twiml[0].text == "runwatch alert. critical. project llm, run run 12. divergence."


def test_a_state_event_call_says_what_changed() -> None:
    resolved = alert(state="resolved", resolved_by="api:bob_smith")
    twiml = ET.fromstring(voice_twiml(page(resolved, event="resolved", step=None)))

    assert [(child.tag, child.text) for child in twiml] == [
        (
            "Say",
            "runwatch update. critical. project llm, run run 12. divergence. "
            "resolved by api:bob smith.",
        )
    ]


def test_spoken_summary_names_each_kind_once() -> None:
    message = page(alert(1), alert(2), alert(3, kind="hang", severity="warning"))

    assert spoken_summary(message) == "critical. project llm, run run 12. divergence, hang"


# -- errors ---------------------------------------------------------------------------------


# (status, Twilio code, retryable)
ERRORS = [
    (500, None, True),  # Twilio had a bad moment
    (503, None, True),  # Twilio is down
    (401, 20003, False),  # wrong credentials
    (403, 20003, False),  # the account may not do this
    (400, 21211, False),  # a malformed number
    (404, 20404, False),  # an unknown account
    (408, None, True),  # the request timed out on the way
]


@pytest.mark.parametrize(("status", "code", "retryable"), ERRORS)
@pytest.mark.parametrize("notifier", [SmsNotifier, CallNotifier])
def test_http_errors_are_classified(
    fake: FakeTwilio,
    notifier: type[SmsNotifier | CallNotifier],
    status: int,
    code: int | None,
    retryable: bool,
) -> None:
    fake.fail_next(status=status, code=code, message="Twilio says no")

    with pytest.raises(DeliveryError) as caught:
        notifier(fake.config()).send(page(), TO)

    assert caught.value.retryable is retryable
    assert caught.value.retry_after is None
    assert f"HTTP {status}" in caught.value.detail and "Twilio says no" in caught.value.detail
    assert AUTH_TOKEN not in caught.value.detail
    assert len(fake.requests) == 1  # one attempt: retries belong to the outbox


def test_429_is_retried_after_twilios_delay(fake: FakeTwilio) -> None:
    fake.fail_next(status=429, code=20429, message="Too Many Requests", retry_after=7)

    with pytest.raises(DeliveryError) as caught:
        SmsNotifier(fake.config()).send(page(), TO)

    assert caught.value.retryable and caught.value.retry_after == 7.0
    assert "code 20429" in caught.value.detail


def test_429_retry_after_as_a_date(fake: FakeTwilio) -> None:
    fake.fail_next(status=429, retry_after=formatdate(time.time() + 60, usegmt=True))

    with pytest.raises(DeliveryError) as caught:
        SmsNotifier(fake.config()).send(page(), TO)

    assert caught.value.retry_after is not None and 55 <= caught.value.retry_after <= 61


def test_429_without_retry_after(fake: FakeTwilio) -> None:
    fake.fail_next(status=429)

    with pytest.raises(DeliveryError) as caught:
        CallNotifier(fake.config()).send(page(), TO)

    assert caught.value.retryable and caught.value.retry_after is None


def test_problem_details_errors_are_classified_too(fake: FakeTwilio) -> None:
    # Newer Twilio APIs answer RFC 9457 problems, which the client raises as another type.
    problem = {
        "type": "https://www.twilio.com/docs/errors/20500",
        "title": "Internal Server Error",
        "status": 503,
        "code": 20500,
        "detail": "try later",
    }
    fake.fail_next(status=503, body=problem)

    with pytest.raises(DeliveryError) as caught:
        SmsNotifier(fake.config()).send(page(), TO)

    assert caught.value.retryable
    assert "Internal Server Error: try later" in caught.value.detail


def test_an_invalid_number_is_final(fake: FakeTwilio) -> None:
    with pytest.raises(DeliveryError) as caught:
        SmsNotifier(fake.config()).send(page(), "555-oncall")

    assert not caught.value.retryable
    assert "code 21211" in caught.value.detail and "555-oncall" in caught.value.detail


def test_a_wrong_auth_token_is_final_and_not_repeated(fake: FakeTwilio) -> None:
    config = replace(fake.config(), auth_token="wrong-token-123")

    with pytest.raises(DeliveryError) as caught:
        CallNotifier(config).send(page(), TO)

    assert not caught.value.retryable and "HTTP 401" in caught.value.detail
    assert "wrong-token-123" not in caught.value.detail
    assert "wrong-token-123" not in repr(config)


def test_an_unreachable_twilio_is_retryable() -> None:
    with socket.socket() as sock:  # a port nobody listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = TwilioConfig(ACCOUNT_SID, AUTH_TOKEN, FROM_NUMBER, api_url=f"http://127.0.0.1:{port}")

    with pytest.raises(DeliveryError) as caught:
        SmsNotifier(config).send(page(), TO)

    assert caught.value.retryable and "network error (ConnectionError)" in caught.value.detail


def test_a_slow_twilio_times_out_and_is_retryable(fake: FakeTwilio) -> None:
    fake.delay_next(seconds=2.0)
    config = replace(fake.config(), timeout=0.3)

    started = time.monotonic()
    with pytest.raises(DeliveryError) as caught:
        CallNotifier(config).send(page(), TO)

    assert time.monotonic() - started < 1.5
    assert caught.value.retryable and "ReadTimeout" in caught.value.detail


def test_a_config_path_prefix_is_kept() -> None:
    with FakeTwilio(auth_token=None) as fake:
        config = replace(fake.config(), api_url=fake.api_url + "/proxy/")
        with pytest.raises(DeliveryError) as caught:
            SmsNotifier(config).send(page(), TO)

    assert not caught.value.retryable and "HTTP 404" in caught.value.detail
    assert fake.requests[0].path == f"/proxy/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"


@pytest.mark.parametrize(
    "fields",
    [
        {"account_sid": ""},
        {"auth_token": ""},
        {"from_number": ""},
        {"api_url": "127.0.0.1:8000"},
        {"timeout": 0},
    ],
)
def test_config_refuses_what_cannot_work(fields: dict[str, object]) -> None:
    values: dict[str, object] = {
        "account_sid": ACCOUNT_SID,
        "auth_token": AUTH_TOKEN,
        "from_number": FROM_NUMBER,
    }
    values.update(fields)
    with pytest.raises(ValueError, match=next(iter(fields))):
        TwilioConfig(**values)  # type: ignore[arg-type]


# -- webhooks -------------------------------------------------------------------------------

HOOK_URL = "https://runwatch.example/api/v1/hooks/twilio/voice?token=abc.def"
HOOK_PARAMS = {"CallSid": "CA" + "1" * 32, "Digits": "1", "AccountSid": ACCOUNT_SID}


def test_a_signed_webhook_passes() -> None:
    signature = sign(HOOK_URL, HOOK_PARAMS, AUTH_TOKEN)

    verify_twilio_request(HOOK_URL, HOOK_PARAMS, signature, AUTH_TOKEN)


def test_twilio_may_sign_the_url_with_or_without_the_default_port() -> None:
    with_port = HOOK_URL.replace("runwatch.example", "runwatch.example:443")
    signature = sign(with_port, HOOK_PARAMS, AUTH_TOKEN)

    verify_twilio_request(HOOK_URL, HOOK_PARAMS, signature, AUTH_TOKEN)


@pytest.mark.parametrize("signature", [None, ""])
def test_an_unsigned_webhook_is_forged(signature: str | None) -> None:
    with pytest.raises(ForgedRequest, match="missing X-Twilio-Signature"):
        verify_twilio_request(HOOK_URL, HOOK_PARAMS, signature, AUTH_TOKEN)


# (url, params, token the request was signed with) that do not match what is checked
FORGERIES = [
    pytest.param(HOOK_URL, HOOK_PARAMS | {"Digits": "2"}, AUTH_TOKEN, id="altered param"),
    pytest.param(HOOK_URL, HOOK_PARAMS | {"Extra": "x"}, AUTH_TOKEN, id="added param"),
    pytest.param(
        HOOK_URL,
        {k: v for k, v in HOOK_PARAMS.items() if k != "Digits"},
        AUTH_TOKEN,
        id="dropped param",
    ),
    pytest.param(HOOK_URL.replace("abc.def", "abc.xyz"), HOOK_PARAMS, AUTH_TOKEN, id="query"),
    pytest.param(HOOK_URL.replace("voice", "sms"), HOOK_PARAMS, AUTH_TOKEN, id="path"),
    pytest.param(HOOK_URL.replace("https", "http"), HOOK_PARAMS, AUTH_TOKEN, id="scheme"),
    pytest.param(HOOK_URL, HOOK_PARAMS, "another-token", id="other account"),
]


@pytest.mark.parametrize(("url", "params", "token"), FORGERIES)
def test_a_webhook_signed_for_something_else_is_forged(
    url: str, params: dict[str, str], token: str
) -> None:
    signature = sign(HOOK_URL, HOOK_PARAMS, token)

    with pytest.raises(ForgedRequest, match="bad signature"):
        verify_twilio_request(url, params, signature, AUTH_TOKEN)


def test_garbage_signature_is_forged() -> None:
    with pytest.raises(ForgedRequest, match="bad signature"):
        verify_twilio_request(HOOK_URL, HOOK_PARAMS, "not base64 at all", AUTH_TOKEN)


# (digits, acknowledged, what is said)
REPLIES = [
    ("1", True, "Acknowledged. 2 alerts on run 12. Goodbye."),
    ("1", False, "Not acknowledged. Goodbye."),  # the link expired or nothing was left to ack
    ("2", True, "Not acknowledged. Goodbye."),  # only 1 acknowledges
    (None, False, "Not acknowledged. Goodbye."),  # Gather timed out without a key
]


@pytest.mark.parametrize(("digits", "acknowledged", "said"), REPLIES)
def test_gather_reply(digits: str | None, acknowledged: bool, said: str) -> None:
    twiml = ET.fromstring(gather_reply(digits, acknowledged, "2 alerts on run 12."))

    assert twiml.tag == "Response"
    assert [(child.tag, child.text) for child in twiml] == [("Say", said)]
