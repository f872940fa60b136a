"""The alert dispatcher: anomalies in, deduplicated alerts, escalation timers, messages out.

Stages, in the spirit of Alertmanager's pipeline (see DESIGN.md, "Data flow" 5):

1. **Intake** (:meth:`Alerter.on_anomalies` from the detection thread, :meth:`raise_alert`
   from the policy engine and the API; :mod:`runwatch.collector.alert_intake`). Signals are
   deduplicated by fingerprint (run, kind, series): a detector firing every step adds to
   one alert's ``count``. A new alert is routed (the first matching route of the
   ``alerting:`` configuration picks its escalation policy) and gets its timer.
2. **Tick** (:meth:`tick`, every ``tick_seconds`` in the dispatcher thread). Alerts quiet
   for their ``resolve_after`` are resolved. Firing alerts whose ``next_at`` has come take
   their next step: unless a silence holds them (then they wait for its end), the step's
   channels get one notification per (run, channel, target), written to the outbox in the
   transaction that advances the timer. Quiet rules drop paging channels for low severities.
   Both changes are compare-and-set on the alert's row: a restarted collector, or a second
   replica, finds the timer where it was left and takes each step exactly once.
3. **Delivery** (:class:`~runwatch.collector.delivery.Deliverer`): sends the outbox with
   retries, backoff and per-channel rate limits, and logs every attempt.

Acknowledging an alert (API, CLI, Slack button, phone keypress, e-mail link) clears its
timer at once, and a message still waiting in the outbox is dropped when its alerts are
all acknowledged. Channels that show state (Slack threads, webhooks, the log) are told
when an alert they were paged about is acknowledged or resolved.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, exists, select, update
from sqlalchemy.exc import DBAPIError

from runwatch.alerting.config import AlertingConfig
from runwatch.alerting.escalation import Timer, after_step, event_of, rebased
from runwatch.alerting.notifiers.base import Notifier
from runwatch.alerting.silence import check_matchers
from runwatch.collector.alert_intake import SYSTEM, Intake, Signal
from runwatch.collector.delivery import Deliverer
from runwatch.collector.errors import Conflict, InvalidInput, NotFound
from runwatch.collector.storage import alerts as db
from runwatch.collector.storage import notifications as outbox_db
from runwatch.collector.storage import silences as silence_db
from runwatch.collector.storage.anomalies import Found
from runwatch.collector.storage.store import Store
from runwatch.collector.storage.tables import alerts
from runwatch.collector.storage.tables import silences as silence_rows
from runwatch.collector.telemetry import Telemetry

log = logging.getLogger("runwatch.collector.alerts")

MAX_DUE = 1000
"""Alerts one tick acts on; the rest wait for the next tick (a second later)."""
RECEIPT_SECONDS = 3600.0
"""Receipts of signed requests kept for replay checks: longer than Slack's 5-minute window
and than any phone call."""


class Replayed(Exception):
    """A signed request (a Slack click, a keypress) that was received before."""


@dataclass(frozen=True, slots=True)
class _Message:
    """What makes one message: alerts of one run, to one target, at one step."""

    project_id: int
    run_id: int
    channel: str
    target: str
    event: str
    step: int | None


class Alerter:
    """Owns every alert's lifecycle; see the module doc. Thread-safe."""

    def __init__(
        self,
        store: Store,
        config: AlertingConfig,
        notifiers: Mapping[str, Notifier],
        telemetry: Telemetry,
        *,
        secret: str,
        public_url: str | None = None,
        clock: Callable[[], float] = time.time,
        tick_seconds: float = 1.0,
        workers: int = 4,
    ) -> None:
        self.store = store
        self.config = config
        self.telemetry = telemetry
        self.clock = clock
        self.tick_seconds = tick_seconds
        self.deliverer = Deliverer(
            store,
            config,
            notifiers,
            telemetry,
            secret=secret,
            public_url=public_url,
            clock=clock,
            workers=workers,
        )
        self._intake = Intake(store, config, telemetry, clock)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._broken: set[int] = set()
        """Alerts whose step raised, logged once each."""

    # -- intake -------------------------------------------------------------------------

    def on_anomalies(self, found: list[Found]) -> None:
        """Every stored anomaly is a signal of its own kind and series; never raises."""
        signals = [
            Signal(
                f.run_id,
                f.anomaly.kind,
                f.anomaly.key,
                f.anomaly.severity,
                f.anomaly.message,
                "detector",
                f.anomaly.step,
            )
            for f in found
        ]
        try:
            self.intake(signals)
        except Exception:
            self.telemetry.detection_failures.labels("alerts").inc()
            log.exception("could not record alerts for %d anomalies", len(signals))

    def intake(self, signals: Sequence[Signal]) -> list[int]:
        """Record signals; the ids of the alerts they went into (see ``alert_intake``)."""
        return self._intake.intake(signals)

    def raise_alert(
        self,
        *,
        run_id: int,
        kind: str,
        key: str,
        severity: str,
        summary: str,
        source: str,
        step: int | None = None,
    ) -> db.AlertRecord:
        """One signal; the alert it went into (new or deduplicated)."""
        ids = self.intake([Signal(run_id, kind, key, severity, summary, source, step)])
        if not ids:
            raise NotFound(f"unknown run {run_id}")
        with self.store.read() as conn:
            return db.get_alert(conn, ids[0])

    # -- the timer ----------------------------------------------------------------------

    def tick(self) -> None:
        """Resolve quiet alerts, take the escalation steps that are due."""
        now = self.clock()
        with self.store.write() as conn:
            outbox_db.release_expired_leases(conn, now)
            self._resolve_quiet(conn, now)
            self._escalate(conn, now)

    def _resolve_quiet(self, conn: Connection, now: float) -> None:
        rows = conn.execute(
            select(alerts.c.id, alerts.c.resolve_after)
            .where(alerts.c.resolve_at <= now, alerts.c.state.in_(db.OPEN_ALERT_STATES))
            .order_by(alerts.c.resolve_at)
            .limit(MAX_DUE)
        )
        changed = []
        for r in rows.all():
            quiet = f"quiet for {r.resolve_after:g} s"
            if db.set_state(
                conn,
                r.id,
                to="resolved",
                by=SYSTEM,
                now=now,
                expect=db.OPEN_ALERT_STATES,
                detail=quiet,
                quiet_until=now,
            ):
                changed.append(r.id)
                self.telemetry.alert_transitions.labels("resolved").inc()
        if changed:
            self._tell(conn, db.get_alerts(conn, changed), "resolved", now)

    def _escalate(self, conn: Connection, now: float) -> None:
        due = db.due_alerts(conn, now, MAX_DUE)
        if not due:
            return
        silences = silence_db.active_silences(conn, {a.project_id for a in due}, now)
        outbox: dict[_Message, list[int]] = {}
        for alert in due:
            try:
                self._step(conn, alert, silences, now, outbox)
            except DBAPIError:
                raise  # the transaction is lost: the whole tick is retried
            except Exception:  # one alert's trouble must not hold every other page back
                if alert.id not in self._broken:
                    self._broken.add(alert.id)
                    log.exception("alert %d: its escalation step failed; it is retried", alert.id)
        self._write(conn, outbox, now)

    def _step(
        self,
        conn: Connection,
        alert: db.AlertRecord,
        silences: list[silence_db.SilenceRecord],
        now: float,
        outbox: dict[_Message, list[int]],
    ) -> None:
        escalation = self.config.escalations.get(alert.escalation or "")
        if escalation is None or alert.esc_step >= len(escalation.steps):
            # The configuration changed under a running escalation: it ends here.
            log.warning(
                "alert %d: escalation %r (step %d) is not in the configuration any more",
                alert.id,
                alert.escalation,
                alert.esc_step,
            )
            self._set_timer(conn, alert, None, now=alert.notified_at, silenced_by=None)
            return
        holding = silence_db.holding(silences, alert)
        timer = Timer(alert.esc_round, alert.esc_step, alert.base_at, alert.next_at)
        if holding:
            longest = max(holding, key=lambda s: s.ends_at)
            held = Timer(timer.esc_round, timer.esc_step, timer.base_at, longest.ends_at)
            stored = self._set_timer(
                conn, alert, held, now=alert.notified_at, silenced_by=longest.id, still=now
            )
            if stored and alert.silenced_by != longest.id:
                db.add_event(
                    conn, alert.id, now, "silenced", longest.created_by, f"silence {longest.id}"
                )
            return
        if alert.silenced_by is not None:
            timer = rebased(escalation, timer, now)
        step = escalation.steps[timer.esc_step]
        event = event_of(timer)
        sent = [n for n in step.notify if not self._quiet(alert, n)]
        quiet = [n for n in step.notify if n not in sent]
        nxt = after_step(self.config, escalation, timer, now)
        # A step that reached nobody (all quiet) is no message: it must not hold the run's
        # next alerts back for a group_interval.
        notified = now if sent else alert.notified_at
        keys = [
            _Message(alert.project_id, alert.run_id, name, target, event, timer.esc_step)
            for name in sent
            for target in self.config.channels[name].targets
        ]
        if not self._set_timer(conn, alert, nxt, now=notified, silenced_by=None):
            return  # acknowledged, or stepped by another collector, since it was read
        for key in keys:
            outbox.setdefault(key, []).append(alert.id)
        detail = f"{alert.escalation} step {timer.esc_step + 1}/{len(escalation.steps)}"
        if timer.esc_round:
            detail += f", round {timer.esc_round + 1}"
        detail += f": {', '.join(sent) or 'nobody'}"
        if quiet:
            detail += f" (quiet for {alert.severity}: {', '.join(quiet)})"
        db.add_event(conn, alert.id, now, "notified", SYSTEM, detail)

    def _quiet(self, alert: db.AlertRecord, channel: str) -> bool:
        return self.config.is_quiet(alert.severity, self.config.channels[channel].type)

    def _set_timer(
        self,
        conn: Connection,
        alert: db.AlertRecord,
        timer: Timer | None,
        *,
        now: float | None,
        silenced_by: int | None,
        still: float | None = None,
    ) -> bool:
        """Compare-and-set the timer of a firing alert as it was read; with ``still``, only
        while silence ``silenced_by`` is in force then (it may have been ended meanwhile)."""
        values: dict[str, object] = {"silenced_by": silenced_by, "notified_at": now}
        if timer is None:
            values["next_at"] = None
        else:
            values |= {
                "esc_round": timer.esc_round,
                "esc_step": timer.esc_step,
                "base_at": timer.base_at,
                "next_at": timer.next_at,
            }
        query = update(alerts).where(
            alerts.c.id == alert.id,
            alerts.c.state == "firing",
            alerts.c.esc_round == alert.esc_round,
            alerts.c.esc_step == alert.esc_step,
            alerts.c.next_at == alert.next_at,
        )
        if still is not None:
            query = query.where(
                exists().where(silence_rows.c.id == silenced_by, silence_rows.c.ends_at > still)
            )
        return bool(conn.execute(query.values(**values)).rowcount)

    # -- people -------------------------------------------------------------------------

    def acknowledge(
        self,
        alert_ids: Sequence[int],
        *,
        by: str,
        project_id: int | None,
        strict: bool = True,
        receipt: tuple[str, str] | None = None,
    ) -> list[db.AlertRecord]:
        """Acknowledge firing alerts: their escalation stops now. With ``strict``, an unknown
        alert is :class:`NotFound` and a resolved one :class:`Conflict`; without (links and
        buttons acting on a message), those are skipped. ``receipt`` (provider, nonce) of a
        signed request is remembered in the same transaction: :class:`Replayed` if seen."""
        return self._transition(
            alert_ids, "acknowledged", ("firing",), by, project_id, strict, receipt
        )

    def resolve(
        self,
        alert_ids: Sequence[int],
        *,
        by: str,
        project_id: int | None,
        strict: bool = True,
        receipt: tuple[str, str] | None = None,
    ) -> list[db.AlertRecord]:
        """Resolve open alerts by hand; a resolved alert is left as it is."""
        return self._transition(
            alert_ids, "resolved", db.OPEN_ALERT_STATES, by, project_id, strict, receipt
        )

    def _transition(
        self,
        alert_ids: Sequence[int],
        to: str,
        expect: Sequence[str],
        by: str,
        project_id: int | None,
        strict: bool,
        receipt: tuple[str, str] | None,
    ) -> list[db.AlertRecord]:
        now = self.clock()
        with self.store.write() as conn:
            if receipt is not None:
                if not outbox_db.first_receipt(conn, *receipt, now):
                    raise Replayed
                outbox_db.forget_receipts(conn, now - RECEIPT_SECONDS)
            found = {
                a.id: a
                for a in db.get_alerts(conn, alert_ids)
                if project_id is None or a.project_id == project_id
            }
            missing = [i for i in alert_ids if i not in found]
            if missing and strict:
                raise NotFound(f"unknown alert {missing[0]}")
            if strict and to == "acknowledged":
                resolved = [a.id for a in found.values() if a.state == "resolved"]
                if resolved:
                    raise Conflict(f"alert {resolved[0]} is resolved already")
            changed = [
                i
                for i in found
                if found[i].state in expect
                and db.set_state(conn, i, to=to, by=by, now=now, expect=expect)
            ]
            result = db.get_alerts(conn, list(found))
            if changed:
                self._tell(conn, [a for a in result if a.id in changed], to, now)
        for a in result:
            if a.id in changed:
                log.info("alert %d %s by %s", a.id, to, by)
                self.telemetry.alert_transitions.labels(to).inc()
        return result

    def _tell(
        self, conn: Connection, changed: list[db.AlertRecord], event: str, now: float
    ) -> None:
        """State messages to the channels that paged about ``changed`` and show state."""
        outbox: dict[_Message, list[int]] = {}
        for alert in changed:
            for channel, target in outbox_db.reached(conn, alert.id):
                config = self.config.channels.get(channel)
                if config is not None and config.tells_state():
                    key = _Message(alert.project_id, alert.run_id, channel, target, event, None)
                    outbox.setdefault(key, []).append(alert.id)
        self._write(conn, outbox, now)

    def _write(self, conn: Connection, outbox: dict[_Message, list[int]], now: float) -> None:
        """One outbox row per message, naming every alert it is about."""
        for m, ids in outbox.items():
            outbox_db.insert_notification(
                conn,
                project_id=m.project_id,
                run_id=m.run_id,
                channel=m.channel,
                channel_type=self.config.channels[m.channel].type,
                target=m.target,
                event=m.event,
                esc_step=m.step,
                alert_ids=ids,
                now=now,
            )

    def create_silence(
        self,
        *,
        project_id: int,
        matchers: Mapping[str, str | int],
        starts_at: float,
        ends_at: float,
        created_by: str,
        comment: str,
    ) -> silence_db.SilenceRecord:
        try:
            checked = check_matchers(matchers)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        if ends_at <= starts_at:
            raise InvalidInput("a silence must end after it starts")
        now = self.clock()
        with self.store.write() as conn:
            silence = silence_db.create_silence(
                conn,
                project_id=project_id,
                matchers=checked,
                starts_at=starts_at,
                ends_at=ends_at,
                created_by=created_by,
                comment=comment,
                now=now,
            )
        log.info(
            "silence %d created by %s until %.0f: %s", silence.id, created_by, ends_at, checked
        )
        return silence

    def expire_silence(
        self, silence_id: int, *, by: str, project_id: int | None
    ) -> silence_db.SilenceRecord:
        """End a silence now; alerts it held take their due step at the next tick."""
        now = self.clock()
        with self.store.write() as conn:
            silence = silence_db.expire_silence(
                conn, silence_id, by=by, now=now, project_id=project_id
            )
            # Held alerts wait for the silence's old end: wake them now.
            conn.execute(
                update(alerts)
                .where(alerts.c.silenced_by == silence_id, alerts.c.state == "firing")
                .values(next_at=now)
            )
        return silence

    # -- the thread ---------------------------------------------------------------------

    def run_once(self, *, wait: bool = True) -> None:
        """One tick and one delivery round (the thread's loop body; tests call it directly)."""
        self.tick()
        self.deliverer.deliver(wait=wait)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="runwatch-alerts", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.tick_seconds):
            try:
                self.run_once(wait=False)
            except Exception:
                self.telemetry.detection_failures.labels("alerts").inc()
                log.exception("the alert dispatcher's round failed; the next one retries")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.deliverer.close()
