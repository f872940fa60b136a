"""Decisions: which commands and alerts a run's new anomalies call for, per its policy.

:meth:`PolicyEngine.on_anomalies` runs in the detection thread after a group of anomalies
was stored, and issues commands through the :class:`ControlChannel` with source
``policy:<rule name>``. What it remembers lives in the ``commands`` table, so a restarted
collector decides as the old one would have (but see *alerts* below).

**One batch, one remedy.** The rules that fire on one run's anomalies of a group are
merged by the precedence of their commands: a ``stop`` wins over everything, else one
``rollback`` wins over every other command (it restores an older state, and carries its
own LR cut), else every command type is issued once (the first rule in file order wins
for a type). So ``loss_spike`` + ``nonfinite_loss`` + ``divergence`` at once give one
rollback. The alerts of every rule that fired are raised all the same.

**A rollback on its way.** Training-signal anomalies (:data:`CURABLE_KINDS`) that a
rollback undoes cause no command: every one while a rollback of the run (by a policy or an
operator) is pending or delivered, since the trainer is still on the steps it will discard
(a single-rank trainer may apply it later than its ``at_step``), and those observed before
the latest applied rollback was acknowledged (late arrivals from the discarded steps; the
trainer's clock against the collector's). System anomalies (hang, hardware errors, ...)
are not cured by a rollback and act as usual. While a ``stop`` is pending or delivered, no
command is issued at all.

**Cooldowns** are in steps. A rule is quiet for an anomaly at step ``s`` when one of its
commands has ``at_step > s - cooldown_steps``; with ``cooldown_steps: 0`` that still keeps
anomalies before its pending command's ``at_step`` from issuing it again. Steps go back
when a rollback is applied: commands issued before the latest applied rollback belong to
the discarded timeline and cool nothing down afterwards, so a rule acts again on the
replayed steps at once. A run resumed by the supervisor from a checkpoint also goes back
in steps but leaves no rollback in the table: there, a cooldown lasts until the run
passes the old ``at_step`` plus the cooldown again.

**The rollback limit** counts the policy's rollbacks of the run that are pending,
delivered, applied or failed with ``at_step > s - within_steps`` (on every timeline: a rollback
loop replays the same steps). A rollback beyond ``max`` is replaced by ``on_limit``
(source ``policy:rollback_limit``, which cools down for ``within_steps``).

**Refusals.** :class:`Conflict` from the channel (the run is no longer running, no good
checkpoint to roll back to) runs the rule's ``otherwise`` actions; their own refusals are
logged. Every action is counted in ``runwatch_policy_actions_total{rule, action, outcome}``.

**Alerts** go to the alert dispatcher (:class:`runwatch.collector.alerts.Alerter`) as
signals of kind ``policy:<rule>`` on the series of the anomaly that caused them, with the
action's severity and message; they are deduplicated, routed and escalated like every
other alert. A rule that only alerts stores no command, so its cooldown is kept in
memory: after a restart such a rule may signal once more, which deduplication absorbs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from sqlalchemy import Connection, or_, select

from runwatch.collector.alert_intake import Signal
from runwatch.collector.alerts import Alerter
from runwatch.collector.control import ControlChannel
from runwatch.collector.errors import Conflict, NotFound
from runwatch.collector.policy.model import LIMIT_RULE, Action, Policy, Rule
from runwatch.collector.storage.anomalies import Found
from runwatch.collector.storage.checkpoints import SUSPECT_KINDS
from runwatch.collector.storage.commands import OPEN_STATES
from runwatch.collector.storage.runs import RunRecord, get_run
from runwatch.collector.storage.tables import commands
from runwatch.collector.telemetry import Telemetry
from runwatch.detectors.base import SEVERITIES

log = logging.getLogger("runwatch.collector.policy")

SOURCE_PREFIX = "policy:"
CURABLE_KINDS = frozenset(SUSPECT_KINDS)
"""Training-signal kinds, which a rollback undoes: the checkpoint registry's suspect kinds."""
PRECEDENCE = {"stop": 2, "rollback": 1}
"""Commands that exclude every other one of the same batch; the others have 0."""
COUNTED_ROLLBACK_STATES = ("pending", "delivered", "applied", "failed")
"""Rollbacks the limit counts: all that reached the trainer or may still (not expired or
cancelled ones). A failed rollback counts, so that a trainer that cannot roll back is not
asked again and again."""
MAX_REMEMBERED = 100_000
"""Alert cooldowns kept in memory; past this many the memory is cleared (never searched)."""
SEVERITY_ORDER = {severity: rank for rank, severity in enumerate(SEVERITIES)}


@dataclass(frozen=True, slots=True)
class _Past:
    """A command of the run, as far as decisions go."""

    id: int
    type: str
    source: str
    state: str
    at_step: int | None
    finished_at: float | None


@dataclass(slots=True)
class _History:
    """What the run's past commands say about a new decision."""

    boundary: _Past | None = None
    """The latest applied rollback: the start of the current timeline."""
    open_rollbacks: list[_Past] = field(default_factory=list)
    stopping: bool = False
    last_at_step: dict[str, int] = field(default_factory=dict)
    """Rule name -> the largest ``at_step`` of its commands in the current timeline."""
    policy_rollbacks: list[int] = field(default_factory=list)
    """``at_step`` of every policy rollback the limit counts (:data:`COUNTED_ROLLBACK_STATES`)."""

    @property
    def timeline(self) -> int:
        return 0 if self.boundary is None else self.boundary.id

    def undone(self, found: Found) -> bool:
        """True for a training-signal anomaly at a step a rollback undoes (or undid)."""
        if found.anomaly.kind not in CURABLE_KINDS:
            return False
        if self.open_rollbacks:
            return True
        b = self.boundary
        return b is not None and b.finished_at is not None and found.wall_time < b.finished_at


@dataclass(slots=True)
class _Firing:
    rule: Rule
    found: list[Found]
    step: int
    """The latest step among ``found``."""
    live: bool
    """Some of ``found`` may still cause commands (not undone by a rollback)."""


@dataclass(frozen=True, slots=True)
class _Planned:
    rule: str
    action: Action
    step: int
    otherwise: tuple[Action, ...] = ()


class PolicyEngine:
    """Turns stored anomalies into commands and alerts; see the module doc.

    Called from one thread (the detection pipeline's); the channel does the rest.
    """

    def __init__(
        self,
        policy: Policy,
        control: ControlChannel,
        telemetry: Telemetry,
        alerter: Alerter | None = None,
    ) -> None:
        self.policy = policy
        self.control = control
        self.telemetry = telemetry
        self.alerter = alerter
        self._alerted: dict[tuple[int, str], tuple[int, int]] = {}
        """(run, rule) -> (timeline, step after) of the last firing of a rule that only alerts."""

    def on_anomalies(self, found: list[Found]) -> None:
        """Decide for every run among ``found`` and act; never raises."""
        by_run: dict[int, list[Found]] = {}
        for f in found:
            by_run.setdefault(f.run_id, []).append(f)
        for run_id, items in by_run.items():
            try:
                self._decide(run_id, items)
            except Exception:
                self.telemetry.detection_failures.labels("policy").inc()
                log.exception(
                    "the policy could not decide on %d anomalies of run %d", len(items), run_id
                )

    def _decide(self, run_id: int, found: list[Found]) -> None:
        if not any(
            rule.matches(f.anomaly.kind, f.anomaly.severity, f.anomaly.key, None)
            for rule in self.policy.rules
            for f in found
        ):
            return  # most anomalies (throughput, memory, drift, ...) concern no rule: no query
        with self.control.store.read() as conn:
            try:
                run = get_run(conn, run_id)
            except NotFound:
                return
            if run.state != "running":
                return
            history = _history(conn, run_id, self.control.clock())
        firings = self._firings(run, history, found)
        for planned in self._commands(run_id, history, firings):
            self._issue(run, planned)
        for firing in firings:
            alerts = [a for a in firing.rule.actions if a.type == "alert"]
            for action in alerts:
                self._alert(run, firing.rule.name, action, firing.found)
            if len(alerts) == len(firing.rule.actions):
                self._remember(run_id, firing.rule.name, history, firing.step)

    def _firings(self, run: RunRecord, history: _History, found: list[Found]) -> list[_Firing]:
        """The rules that fire, in file order, with the anomalies that made them."""
        firings = []
        for rule in self.policy.rules:
            matched = [
                f
                for f in found
                if rule.matches(f.anomaly.kind, f.anomaly.severity, f.anomaly.key, run.project)
            ]
            if not matched:
                continue
            step = max(f.anomaly.step for f in matched)
            if self._cooling(run.id, rule.name, rule.cooldown_steps, step, history):
                log.debug("rule %s of run %d is cooling down at step %d", rule.name, run.id, step)
                continue
            live = not history.stopping and not all(history.undone(f) for f in matched)
            firings.append(_Firing(rule, matched, step, live))
        return firings

    def _cooling(self, run_id: int, rule: str, cooldown: int, step: int, history: _History) -> bool:
        last = history.last_at_step.get(rule)
        remembered = self._alerted.get((run_id, rule))
        if remembered is not None and remembered[0] == history.timeline:
            last = remembered[1] if last is None else max(last, remembered[1])
        return last is not None and step < last + cooldown

    def _remember(self, run_id: int, rule: str, history: _History, step: int) -> None:
        """The cooldown of a firing that stored no command: as if it had one at ``step + 1``."""
        if len(self._alerted) >= MAX_REMEMBERED:
            self._alerted.clear()
        self._alerted[run_id, rule] = (history.timeline, step + 1)

    def _commands(self, run_id: int, history: _History, firings: list[_Firing]) -> list[_Planned]:
        """The commands to issue: merged by precedence; a rollback past the limit replaced."""
        candidates = [
            _Planned(f.rule.name, action, f.step, tuple(f.rule.otherwise))
            for f in firings
            if f.live
            for action in f.rule.actions
            if action.type != "alert"
        ]
        if not candidates:
            return []
        top = max(PRECEDENCE.get(c.action.type, 0) for c in candidates)
        chosen: dict[str, _Planned] = {}
        for c in candidates:
            if PRECEDENCE.get(c.action.type, 0) == top:
                chosen.setdefault(c.action.type, c)
        rollback = chosen.get("rollback")
        if rollback is None:
            return list(chosen.values())
        limit = self.policy.limits.rollbacks
        recent = [s for s in history.policy_rollbacks if s > rollback.step - limit.within_steps]
        if len(recent) < limit.max:
            return [rollback]
        self.telemetry.policy_actions.labels(rollback.rule, "rollback", "limited").inc()
        log.warning(
            "rule %s: %d rollbacks within %d steps already; the rollback limit acts instead",
            rollback.rule,
            len(recent),
            limit.within_steps,
        )
        if self._cooling(run_id, LIMIT_RULE, limit.within_steps, rollback.step, history):
            return []
        self._remember(run_id, LIMIT_RULE, history, rollback.step)
        return [_Planned(LIMIT_RULE, a, rollback.step) for a in limit.on_limit]

    def _issue(self, run: RunRecord, planned: _Planned, *, fallback: bool = False) -> None:
        action, rule = planned.action, planned.rule
        if action.type == "alert":
            self._alert(run, rule, action, [])
            return
        try:
            self.control.issue(run.id, action.type, action.args, source=SOURCE_PREFIX + rule)
        except Conflict as exc:
            self.telemetry.policy_actions.labels(rule, action.type, "refused").inc()
            fallback_note = " (a fallback)" if fallback else ""
            log.info(
                "rule %s: %s%s refused for run %d: %s",
                rule,
                action.type,
                fallback_note,
                run.id,
                exc.message,
            )
            if not fallback:
                for other in planned.otherwise:
                    self._issue(run, _Planned(rule, other, planned.step), fallback=True)
        except Exception:
            self.telemetry.policy_actions.labels(rule, action.type, "error").inc()
            log.exception("rule %s: %s for run %d failed", rule, action.type, run.id)
        else:
            self.telemetry.policy_actions.labels(rule, action.type, "issued").inc()

    def _alert(self, run: RunRecord, rule: str, action: Action, found: Iterable[Found]) -> None:
        args = action.args
        cause = max(
            found,
            key=lambda f: (SEVERITY_ORDER.get(f.anomaly.severity, 0), f.anomaly.step),
            default=None,
        )
        because = (
            f" ({cause.anomaly.kind} at step {cause.anomaly.step}: {cause.anomaly.message})"
            if cause is not None
            else ""
        )
        summary = (args["message"] or "policy alert") + because
        log.log(
            logging.INFO if self.alerter is not None else logging.WARNING,
            "alert [%s] run %d (%s/%s), rule %s: %s",
            args["severity"],
            run.id,
            run.project,
            run.name,
            rule,
            summary,
        )
        if self.alerter is None:
            self.telemetry.policy_actions.labels(rule, "alert", "logged").inc()
            return
        try:
            # intake, not raise_alert: the engine has no use for the stored alert read back.
            self.alerter.intake(
                [
                    Signal(
                        run_id=run.id,
                        kind=f"{SOURCE_PREFIX}{rule}",
                        key="" if cause is None else cause.anomaly.key,
                        severity=args["severity"],
                        summary=summary,
                        source=SOURCE_PREFIX + rule,
                        step=None if cause is None else cause.anomaly.step,
                    )
                ]
            )
        except Exception:
            self.telemetry.policy_actions.labels(rule, "alert", "error").inc()
            log.exception("rule %s: the alert for run %d could not be raised", rule, run.id)
        else:
            self.telemetry.policy_actions.labels(rule, "alert", "raised").inc()


def _history(conn: Connection, run_id: int, now: float) -> _History:
    """The run's policy commands, rollbacks and stops, read in one query.

    An open command past its ``expires_at`` counts as expired: the channel marks it so only
    when someone next asks for the run's commands.
    """
    rows = conn.execute(
        select(
            commands.c.id,
            commands.c.type,
            commands.c.source,
            commands.c.state,
            commands.c.at_step,
            commands.c.finished_at,
            commands.c.expires_at,
        )
        .where(
            commands.c.run_id == run_id,
            or_(
                commands.c.source.startswith(SOURCE_PREFIX, autoescape=True),
                commands.c.type.in_(("rollback", "stop")),
            ),
        )
        .order_by(commands.c.id)
    )
    past = [
        _Past(
            r.id,
            r.type,
            r.source,
            "expired" if r.state in OPEN_STATES and r.expires_at <= now else r.state,
            r.at_step,
            r.finished_at,
        )
        for r in rows
    ]
    history = _History()
    for p in past:
        if p.type == "rollback" and p.state == "applied":
            history.boundary = p
    for p in past:
        policy = p.source.startswith(SOURCE_PREFIX)
        if p.state in OPEN_STATES and p.type == "rollback":
            history.open_rollbacks.append(p)
        if p.state in OPEN_STATES and p.type == "stop":
            history.stopping = True
        counted = p.type == "rollback" and p.state in COUNTED_ROLLBACK_STATES
        if policy and counted and p.at_step is not None:
            history.policy_rollbacks.append(p.at_step)
        if policy and p.id > history.timeline and p.at_step is not None:
            rule = p.source.removeprefix(SOURCE_PREFIX)
            history.last_at_step[rule] = max(history.last_at_step.get(rule, p.at_step), p.at_step)
    return history
