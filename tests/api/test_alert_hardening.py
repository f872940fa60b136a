"""Alerting's trust boundary and input handling: empty secrets, huge numbers, unusable
URLs, links kept out of logs, secrets kept out of messages. Each test passes for either
fix (refusing the value up front, or handling it)."""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from click.testing import CliRunner
from pydantic import ValidationError
from twilio.request_validator import RequestValidator

from runwatch.alerting.config import seconds
from runwatch.alerting.tokens import AckToken, ForgedRequest, sign_ack, verify_webhook_signature
from runwatch.cli import main
from runwatch.collector.policy.model import PolicyError, parse_policy
from runwatch.collector.server import ServerThread
from runwatch.settings import Settings
from tests.conftest import Collector, wait_for

SLACK_HOOK = "/api/v1/hooks/slack/interactivity"
TWILIO_HOOK = "/api/v1/hooks/twilio/voice"
ACK_HOOK = "/api/v1/hooks/ack"
PUBLIC_URL = "https://runwatch.example.com"
NOWHERE = ("--server", "http://127.0.0.1:9")
"""A server nobody listens on: the CLI input below is refused before any request."""
HUGE = "9" * 400
"""An integer Python parses (under the 4,300-digit limit) that no float can hold."""


# -- helpers --------------------------------------------------------------------------------
def policy_file(tmp_path: Path, alerting: dict[str, Any]) -> str:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "rules": [], "alerting": alerting}))
    return str(path)


def console_policy(tmp_path: Path) -> str:
    """Every alert goes to the console channel at once."""
    return policy_file(
        tmp_path,
        {
            "group_wait": 0,
            "group_interval": 0,
            "resolve_after": "never",
            "channels": {"log": {"type": "console", "label": "log"}},
            "escalations": {"page": {"steps": [{"notify": ["log"]}], "then": "stop"}},
            "routes": [{"escalation": "page"}],
        },
    )


@contextmanager
def running(settings: Settings) -> Iterator[Collector]:
    thread = ServerThread(settings).start()
    try:
        with httpx.Client(base_url=thread.url, timeout=30) as http:
            yield Collector(thread, http)
    finally:
        thread.stop()


def settings_or_refused(**values: Any) -> Settings | None:
    """The settings, or None when they are refused up front (a fix for the problems below)."""
    try:
        return Settings(host="127.0.0.1", port=0, **values)
    except ValidationError:
        return None


def raise_alert(collector: Collector, project: str = "llm", kind: str = "hang") -> int:
    with collector.client() as client:
        run = client.create_run(project, f"{project}-run")["id"]
        return int(client.raise_alert(run, kind, severity="critical")["id"])


def alert_state(collector: Collector, alert_id: int) -> str:
    reply = collector.http.get(f"/api/v1/alerts/{alert_id}")
    assert reply.status_code == 200, reply.text
    return str(reply.json()["state"])


def deliveries(collector: Collector, alert_id: int) -> list[dict[str, Any]]:
    reply = collector.http.get(f"/api/v1/alerts/{alert_id}/deliveries")
    assert reply.status_code == 200, reply.text
    return reply.json()  # type: ignore[no-any-return]


def slack_signature(secret: bytes, timestamp: str, body: bytes) -> str:
    return "v0=" + hmac.new(secret, f"v0:{timestamp}:".encode() + body, hashlib.sha256).hexdigest()


def no_traceback(result: Any) -> None:
    """A CLI run that ended with a message and an exit status, not an exception."""
    assert isinstance(result.exception, SystemExit) or result.exception is None, (
        f"{type(result.exception).__name__}: {result.exception}\n{result.output}"
    )
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output


# -- 1. webhook/Slack timestamps that overflow a float: 500 ----------------------------------
def test_a_slack_timestamp_too_large_for_a_float_is_refused_not_a_500(db_url: str) -> None:
    """alerting/slack_hooks.py: ``abs(now - int(timestamp))`` raises OverflowError."""
    if "sqlite" not in db_url:
        pytest.skip("one database is enough")
    settings = Settings(host="127.0.0.1", port=0, db=db_url, slack_signing_secret="sek")
    body = b"payload=%7B%7D"
    with running(settings) as collector:
        reply = collector.http.post(
            SLACK_HOOK,
            content=body,
            headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "X-Slack-Request-Timestamp": HUGE,
                "X-Slack-Signature": slack_signature(b"sek", HUGE, body),
            },
        )
    assert reply.status_code in (400, 401), reply.text
    assert reply.json()["error"] in ("bad_request", "unauthorized")


def test_the_webhook_receiver_helper_refuses_a_huge_timestamp() -> None:
    """alerting/tokens.py verify_webhook_signature: OverflowError instead of ForgedRequest,
    so a receiver built on it answers 500 to anyone."""
    with pytest.raises(ForgedRequest):
        verify_webhook_signature(b"s", HUGE, b"{}", "sha256=00", now=time.time())


# -- 2. empty secrets are accepted as "configured" -------------------------------------------
def test_an_empty_secret_key_does_not_break_links_and_paging(db_url: str, tmp_path: Path) -> None:
    """RUNWATCH_SECRET_KEY="" is a SecretStr(""), not None: link_secret() returns "", every
    acknowledge link and keypress answers 500, and with a public URL no page is ever sent
    (sign_ack raises in the delivery stage, which retries forever)."""
    if "sqlite" not in db_url:
        pytest.skip("one database is enough")
    settings = settings_or_refused(
        db=db_url,
        secret_key="",
        public_url=PUBLIC_URL,
        policy=console_policy(tmp_path),
        alert_tick_seconds=0.05,
    )
    if settings is None:
        return  # refused at start-up: fixed
    with running(settings) as collector:
        page = collector.http.get(ACK_HOOK, params={"token": "x"})
        assert page.status_code == 403, page.text
        alert_id = raise_alert(collector)
        sent = wait_for(
            lambda: [d for d in deliveries(collector, alert_id) if d["state"] == "sent"],
            "the page",
            timeout=8.0,
        )
        assert sent, deliveries(collector, alert_id)


def test_an_empty_slack_signing_secret_is_not_a_500(db_url: str) -> None:
    """RUNWATCH_SLACK_SIGNING_SECRET="" passes ``is None`` checks (settings validator and the
    route), then slack_sdk's SignatureVerifier raises ValueError on every click: 500."""
    if "sqlite" not in db_url:
        pytest.skip("one database is enough")
    settings = settings_or_refused(db=db_url, slack_signing_secret="")
    if settings is None:
        return
    body = b"payload=%7B%7D"
    now = str(int(time.time()))
    with running(settings) as collector:
        reply = collector.http.post(
            SLACK_HOOK,
            content=body,
            headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "X-Slack-Request-Timestamp": now,
                "X-Slack-Signature": slack_signature(b"", now, body),
            },
        )
    assert reply.status_code in (401, 404), reply.text


def test_an_empty_twilio_auth_token_does_not_let_anyone_sign_keypresses(db_url: str) -> None:
    """RUNWATCH_TWILIO_AUTH_TOKEN="" is accepted when no sms/call channel is configured, and
    the voice route treats it as configured: Twilio's validator then takes an HMAC keyed with
    "" (which anyone can compute) as Twilio's signature."""
    if "sqlite" not in db_url:
        pytest.skip("one database is enough")
    link_key = "a-link-signing-key-of-some-length"
    settings = settings_or_refused(
        db=db_url, twilio_auth_token="", public_url=PUBLIC_URL, secret_key=link_key
    )
    if settings is None:
        return
    with running(settings) as collector:
        alert_id = raise_alert(collector)
        token = sign_ack(link_key, AckToken(1, (alert_id,), "+15550100"))
        path = f"{TWILIO_HOOK}?token={token}"
        form = {"Digits": "1", "CallSid": "CAforged"}
        forged = RequestValidator("").compute_signature(f"{PUBLIC_URL}{path}", form)
        reply = collector.http.post(path, data=form, headers={"X-Twilio-Signature": forged})
        assert reply.status_code in (403, 404), reply.text
        assert alert_state(collector, alert_id) == "firing"


# -- 3. acknowledge tokens written to the log -------------------------------------------------
def test_the_console_channel_does_not_log_acknowledge_tokens(db_url: str, tmp_path: Path) -> None:
    """alerting/notifiers/console.py logs ``message.text``, which ends with
    ``acknowledge: <public_url>/api/v1/hooks/ack?token=...``: a bearer credential that
    acknowledges the alerts (of any project) without a key, in the collector's log."""
    if "sqlite" not in db_url:
        pytest.skip("one database is enough")
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Keep()
    logger = logging.getLogger("runwatch.alerts")
    logger.addHandler(handler)
    try:
        settings = Settings(
            host="127.0.0.1",
            port=0,
            db=db_url,
            public_url=PUBLIC_URL,
            secret_key="a-link-signing-key-of-some-length",
            policy=console_policy(tmp_path),
            alert_tick_seconds=0.05,
        )
        with running(settings) as collector:
            alert_id = raise_alert(collector)
            assert wait_for(
                lambda: [r for r in records if f"#{alert_id}" in r], "the log line", timeout=8.0
            ), records
    finally:
        logger.removeHandler(handler)
    logged = "\n".join(records)
    assert "token=" not in logged, logged


# -- 4. webhook URLs the config accepts but the collector cannot use --------------------------
def webhook_policy(url: str) -> dict[str, Any]:
    return {
        "version": 1,
        "rules": [],
        "alerting": {
            "channels": {"hook": {"type": "webhook", "url": url}},
            "escalations": {"page": {"steps": [{"notify": ["hook"]}]}},
            "routes": [{"escalation": "page"}],
        },
    }


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("http://hooks.example.com:99999/x", id="port-out-of-range"),
        pytest.param("http://hooks.example.com:abc/x", id="port-not-a-number"),
        pytest.param("http://[::1/x", id="bad-ipv6"),
    ],
)
def test_policy_check_refuses_webhook_urls_the_collector_cannot_use(url: str) -> None:
    """alerting/config.py WebhookChannel._http only matches ``^https?://[^\\s/]+``: these pass
    ``runwatch policy check`` and settings, then the collector fails to start (httpx.URL in
    WebhookNotifier) or, for port 99999, ``targets`` raises in every dispatcher tick."""
    with pytest.raises(PolicyError):
        parse_policy(yaml.safe_dump(webhook_policy(url)))


def test_a_mistyped_webhook_url_is_not_echoed_with_its_secret_path() -> None:
    """The webhook notifier keeps hook URLs (which carry a secret in their path) out of
    errors, but the config validator echoes the whole URL into ``policy check`` output and
    the server's start-up error (logs)."""
    url = "htps://hooks.slack.com/services/T0/B0/SECRETPATHTOKEN"
    with pytest.raises(PolicyError) as refused:
        parse_policy(yaml.safe_dump(webhook_policy(url)))
    assert "SECRETPATHTOKEN" not in str(refused.value)
    assert "SECRETPATHTOKEN" not in " ".join(refused.value.problems)


# -- 5. durations too large for a float ------------------------------------------------------
def test_a_duration_too_large_for_a_float_is_a_value_error() -> None:
    """alerting/config.py seconds(): ``float(int)`` raises OverflowError, which pydantic does
    not turn into a validation error."""
    with pytest.raises(ValueError):
        seconds(int(HUGE))


def test_a_huge_silence_duration_is_422_not_500(collector: Collector) -> None:
    with collector.client() as client:
        client.create_run("llm", "r")
    reply = collector.http.post(
        "/api/v1/silences",
        content=f'{{"matchers": {{"kind": "x"}}, "project": "llm", "duration": {HUGE}}}',
        headers={"Content-Type": "application/json"},
    )
    assert reply.status_code == 422, reply.text
    assert collector.http.get("/api/v1/silences").json() == []


def test_policy_check_reports_a_huge_duration_without_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(f"rules: []\nalerting:\n  group_wait: {HUGE}\n")
    result = CliRunner().invoke(main, ["policy", "check", str(path)])
    no_traceback(result)
    assert "group_wait" in result.output


# -- 6. CLI input that ends in a traceback ---------------------------------------------------
def test_silences_create_refuses_a_run_id_that_is_not_a_number() -> None:
    """runwatch/cli.py parse_matchers: ``"²".isdigit()`` is True, ``int("²")`` raises."""
    result = CliRunner().invoke(
        main,
        ["silences", "create", "--match", "run_id=²", "--duration", "1h", *NOWHERE],
    )
    no_traceback(result)
    assert "run_id" in result.output


@pytest.mark.parametrize("duration", ["nan", "inf", "1e400"])
def test_silences_create_refuses_a_duration_that_is_not_finite(duration: str) -> None:
    """runwatch/cli.py _duration: float("nan") is sent as JSON, which the encoder refuses."""
    result = CliRunner().invoke(
        main,
        ["silences", "create", "--match", "kind=x", "--duration", duration, *NOWHERE],
    )
    no_traceback(result)


# -- 7. settings that are accepted and break at run time --------------------------------------
@pytest.mark.parametrize(
    "url",
    [
        pytest.param("https://", id="no-host"),
        pytest.param("https://runwatch.example.com/?a=1", id="query"),
        pytest.param("https://runwatch.example.com/#top", id="fragment"),
    ],
)
def test_public_url_must_be_a_usable_base(url: str) -> None:
    """runwatch/settings.py _public_url only checks the scheme: links become
    ``https:/api/v1/hooks/ack?...`` or ``...?a=1/api/v1/hooks/ack?token=`` and Twilio's
    signature check (over public_url + path) can never pass."""
    with pytest.raises(ValidationError):
        Settings(public_url=url)


def test_provider_api_urls_are_checked_with_the_settings(tmp_path: Path) -> None:
    """twilio_api_url and slack_api_url are free text: ``ftp://x`` passes Settings and the
    collector then fails to start with a traceback (TwilioConfig) or every Slack send fails
    with ``ValueError: unknown url type`` (retried forever)."""
    path = policy_file(
        tmp_path,
        {
            "channels": {"t": {"type": "sms", "to": ["+15550100"]}},
            "escalations": {"page": {"steps": [{"notify": ["t"]}]}},
            "routes": [{"escalation": "page"}],
        },
    )
    twilio = {
        "policy": path,
        "twilio_account_sid": "AC1",
        "twilio_auth_token": "token",
        "twilio_from_number": "+15550100",
    }
    with pytest.raises(ValidationError):
        Settings(**twilio, twilio_api_url="ftp://proxy.example.com")
    with pytest.raises(ValidationError):
        Settings(slack_api_url="not a url")


def test_a_settings_error_names_the_problem_without_echoing_secrets(tmp_path: Path) -> None:
    """A model-wide check (the policy, the channels' settings) used to print every input,
    secrets included, in the ValidationError a server's start-up logs."""
    with pytest.raises(ValidationError) as raised:
        Settings(
            policy=str(tmp_path / "missing.yaml"),
            slack_bot_token="xoxb-not-to-be-seen",
            smtp_password="pw-not-to-be-seen",
        )
    text = str(raised.value)
    assert "cannot read it" in text
    assert "not-to-be-seen" not in text
