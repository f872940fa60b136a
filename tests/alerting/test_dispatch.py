"""The dispatcher on a clock moved by hand: dedup, grouping, escalation, acks, silences,
retries, restarts and floods, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from runwatch.collector.errors import Conflict, InvalidInput, NotFound
from runwatch.collector.storage import alerts as db
from runwatch.collector.storage import notifications as outbox_db
from runwatch.collector.storage import silences as silence_db
from runwatch.collector.storage.store import Store
from runwatch.collector.storage.tables import notifications
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


def test_an_unacknowledged_alert_escalates_step_by_step_on_time(store: Store) -> None:
    clock = Clock()
    out = notifiers(clock, "slack", "sms", "call", "manager")
    alerter = make_alerter(store, config(), clock, out)
    run = make_run(store)
    start = clock.now
    alerter.intake([signal(run)])

    advance_to(alerter, clock, 2 * 3600)

    sent = {name: [s.at - start for s in n.sent] for name, n in out.items()}
    # group_wait 30 s, then 5, 15 and 30 min after the first message; then the policy stops.
    assert sent == {"slack": [30.0], "sms": [330.0], "call": [930.0], "manager": [1830.0]}
    assert [n.sent[0].target for n in out.values()] == [
        "#train-alerts",
        "sms oncall",
        "call oncall",
        "call manager",
    ]
    events = [n.sent[0].message.event for n in out.values()]
    assert events == ["firing", "escalated", "escalated", "escalated"]
    with store.read() as conn:
        (alert,) = db.list_alerts(conn, db.AlertFilter())
        steps = [e.detail for e in db.events_of(conn, alert.id) if e.type == "notified"]
    assert alert.state == "firing" and alert.next_at is None
    assert steps == [
        "page step 1/4: slack",
        "page step 2/4: sms",
        "page step 3/4: call",
        "page step 4/4: manager",
    ]


def test_a_policy_that_repeats_starts_over_after_the_repeat_interval(store: Store) -> None:
    clock = Clock()
    out = notifiers(clock, "slack", "sms", "call", "manager")
    cfg = config(repeat_interval="1h")
    cfg["escalations"]["page"]["then"] = "repeat"
    alerter = make_alerter(store, cfg, clock, out)
    start = clock.now
    alerter.intake([signal(make_run(store))])

    advance_to(alerter, clock, 4 * 3600)

    # Round 2 starts an hour after round 1's last step (30 s + 30 min).
    round_2 = 30 + 1800 + 3600
    assert [s.at - start for s in out["slack"].sent][:2] == [30.0, round_2]
    assert [s.message.event for s in out["slack"].sent][:2] == ["firing", "repeat"]
    assert [s.at - start for s in out["sms"].sent][:2] == [330.0, round_2 + 300]


@pytest.mark.parametrize("when", [0.0, 31.0, 340.0], ids=["waiting", "after-slack", "after-sms"])
def test_an_acknowledgement_stops_the_escalation_at_once(store: Store, when: float) -> None:
    clock = Clock()
    out = notifiers(clock, "slack", "sms", "call", "manager")
    alerter = make_alerter(store, config(), clock, out)
    alerter.intake([signal(make_run(store))])
    advance_to(alerter, clock, when, step=1)
    before = {name: len(n.sent) for name, n in out.items()}

    (alert,) = alerter.acknowledge([1], by="api:test", project_id=None)
    advance_to(alerter, clock, 3 * 3600)

    assert alert.state == "acknowledged" and alert.acknowledged_by == "api:test"
    paged = {
        name: [s for s in n.sent if s.message.event != "acknowledged"] for name, n in out.items()
    }
    assert {name: len(s) for name, s in paged.items()} == before
    # Every channel that paged about it (consoles show state) hears it was acknowledged.
    told = [
        name for name, n in out.items() if any(s.message.event == "acknowledged" for s in n.sent)
    ]
    assert told == [name for name, count in before.items() if count]


def test_a_page_waiting_in_the_outbox_is_dropped_when_its_alert_is_acknowledged(
    store: Store,
) -> None:
    clock = Clock()
    out = notifiers(clock, "slack", "sms", "call", "manager")
    alerter = make_alerter(store, config(), clock, out)
    alerter.intake([signal(make_run(store))])
    clock.advance(30)
    alerter.tick()  # the Slack message is written to the outbox, not yet sent
    alerter.acknowledge([1], by="api:test", project_id=None)
    alerter.deliverer.deliver()

    assert out["slack"].sent == []
    with store.read() as conn:
        (n,) = outbox_db.notifications_of(conn, 1)
    assert n.state == "cancelled" and "acknowledged" in (n.last_error or "")


def test_a_detector_firing_1000_times_makes_one_alert_and_one_message(store: Store) -> None:
    clock = Clock()
    out = notifiers(clock, "slack", "sms", "call", "manager")
    alerter = make_alerter(store, config(), clock, out)
    run = make_run(store)
    for step in range(1000):
        alerter.intake([signal(run, step=step)])
        clock.advance(0.1)
    advance_to(alerter, clock, 60)

    with store.read() as conn:
        alerts = db.list_alerts(conn, db.AlertFilter())
    assert len(alerts) == 1
    assert (alerts[0].count, alerts[0].first_step, alerts[0].last_step) == (1000, 0, 999)
    assert len(out["slack"].sent) == 1
    assert out["slack"].sent[0].message.alerts[0].count == 1000


def test_alerts_of_one_run_are_grouped_into_one_message(store: Store) -> None:
    clock = Clock()
    out = notifiers(clock, "slack", "sms", "call", "manager")
    alerter = make_alerter(store, config(), clock, out)
    run, other = make_run(store, "run-1"), make_run(store, "run-2")
    alerter.intake([signal(run, "loss_spike")])
    clock.advance(10)
    alerter.intake([signal(run, "grad_norm_spike", key="train/grad_norm"), signal(other)])
    clock.advance(10)
    alerter.intake([signal(run, "divergence")])
    advance_to(alerter, clock, 60)

    by_run = sorted(
        (s.message.alerts[0].run_id, sorted(a.kind for a in s.message.alerts))
        for s in out["slack"].sent
    )
    assert by_run == [
        (run, ["divergence", "grad_norm_spike", "loss_spike"]),
        (other, ["loss_spike"]),
    ]


def test_an_alert_after_a_message_waits_for_the_group_interval(store: Store) -> None:
    clock = Clock()
    out = notifiers(clock, "slack", "sms", "call", "manager")
    alerter = make_alerter(store, config(group_interval="5m"), clock, out)
    run = make_run(store)
    start = clock.now
    alerter.intake([signal(run, "loss_spike")])
    advance_to(alerter, clock, 60, step=1)
    alerter.intake([signal(run, "divergence")])
    advance_to(alerter, clock, 400, step=1)

    firsts = [(s.at - start, [a.kind for a in s.message.alerts]) for s in out["slack"].sent]
    assert firsts == [(30.0, ["loss_spike"]), (330.0, ["divergence"])]


def test_a_channel_that_keeps_failing_is_retried_then_the_next_step_still_fires(
    store: Store,
) -> None:
    clock = Clock()
    out = notifiers(clock, "slack", "sms", "call", "manager")
    out["slack"].failures = 10**6
    cfg = config()
    cfg["channels"]["slack"] |= {"retries": 3, "backoff": "10s"}
    alerter = make_alerter(store, cfg, clock, out)
    start = clock.now
    alerter.intake([signal(make_run(store))])
    advance_to(alerter, clock, 400, step=1)

    assert out["slack"].tries == 4 and out["slack"].sent == []
    assert [s.at - start for s in out["sms"].sent] == [330.0]
    with store.read() as conn:
        slack, sms = outbox_db.notifications_of(conn, 1)
    assert (slack.state, slack.attempts, sms.state) == ("failed", 4, "sent")
    # Backoff doubles: attempts at 30, 40, 60 and 100 s.
    assert [round(a.at - start) for a in slack.log] == [30, 40, 60, 100]
    assert all(a.status == "failed" and "provider down" in (a.error or "") for a in slack.log)


def test_an_error_that_retrying_cannot_help_is_not_retried(store: Store) -> None:
    clock = Clock()
    out = notifiers(clock, "slack", "sms", "call", "manager")
    out["slack"].failures, out["slack"].retryable = 1, False
    alerter = make_alerter(store, config(), clock, out)
    alerter.intake([signal(make_run(store))])
    advance_to(alerter, clock, 120, step=1)

    assert out["slack"].tries == 1
    with store.read() as conn:
        (slack,) = outbox_db.notifications_of(conn, 1)
    assert (slack.state, slack.attempts) == ("failed", 1)


def test_a_restarted_collector_goes_on_where_the_old_one_stopped(store: Store) -> None:
    clock = Clock()
    before = notifiers(clock, "slack", "sms", "call", "manager")
    first = make_alerter(store, config(), clock, before)
    start = clock.now
    first.intake([signal(make_run(store))])
    advance_to(first, clock, 400, step=1)  # Slack at 30 s, the text at 330 s
    first.close()

    clock.advance(20 * MIN)  # down for 20 minutes: the call (930 s) came due meanwhile
    after = notifiers(clock, "slack", "sms", "call", "manager")
    second = make_alerter(store, config(), clock, after)
    second.run_once()
    second.run_once()  # a second look at the same moment sends nothing twice
    advance_to(second, clock, 3600, step=1)

    assert [len(n.sent) for n in before.values()] == [1, 1, 0, 0]
    assert [len(n.sent) for n in after.values()] == [0, 0, 1, 1]
    assert after["call"].sent[0].at - start == 400 + 20 * MIN  # at once when back
    assert after["manager"].sent[0].at - start == 1830.0


def test_a_notification_lost_with_its_worker_is_sent_again_after_its_lease(store: Store) -> None:
    clock = Clock()
    out = notifiers(clock, "slack", "sms", "call", "manager")
    alerter = make_alerter(store, config(), clock, out)
    alerter.intake([signal(make_run(store))])
    clock.advance(30)
    alerter.tick()
    with store.write() as conn:  # a worker claimed it and died
        (n,) = outbox_db.due_notifications(conn, clock.now, 10)
        assert outbox_db.claim_notification(conn, n.id, clock.now + 120)
    alerter.run_once()
    assert out["slack"].sent == []
    clock.advance(121)
    alerter.run_once()
    assert len(out["slack"].sent) == 1


def test_silences_hold_messages_back_and_keep_the_record(store: Store) -> None:
    clock = Clock()
    out = notifiers(clock, "slack", "sms", "call", "manager")
    alerter = make_alerter(store, config(), clock, out)
    run, other = make_run(store, "run-1"), make_run(store, "run-2")
    silence = alerter.create_silence(
        project_id=1,
        matchers={"run": "run-1", "kind": "loss_*"},
        starts_at=clock.now,
        ends_at=clock.now + 3600,
        created_by="api:test",
        comment="known bad shard",
    )
    assert silence.active(clock.now)
    for step in range(5):
        alerter.intake([signal(run, step=step), signal(other, step=step)])
    advance_to(alerter, clock, 1800, step=5)

    paged_runs = {a.run_id for s in out["slack"].sent for a in s.message.alerts}
    assert paged_runs == {other}
    with store.read() as conn:
        held = db.list_alerts(conn, db.AlertFilter(run_id=run))[0]
        events = [e.type for e in db.events_of(conn, held.id)]
    assert (held.state, held.count, held.silenced_by) == ("firing", 5, silence.id)
    assert events == ["fired", "silenced"]

    alerter.expire_silence(silence.id, by="api:test", project_id=1)
    advance_to(alerter, clock, 10, step=1)
    assert [a.run_id for a in out["slack"].sent[-1].message.alerts] == [run]
    # The rest of its escalation keeps its spacing from the end of the silence.
    sms_before = len(out["sms"].sent)
    advance_to(alerter, clock, 310, step=1)
    assert len(out["sms"].sent) == sms_before + 1


def test_a_silence_needs_matchers_and_an_end_after_its_start(store: Store) -> None:
    clock = Clock()
    alerter = make_alerter(store, config(), clock, notifiers(clock, "slack"))
    make_run(store)
    for matchers, ends in (({}, 60), ({"colour": "red"}, 60), ({"kind": "x"}, 0)):
        with pytest.raises(InvalidInput):
            alerter.create_silence(
                project_id=1,
                matchers=matchers,
                starts_at=clock.now,
                ends_at=clock.now + ends,
                created_by="t",
                comment="",
            )
    with store.read() as conn:
        assert silence_db.list_silences(conn, project_id=None, now=clock.now) == []


def test_quiet_rules_keep_low_severities_off_paging_channels(store: Store) -> None:
    clock = Clock()
    out = notifiers(clock, "log", "sms")
    cfg = {
        "group_wait": 0,
        "channels": {"log": {"type": "console"}, "sms": {"type": "sms", "to": "+15550100"}},
        "escalations": {"both": {"steps": [{"notify": ["log", "sms"]}]}},
        "routes": [{"escalation": "both"}],
        "quiet": {"info": ["sms", "call"]},
    }
    alerter = make_alerter(store, cfg, clock, out)
    run = make_run(store)
    alerter.intake([signal(run, "dead_units", severity="info")])
    alerter.intake([signal(run, "divergence", severity="critical")])
    advance_to(alerter, clock, 5, step=1)

    assert sorted(a.kind for s in out["log"].sent for a in s.message.alerts) == [
        "dead_units",
        "divergence",
    ]
    assert [a.kind for s in out["sms"].sent for a in s.message.alerts] == ["divergence"]
    assert out["sms"].sent[0].target == "+15550100"


def test_routes_pick_the_first_match_and_none_records_only(store: Store) -> None:
    clock = Clock()
    out = notifiers(clock, "slack", "sms", "call", "manager")
    cfg = config()
    cfg["routes"] = [
        {"kinds": ["throughput_*"], "escalation": "none"},
        {"projects": ["llm"], "severities": ["critical"], "escalation": "page"},
    ]
    alerter = make_alerter(store, cfg, clock, out)
    run = make_run(store)
    alerter.intake(
        [
            signal(run, "throughput_drop", severity="critical"),
            signal(run, "loss_spike", severity="warning"),  # matches no route
            signal(run, "divergence", severity="critical"),
        ]
    )
    advance_to(alerter, clock, 60)

    with store.read() as conn:
        routed = {a.kind: (a.route, a.escalation) for a in db.list_alerts(conn, db.AlertFilter())}
    assert routed == {
        "throughput_drop": ("routes[0]", None),
        "loss_spike": ("none", None),
        "divergence": ("routes[1]", "page"),
    }
    assert [[a.kind for a in s.message.alerts] for s in out["slack"].sent] == [["divergence"]]


def test_a_quiet_alert_resolves_itself_and_a_new_firing_is_a_new_alert(store: Store) -> None:
    clock = Clock()
    out = notifiers(clock, "slack", "sms", "call", "manager")
    alerter = make_alerter(store, config(resolve_after="10m"), clock, out)
    run = make_run(store)
    alerter.intake([signal(run)])
    advance_to(alerter, clock, 9 * MIN)
    alerter.intake([signal(run)])  # fired again: the quiet time starts over
    advance_to(alerter, clock, 9 * MIN)
    with store.read() as conn:
        assert db.get_alert(conn, 1).state == "firing"
    advance_to(alerter, clock, 2 * MIN)

    with store.read() as conn:
        first = db.get_alert(conn, 1)
    assert (first.state, first.resolved_by) == ("resolved", "runwatch")
    assert [s.message.event for s in out["slack"].sent] == ["firing", "resolved"]
    alerter.intake([signal(run)])
    with store.read() as conn:
        assert [a.id for a in db.list_alerts(conn, db.AlertFilter(state="firing"))] == [2]


def test_acknowledging_checks_what_it_is_given(store: Store) -> None:
    clock = Clock()
    alerter = make_alerter(store, config(), clock, notifiers(clock, "slack"))
    alerter.intake([signal(make_run(store))])
    with pytest.raises(NotFound):
        alerter.acknowledge([1, 99], by="api:t", project_id=None)
    with pytest.raises(NotFound):  # another project's alert looks unknown
        alerter.acknowledge([1], by="api:t", project_id=2)
    alerter.resolve([1], by="api:t", project_id=1)
    with pytest.raises(Conflict):
        alerter.acknowledge([1], by="api:t", project_id=1)
    # A link or a button acting on a message skips what is gone or over.
    assert [
        a.state for a in alerter.acknowledge([1, 99], by="x", project_id=None, strict=False)
    ] == ["resolved"]
    # Acknowledging twice changes nothing the second time.
    alerter.intake([signal(1, "divergence")])
    first = alerter.acknowledge([2], by="api:a", project_id=None)
    again = alerter.acknowledge([2], by="api:b", project_id=None)
    assert first[0].acknowledged_by == again[0].acknowledged_by == "api:a"


def test_a_rate_limited_channel_defers_messages_and_loses_none(store: Store) -> None:
    clock = Clock()
    out = notifiers(clock, "slack", "sms", "call", "manager")
    cfg = config()
    cfg["channels"]["slack"]["rate_limit"] = "2/1m"
    alerter = make_alerter(store, cfg, clock, out)
    for i in range(5):
        alerter.intake([signal(make_run(store, f"run-{i}"))])
    advance_to(alerter, clock, 31, step=1)
    assert len(out["slack"].sent) == 2
    advance_to(alerter, clock, 90, step=1)
    assert len(out["slack"].sent) == 5
    assert len({s.message.alerts[0].run_id for s in out["slack"].sent}) == 5


def test_a_flood_of_10000_anomalies_across_100_runs_sends_a_bounded_number_of_messages(
    store: Store,
) -> None:
    clock = Clock()
    out = notifiers(clock, "slack", "sms", "call", "manager")
    alerter = make_alerter(store, config(), clock, out)
    run_ids = [make_run(store, f"run-{i}") for i in range(100)]
    kinds = ("loss_spike", "grad_norm_spike", "divergence", "throughput_drop", "hang")
    for wave in range(10):  # 10 waves of 1,000 anomalies, 5 s apart
        alerter.intake(
            [
                signal(run_ids[i % 100], kinds[(i // 100) % 5], key=f"k{i % 2}", step=wave)
                for i in range(1000)
            ]
        )
        clock.advance(5)
        alerter.run_once()
    advance_to(alerter, clock, 400, step=5)

    with store.read() as conn:
        alerts = db.list_alerts(conn, db.AlertFilter(limit=1000))
        total = conn.execute(select(func.count()).select_from(notifications)).scalar_one()
    assert len(alerts) == 500  # 5 kinds on one series in each run
    assert sum(a.count for a in alerts) == 10_000
    # One message per run for each step taken: 100 for Slack, 100 for the text.
    assert len(out["slack"].sent) == 100 and len(out["sms"].sent) == 100
    assert total == 200
    assert all(len({a.run_id for a in s.message.alerts}) == 1 for s in out["slack"].sent)
