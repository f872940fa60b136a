"""The alert dispatcher: anomalies in, deduplicated alerts, escalation timers, messages out.

Stages, in the spirit of Alertmanager's pipeline (see DESIGN.md, "Data flow" 5):

1. **Intake** (:meth:`Alerter.on_anomalies` from the detection thread, :meth:`raise_alert`
   from the policy engine and the API). Signals are deduplicated by fingerprint (run, kind,
   series): a detector firing every step adds to one alert's ``count``. A new alert is
   routed (the first matching route of the ``alerting:`` configuration picks its escalation
   policy) and gets its timer (grouped with the other alerts of its run; see
   :mod:`runwatch.alerting.escalation`).
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
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

from sqlalchemy import Connection, exists, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError

from runwatch.alerting.config import NO_ESCALATION, AlertingConfig
from runwatch.alerting.escalation import Sibling, Timer, after_step, event_of, first_timer, rebased
from runwatch.alerting.message import SEVERITY_RANK
from runwatch.alerting.notifiers.base import Notifier
from runwatch.alerting.silence import check_matchers, silence_matches
from runwatch.collector.delivery import Deliverer
from runwatch.collector.errors import Conflict, InvalidInput, NotFound
from runwatch.collector.storage import alerts as db
from runwatch.collector.storage.anomalies import Found
from runwatch.collector.storage.store import Store
from runwatch.collector.storage.tables import alerts, projects, runs
from runwatch.collector.storage.tables import silences as silence_rows
from runwatch.collector.telemetry import Telemetry

log = logging.getLogger("runwatch.collector.alerts")

MAX_DUE = 1000
"""Alerts one tick acts on; the rest wait for the next tick (a second later)."""
SYSTEM = "runwatch"
"""Who automatic transitions are by."""
RECEIPT_SECONDS = 3600.0
"""Receipts of signed requests kept for replay checks: longer than Slack's 5-minute window
and than any phone call."""


class Replayed(Exception):
    """A signed request (a Slack click, a keypress) that was received before."""


@dataclass(frozen=True, slots=True)
class Signal:
    """One firing of an alert condition."""

    run_id: int
    kind: str
    key: str
    severity: str
    summary: str
    source: str
    step: int | None = None


@dataclass(frozen=True, slots=True)
class _Message:
    """What makes one message: alerts of one run, to one target, at one step."""

    project_id: int
    run_id: int
    channel: str
    target: str
    event: str
    step: int | None


@dataclass(frozen=True, slots=True)
class _Run:
    id: int
    name: str
    project_id: int
    project: str


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

    def intake(self, signals: Sequence[Signal]) -> list[int]:
        """Record signals; the ids of the alerts they went into, in order of first signal."""
        if not signals:
            return []
        now = self.clock()
        grouped: dict[str, list[Signal]] = {}
        for s in signals:
            grouped.setdefault(db.fingerprint(s.run_id, s.kind, s.key), []).append(s)
        ids: list[int] = []
        with self.store.write() as conn:
            known = _runs(conn, {s.run_id for s in signals})
            existing = db.open_alerts_by_fingerprint(conn, list(grouped))
            siblings = self._siblings(conn, {s.run_id for s in signals if s.run_id in known})
            for fp, group in grouped.items():
                run = known.get(group[0].run_id)
                if run is None:
                    continue
                found = existing.get(fp)
                if found is not None and self._refire(conn, found, run, group, siblings, now):
                    ids.append(found.id)
                else:  # new, or resolved since it was read: a new alert
                    ids.append(self._new(conn, run, fp, group, siblings, now))
        self.telemetry.alert_signals.inc(len(signals))
        return ids

    def _siblings(
        self, conn: Connection, run_ids: set[int]
    ) -> dict[tuple[int, str], list[Sibling]]:
        found: dict[tuple[int, str], list[Sibling]] = {}
        for a in db.open_alerts_of_runs(conn, sorted(run_ids)):
            if a.escalation is not None:
                found.setdefault((a.run_id, a.escalation), []).append(
                    Sibling(
                        a.esc_round, a.esc_step, a.next_at, a.notified_at, a.silenced_by is not None
                    )
                )
        return found

    def _refire(
        self,
        conn: Connection,
        alert: db.AlertRecord,
        run: _Run,
        group: list[Signal],
        siblings: dict[tuple[int, str], list[Sibling]],
        now: float,
    ) -> bool:
        """Count ``group`` into an open alert; False when it is not open any more."""
        severity = max((s.severity for s in group), key=SEVERITY_RANK.__getitem__)
        raised = SEVERITY_RANK[severity] > SEVERITY_RANK[alert.severity]
        steps = [s.step for s in group if s.step is not None]
        values: dict[str, object] = {"count": alerts.c.count + len(group), "last_seen_at": now}
        if steps:
            known = [s for s in (alert.first_step, alert.last_step) if s is not None]
            values["first_step"] = min(steps + known)
            values["last_step"] = max(steps + known)
        if alert.resolve_after is not None:
            values["resolve_at"] = now + alert.resolve_after
        rerouted = None
        if raised:
            values |= {"severity": severity, "summary": group[-1].summary[: db.MAX_SUMMARY_LENGTH]}
            if alert.state == "firing":
                rerouted = self._reroute(alert, run, severity, siblings, now, values)
        done = conn.execute(
            update(alerts)
            .where(alerts.c.id == alert.id, alerts.c.state.in_(db.OPEN_ALERT_STATES))
            .values(**values)
        ).rowcount
        if not done:
            return False
        if raised:
            db.add_event(conn, alert.id, now, "severity", group[-1].source, severity)
        if rerouted is not None:
            db.add_event(conn, alert.id, now, "rerouted", SYSTEM, rerouted)
        return True

    def _reroute(
        self,
        alert: db.AlertRecord,
        run: _Run,
        severity: str,
        siblings: dict[tuple[int, str], list[Sibling]],
        now: float,
        values: dict[str, object],
    ) -> str | None:
        """A firing alert whose severity rose: routed again; a new escalation starts over.
        Returns what changed, for the event log; None when the route keeps its escalation."""
        route_name, route = self.config.route(run.project, severity, alert.kind, alert.key)
        name = NO_ESCALATION if route is None else route.escalation
        if name == (alert.escalation or NO_ESCALATION):
            if alert.silenced_by is not None:
                values["next_at"] = now  # the silence may not match it any more: look again
            return None
        values |= {"route": route_name, "escalation": None, "next_at": None, "silenced_by": None}
        if name != NO_ESCALATION:
            escalation = self.config.escalations[name]
            timer = first_timer(self.config, escalation, now, siblings.get((run.id, name), []))
            values |= {
                "escalation": name,
                "esc_round": timer.esc_round,
                "esc_step": timer.esc_step,
                "base_at": timer.base_at,
                "next_at": timer.next_at,
            }
            siblings.setdefault((run.id, name), []).append(Sibling(0, 0, timer.next_at, None))
        return f"{route_name}: escalation {alert.escalation or NO_ESCALATION} -> {name}"

    def _new(
        self,
        conn: Connection,
        run: _Run,
        fp: str,
        group: list[Signal],
        siblings: dict[tuple[int, str], list[Sibling]],
        now: float,
    ) -> int:
        first, last = group[0], group[-1]
        severity = max((s.severity for s in group), key=SEVERITY_RANK.__getitem__)
        route_name, route = self.config.route(run.project, severity, first.kind, first.key)
        name = NO_ESCALATION if route is None else route.escalation
        escalation = None if name == NO_ESCALATION else self.config.escalations[name]
        timer = Timer(0, 0, None, None)
        if escalation is not None:
            timer = first_timer(self.config, escalation, now, siblings.get((run.id, name), []))
        steps = [s.step for s in group if s.step is not None]
        new = db.NewAlert(
            project_id=run.project_id,
            run_id=run.id,
            fingerprint=fp,
            kind=first.kind,
            key=first.key,
            severity=severity,
            summary=last.summary,
            source=first.source,
            count=len(group),
            first_seen_at=now,
            last_seen_at=now,
            first_step=min(steps) if steps else None,
            last_step=max(steps) if steps else None,
            route=route_name,
            escalation=None if escalation is None else name,
            base_at=timer.base_at,
            next_at=timer.next_at,
            resolve_after=self.config.resolve_after_of(route),
        )
        try:
            # PostgreSQL: another writer may open the same fingerprint meanwhile (SQLite
            # writers take turns); a savepoint keeps this transaction usable if it did.
            with conn.begin_nested() if self.store.dialect == "postgresql" else nullcontext():
                alert_id = db.insert_alert(conn, new, now)
        except IntegrityError:
            found = db.open_alerts_by_fingerprint(conn, [fp]).get(fp)
            if found is None or not self._refire(conn, found, run, group, siblings, now):
                raise
            return found.id
        if escalation is not None:
            siblings.setdefault((run.id, name), []).append(Sibling(0, 0, timer.next_at, None))
        self.telemetry.alerts.labels(severity).inc()
        return alert_id

    # -- the timer ----------------------------------------------------------------------

    def tick(self) -> None:
        """Resolve quiet alerts, take the escalation steps that are due."""
        now = self.clock()
        with self.store.write() as conn:
            db.release_expired_leases(conn, now)
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
        silences = db.active_silences(conn, {a.project_id for a in due}, now)
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
        silences: list[db.SilenceRecord],
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
        holding = [
            s
            for s in silences
            if s.project_id == alert.project_id
            and silence_matches(
                s.matchers,
                run=alert.run_name,
                run_id=alert.run_id,
                kind=alert.kind,
                key=alert.key,
                severity=alert.severity,
            )
        ]
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
                if not db.first_receipt(conn, *receipt, now):
                    raise Replayed
                db.forget_receipts(conn, now - RECEIPT_SECONDS)
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
            if changed:
                self._tell(conn, db.get_alerts(conn, changed), to, now)
            result = db.get_alerts(conn, list(found))
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
            for channel, target in db.reached(conn, alert.id):
                config = self.config.channels.get(channel)
                if config is not None and config.tells_state():
                    key = _Message(alert.project_id, alert.run_id, channel, target, event, None)
                    outbox.setdefault(key, []).append(alert.id)
        self._write(conn, outbox, now)

    def _write(self, conn: Connection, outbox: dict[_Message, list[int]], now: float) -> None:
        """One outbox row per message, naming every alert it is about."""
        for m, ids in outbox.items():
            db.insert_notification(
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
    ) -> db.SilenceRecord:
        try:
            checked = check_matchers(matchers)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        if ends_at <= starts_at:
            raise InvalidInput("a silence must end after it starts")
        now = self.clock()
        with self.store.write() as conn:
            silence = db.create_silence(
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
    ) -> db.SilenceRecord:
        """End a silence now; alerts it held take their due step at the next tick."""
        now = self.clock()
        with self.store.write() as conn:
            silence = db.expire_silence(conn, silence_id, by=by, now=now, project_id=project_id)
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


def _runs(conn: Connection, run_ids: Iterable[int]) -> dict[int, _Run]:
    ids = sorted(set(run_ids))
    if not ids:
        return {}
    rows = conn.execute(
        select(runs.c.id, runs.c.name, runs.c.project_id, projects.c.name.label("project"))
        .join(projects, projects.c.id == runs.c.project_id)
        .where(runs.c.id.in_(ids))
    )
    return {r.id: _Run(r.id, r.name, r.project_id, r.project) for r in rows}
