"""Intake: signals (anomalies, policy alerts, raised alerts) into deduplicated alerts.

Signals are grouped by fingerprint (run, kind, series). A fingerprint with an open alert
adds to its ``count`` (and, when its severity rises, routes it again); one without gets a
new alert, routed by the first matching route of the ``alerting:`` configuration and given
its escalation timer, grouped with the other alerts of its run
(:mod:`runwatch.alerting.escalation`). A signal that races a resolution or a concurrent
insert of the same fingerprint is counted in the alert that is open when it lands.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

from sqlalchemy import Connection, select, update
from sqlalchemy.exc import IntegrityError

from runwatch.alerting.config import NO_ESCALATION, AlertingConfig
from runwatch.alerting.escalation import Sibling, Timer, first_timer
from runwatch.alerting.message import SEVERITY_RANK
from runwatch.collector.storage import alerts as db
from runwatch.collector.storage.store import Store
from runwatch.collector.storage.tables import alerts, projects, runs
from runwatch.collector.telemetry import Telemetry

SYSTEM = "runwatch"
"""Who automatic transitions are by."""


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
class _Run:
    id: int
    name: str
    project_id: int
    project: str


class _Siblings:
    """The open alerts of the signals' runs, by (run, escalation), as grouping sees them;
    read on first need, since a batch of repeats (the usual case) needs none."""

    def __init__(self, conn: Connection, run_ids: set[int]) -> None:
        self._conn = conn
        self._run_ids = run_ids
        self._found: dict[tuple[int, str], list[Sibling]] | None = None

    def of(self, run_id: int, escalation: str) -> list[Sibling]:
        """The list itself: a new alert of the batch is appended to it."""
        if self._found is None:
            self._found = {}
            for a in db.open_alerts_of_runs(self._conn, sorted(self._run_ids)):
                if a.escalation is not None:
                    self._found.setdefault((a.run_id, a.escalation), []).append(
                        Sibling(
                            a.esc_round,
                            a.esc_step,
                            a.next_at,
                            a.notified_at,
                            a.silenced_by is not None,
                        )
                    )
        return self._found.setdefault((run_id, escalation), [])


class Intake:
    """Records signals as alerts; called from any thread (each call is one transaction)."""

    def __init__(
        self,
        store: Store,
        config: AlertingConfig,
        telemetry: Telemetry,
        clock: Callable[[], float],
    ) -> None:
        self.store = store
        self.config = config
        self.telemetry = telemetry
        self.clock = clock

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
            siblings = _Siblings(conn, {s.run_id for s in signals if s.run_id in known})
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

    def _refire(
        self,
        conn: Connection,
        alert: db.AlertRecord,
        run: _Run,
        group: list[Signal],
        siblings: _Siblings,
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
        siblings: _Siblings,
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
            timer = first_timer(self.config, escalation, now, siblings.of(run.id, name))
            values |= {
                "escalation": name,
                "esc_round": timer.esc_round,
                "esc_step": timer.esc_step,
                "base_at": timer.base_at,
                "next_at": timer.next_at,
            }
            siblings.of(run.id, name).append(Sibling(0, 0, timer.next_at, None))
        return f"{route_name}: escalation {alert.escalation or NO_ESCALATION} -> {name}"

    def _new(
        self,
        conn: Connection,
        run: _Run,
        fp: str,
        group: list[Signal],
        siblings: _Siblings,
        now: float,
    ) -> int:
        first, last = group[0], group[-1]
        severity = max((s.severity for s in group), key=SEVERITY_RANK.__getitem__)
        route_name, route = self.config.route(run.project, severity, first.kind, first.key)
        name = NO_ESCALATION if route is None else route.escalation
        escalation = None if name == NO_ESCALATION else self.config.escalations[name]
        timer = Timer(0, 0, None, None)
        if escalation is not None:
            timer = first_timer(self.config, escalation, now, siblings.of(run.id, name))
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
            siblings.of(run.id, name).append(Sibling(0, 0, timer.next_at, None))
        self.telemetry.alerts.labels(severity).inc()
        return alert_id


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
