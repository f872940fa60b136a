"""The dispatcher's edge cases: silences and siblings, rerouting, rate limits against
cancelled messages, ticks that cannot take every due alert, and races between writers.

Tests marked ``pg_only`` interleave two transactions by hand: they need PostgreSQL (on SQLite
``Store.write`` serialises writers with a non-reentrant lock, so the race cannot happen there
and the nested write would deadlock).
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from runwatch.collector.storage import alerts as db
from runwatch.collector.storage import notifications as outbox_db
from runwatch.collector.storage import silences as silence_db
from runwatch.collector.storage.store import Store
from tests.alerting.dispatch_fixtures import (
    Clock,
    advance_to,
    config,
    make_alerter,
    make_run,
    notifiers,
    signal,
)

MIN = 60.0


def pg_only(store: Store) -> None:
    if store.dialect == "sqlite":
        pytest.skip("a race between two writers: SQLite serialises them")


# -- grouping ------------------------------------------------------------------------------


def test_a_silenced_sibling_does_not_hold_back_an_unsilenced_alert_of_its_run(
    store: Store,
) -> None:
    """A held alert keeps (round 0, step 0) with ``next_at`` = the silence's end, and
    ``first_timer`` takes it for a sibling waiting for its first message: a new alert of the
    run that no silence matches joins it and waits until the silence ends."""
    clock = Clock()
    out = notifiers(clock, "slack", "sms", "call", "manager")
    alerter = make_alerter(store, config(), clock, out)
    run = make_run(store)
    start = clock.now
    alerter.create_silence(
        project_id=1,
        matchers={"kind": "loss_*"},
        starts_at=clock.now,
        ends_at=clock.now + 8 * 3600,
        created_by="api:test",
        comment="known noisy loss",
    )
    alerter.intake([signal(run, "loss_spike")])
    advance_to(alerter, clock, 60, step=1)  # held by the silence at 30 s
    alerter.intake([signal(run, "divergence", key="train/loss")])  # not silenced
    advance_to(alerter, clock, 120, step=1)

    paged = [(s.at - start, [a.kind for a in s.message.alerts]) for s in out["slack"].sent]
    # group_wait is 30 s and nothing was messaged about the run: 60 + 30 = 90 s.
    assert paged == [(90.0, ["divergence"])]


def test_a_step_that_reached_nobody_does_not_delay_the_next_alert_by_group_interval(
    store: Store,
) -> None:
    """``notified_at`` is set by a step whose channels were all quiet for the severity: the
    run counts as "messaged", and a critical alert right after waits ``group_interval``."""
    clock = Clock()
    out = notifiers(clock, "log", "sms")
    cfg = {
        "group_wait": "30s",
        "group_interval": "5m",
        "channels": {"log": {"type": "console"}, "sms": {"type": "sms", "to": "+15550100"}},
        "escalations": {"page": {"steps": [{"notify": ["sms"]}], "then": "stop"}},
        "routes": [{"escalation": "page"}],
        "quiet": {"info": ["sms", "call"]},
    }
    alerter = make_alerter(store, cfg, clock, out)
    run = make_run(store)
    start = clock.now
    alerter.intake([signal(run, "dead_units", severity="info")])
    advance_to(alerter, clock, 40, step=1)  # step 1 at 30 s: quiet for info, nobody told
    alerter.intake([signal(run, "divergence", severity="critical")])
    advance_to(alerter, clock, 400, step=1)

    assert [s.at - start for s in out["sms"].sent] == [70.0]  # 40 + group_wait, not 330


def test_more_alerts_due_than_one_tick_takes_still_make_one_message_per_run(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``due_alerts`` takes the ``MAX_DUE`` most overdue by (next_at, id): alerts of many runs
    due at once (a flood with many series) are cut across ticks in id order, which
    interleaves runs, so each run's first message is split into several. Shown here with
    ``MAX_DUE`` = 10 and 2 runs of 10 alerts (the flood test's 10,000 anomalies on 100
    runs with 100 series each is the same at full size: 10 messages per run per step)."""
    from runwatch.collector import alerts as dispatcher

    monkeypatch.setattr(dispatcher, "MAX_DUE", 10)
    clock = Clock()
    out = notifiers(clock, "slack", "sms", "call", "manager")
    alerter = make_alerter(store, config(), clock, out)
    runs = [make_run(store, "run-a"), make_run(store, "run-b")]
    alerter.intake([signal(runs[i % 2], key=f"layer{i}/grad") for i in range(20)])
    advance_to(alerter, clock, 60, step=1)

    per_run = sorted(s.message.alerts[0].run_id for s in out["slack"].sent)
    assert per_run == runs  # one first message per run


# -- severity changes ----------------------------------------------------------------------


def test_an_alert_held_by_a_silence_it_no_longer_matches_pages_at_once(store: Store) -> None:
    """A held alert sleeps until the silence's end (``next_at = ends_at``). When it turns
    critical the silence (``severity: warning``) no longer matches, but nobody wakes it."""
    clock = Clock()
    out = notifiers(clock, "slack", "sms", "call", "manager")
    alerter = make_alerter(store, config(), clock, out)
    run = make_run(store)
    alerter.create_silence(
        project_id=1,
        matchers={"severity": "warning"},
        starts_at=clock.now,
        ends_at=clock.now + 8 * 3600,
        created_by="api:test",
        comment="warnings are known",
    )
    alerter.intake([signal(run, severity="warning")])
    advance_to(alerter, clock, 60, step=1)
    assert out["slack"].sent == []
    alerter.intake([signal(run, severity="critical")])  # same fingerprint, now critical
    advance_to(alerter, clock, 5 * MIN, step=1)

    assert [a.severity for s in out["slack"].sent for a in s.message.alerts] == ["critical"]


def test_an_alert_that_turns_critical_is_routed_again(store: Store) -> None:
    """The route (and so the escalation) is picked once, at the first signal: a warning
    routed to ``none`` (record only) that turns critical never pages anyone."""
    clock = Clock()
    out = notifiers(clock, "slack", "sms", "call", "manager")
    cfg = config(
        routes=[
            {"severities": ["critical"], "escalation": "page"},
            {"escalation": "none"},
        ]
    )
    alerter = make_alerter(store, cfg, clock, out)
    run = make_run(store)
    alerter.intake([signal(run, "supervisor:restart_loop", key="", severity="warning")])
    advance_to(alerter, clock, 60, step=1)
    alerter.intake([signal(run, "supervisor:restart_loop", key="", severity="critical")])
    advance_to(alerter, clock, 5 * MIN, step=1)

    with store.read() as conn:
        (alert,) = db.list_alerts(conn, db.AlertFilter())
    assert alert.severity == "critical"
    assert len(out["slack"].sent) == 1


# -- state messages ------------------------------------------------------------------------


def test_a_channel_is_not_told_of_an_acknowledgement_of_a_page_it_never_got(
    store: Store,
) -> None:
    """``reached`` counts a claimed (``sending``) page as delivered; acknowledged between the
    claim and the render, the page is cancelled but the "acknowledged" message still goes."""
    clock = Clock()
    out = notifiers(clock, "slack", "sms", "call", "manager")
    alerter = make_alerter(store, config(), clock, out)
    alerter.intake([signal(make_run(store))])
    clock.advance(30)
    alerter.tick()
    with store.write() as conn:  # a worker has claimed the page, not yet rendered it
        (n,) = outbox_db.due_notifications(conn, clock.now, 10)
        assert outbox_db.claim_notification(conn, n.id, clock.now + 120)
    alerter.acknowledge([1], by="api:test", project_id=None)
    alerter.deliverer._attempt(n)  # the worker renders it: cancelled, nothing is sent
    advance_to(alerter, clock, 10, step=1)

    with store.read() as conn:
        states = [(x.event, x.state) for x in outbox_db.notifications_of(conn, 1)]
    assert ("firing", "cancelled") in states
    assert [s.message.event for s in out["slack"].sent] == []


# -- rate limits ---------------------------------------------------------------------------


def test_a_cancelled_message_does_not_spend_the_rate_limit_of_its_channel(store: Store) -> None:
    """``deliver`` takes a token before the claim and the render: a page whose alert was
    acknowledged while it waited is cancelled, but its token is gone, and the next real
    page on the channel waits a whole period (here an hour)."""
    clock = Clock()
    out = notifiers(clock, "slack", "sms", "call", "manager")
    cfg = config()
    cfg["channels"]["slack"]["rate_limit"] = "1/1h"
    alerter = make_alerter(store, cfg, clock, out)
    first, second = make_run(store, "run-1"), make_run(store, "run-2")
    alerter.intake([signal(first)])
    alerter.intake([signal(second)])
    clock.advance(30)
    alerter.tick()  # both first messages are in the outbox
    alerter.acknowledge([1], by="api:test", project_id=None)
    advance_to(alerter, clock, 60, step=1)

    assert [s.message.alerts[0].run_id for s in out["slack"].sent] == [second]


# -- PostgreSQL races ----------------------------------------------------------------------


def test_a_signal_racing_a_resolution_is_not_lost_in_the_resolved_alert(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``_refire`` updates the row it read by id only: an alert resolved (by hand, or quietly
    by the tick) between intake's read and its update takes the signal, and no alert is
    open for a problem that is happening now."""
    pg_only(store)
    clock = Clock()
    out = notifiers(clock, "slack", "sms", "call", "manager")
    alerter = make_alerter(store, config(), clock, out)
    run = make_run(store)
    alerter.intake([signal(run, step=1)])
    clock.advance(60)

    read = db.open_alerts_by_fingerprint
    raced = []

    def read_then_resolve(conn: Any, fingerprints: Any) -> Any:
        found = read(conn, fingerprints)
        if not raced:
            raced.append(True)
            alerter.resolve([1], by="api:other", project_id=None)  # commits meanwhile
        return found

    monkeypatch.setattr(db, "open_alerts_by_fingerprint", read_then_resolve)
    alerter.intake([signal(run, step=2)])

    with store.read() as conn:
        alerts = db.list_alerts(conn, db.AlertFilter())
    first = next(a for a in alerts if a.id == 1)
    assert (first.state, first.count, first.resolve_at) == ("resolved", 1, None)
    assert [a.state for a in alerts if a.id != 1] == ["firing"]


def test_a_quiet_resolution_does_not_close_an_alert_that_just_fired_again(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``_resolve_quiet`` reads the due rows, then ``set_state`` checks only the state: a
    signal committed in between (``resolve_at`` pushed back) is resolved as "quiet"."""
    pg_only(store)
    clock = Clock()
    out = notifiers(clock, "slack", "sms", "call", "manager")
    alerter = make_alerter(store, config(resolve_after="10m"), clock, out)
    run = make_run(store)
    alerter.intake([signal(run, step=1)])
    clock.advance(10 * MIN)

    set_state = db.set_state
    raced = []

    def signal_then_set(conn: Any, alert_id: int, **kw: Any) -> bool:
        if not raced and kw.get("by") == "runwatch":
            raced.append(True)
            alerter.intake([signal(run, step=2)])  # commits meanwhile
        return set_state(conn, alert_id, **kw)

    monkeypatch.setattr(db, "set_state", signal_then_set)
    alerter.tick()

    with store.read() as conn:
        alert = db.get_alert(conn, 1)
    assert raced and alert.count == 2
    assert alert.state == "firing"


def test_two_signals_of_a_new_fingerprint_at_once_make_one_alert(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two intakes (the detection thread and ``POST /api/v1/alerts``) that both find no
    open alert both insert: the second hits the unique ``open_fingerprint`` and raises
    (``on_anomalies`` then drops the whole batch; the API answers 500)."""
    pg_only(store)
    clock = Clock()
    alerter = make_alerter(store, config(), clock, notifiers(clock, "slack"))
    run = make_run(store)

    read = db.open_alerts_by_fingerprint
    raced = []

    def read_then_other_intake(conn: Any, fingerprints: Any) -> Any:
        found = read(conn, fingerprints)
        if not raced:
            raced.append(True)
            alerter.intake([signal(run, step=1)])  # another thread, committed meanwhile
        return found

    monkeypatch.setattr(db, "open_alerts_by_fingerprint", read_then_other_intake)
    record = alerter.raise_alert(
        run_id=run,
        kind="loss_spike",
        key="train/loss",
        severity="critical",
        summary="from the API",
        source="api:test",
        step=2,
    )

    assert (record.id, record.count) == (1, 2)


def test_a_silence_expired_while_the_tick_holds_an_alert_does_not_keep_holding_it(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tick reads the active silences, then holds a due alert until the silence's end
    as it read it. ``expire_silence`` committed in between wakes only alerts already marked
    ``silenced_by``: this one sleeps until the silence's old end (here 8 hours)."""
    pg_only(store)
    clock = Clock()
    out = notifiers(clock, "slack", "sms", "call", "manager")
    alerter = make_alerter(store, config(), clock, out)
    run = make_run(store)
    silence = alerter.create_silence(
        project_id=1,
        matchers={"kind": "loss_*"},
        starts_at=clock.now,
        ends_at=clock.now + 8 * 3600,
        created_by="api:test",
        comment="",
    )
    alerter.intake([signal(run)])
    clock.advance(30)

    active = silence_db.active_silences
    raced = []

    def read_then_expire(conn: Any, project_ids: Any, now: float) -> Any:
        found = active(conn, project_ids, now)
        if not raced:
            raced.append(True)
            alerter.expire_silence(silence.id, by="api:test", project_id=1)
        return found

    monkeypatch.setattr(silence_db, "active_silences", read_then_expire)
    alerter.tick()
    monkeypatch.setattr(silence_db, "active_silences", active)
    advance_to(alerter, clock, 60, step=1)

    assert raced
    assert len(out["slack"].sent) == 1


def test_one_alert_whose_step_raises_does_not_hold_back_the_others(
    store: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A step that raises (a bug, a channel the configuration checks let through) used to
    roll the whole tick back: the broken alert stayed the most overdue and nobody was paged
    any more. It is logged once and retried; the other due alerts are messaged."""
    clock = Clock()
    out = notifiers(clock, "slack", "sms", "call", "manager")
    alerter = make_alerter(store, config(), clock, out)
    broken, fine = make_run(store, "run-a"), make_run(store, "run-b")
    real = silence_db.holding

    def holding(silences: Any, alert: Any) -> Any:
        if alert.run_id == broken:
            raise ValueError("an unusable channel (test)")
        return real(silences, alert)

    monkeypatch.setattr(silence_db, "holding", holding)
    alerter.intake([signal(broken), signal(fine)])
    with caplog.at_level(logging.ERROR, logger="runwatch.collector.alerts"):
        advance_to(alerter, clock, 60)

    assert [a.run_id for s in out["slack"].sent for a in s.message.alerts] == [fine]
    failed = [r for r in caplog.records if "its escalation step failed" in r.getMessage()]
    assert len(failed) == 1
