"""The console notifier: what it prints and logs."""

from __future__ import annotations

import io
import logging
from typing import Any

import pytest

from runwatch.alerting.message import AlertView, Message
from runwatch.alerting.notifiers.base import DeliveryError
from runwatch.alerting.notifiers.console import ConsoleNotifier
from tests.alerting import builders


def alert(id: int, **kw: Any) -> AlertView:
    return builders.alert(id, **kw)


def message(**kw: Any) -> Message:
    fields: dict[str, Any] = {
        "step": 1,
        "alerts": (alert(1), alert(2, kind="hang", key="", severity="warning", step=None)),
        "run_url": "http://127.0.0.1:8000/runs/7",
        "ack_url": "http://127.0.0.1:8000/ack/TOKEN",
    }
    return builders.message(**(fields | kw))


EXPECTED = """\
[runwatch] firing, step 2 -> sms oncall
  [CRITICAL] llm/run-12: divergence on train/loss (+1 more)
  - #1 [critical] divergence on train/loss at step 1200: loss diverged
  - #2 [warning] hang: loss diverged
  run: http://127.0.0.1:8000/runs/7
"""


def test_writes_to_the_stream_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    stream = io.StringIO()
    with caplog.at_level(logging.WARNING, logger="runwatch.alerts"):
        ref = ConsoleNotifier(stream=stream).send(message(), "sms oncall")
    assert ref is None
    assert stream.getvalue() == EXPECTED
    [record] = caplog.records
    assert record.name == "runwatch.alerts"
    assert record.levelno == logging.WARNING
    assert record.getMessage() == EXPECTED.rstrip("\n")


def test_without_a_stream_it_only_logs(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    with caplog.at_level(logging.WARNING, logger="runwatch.alerts"):
        ConsoleNotifier().send(message(), "sms oncall")
    assert caplog.records[0].getMessage() == EXPECTED.rstrip("\n")
    assert capsys.readouterr().err == ""


def test_state_event_has_no_step_and_says_who() -> None:
    stream = io.StringIO()
    acked = (alert(1, state="acknowledged", acknowledged_by="web:ana"),)
    ConsoleNotifier(stream=stream).send(
        message(event="acknowledged", step=None, alerts=acked, ack_url=None), ""
    )
    lines = stream.getvalue().splitlines()
    assert lines[0] == "[runwatch] acknowledged"
    assert lines[1] == "  [ACKNOWLEDGED] llm/run-12: divergence on train/loss"
    assert "  acknowledged by web:ana" in lines


def test_closed_stream_is_a_delivery_error() -> None:
    stream = io.StringIO()
    stream.close()
    with pytest.raises(DeliveryError) as err:
        ConsoleNotifier(stream=stream).send(message(), "x")
    assert not err.value.retryable


def test_type() -> None:
    assert ConsoleNotifier.type == "console"
