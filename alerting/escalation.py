"""When an alert's next message goes out: the escalation timer as pure functions.

An alert's timer is four numbers stored on its row: the round (0, then 1, 2, ... when a
policy ends with ``then: repeat``), the next step of that round, the round's start
``base_at`` (step *k* is due at ``base_at + steps[k].after``) and ``next_at``, the time the
dispatcher acts next (None: nothing more to do).

*Grouping* (Alertmanager's ``group_wait``/``group_interval``, per run and escalation): the
first alert of a run waits ``group_wait`` for others to join its first message; one that
fires while another alert of the run waits joins it; one that fires soon after a message
about the run waits until ``group_interval`` after that message. So a fault that trips five
detectors at once sends one message, not five.
"""

from __future__ import annotations

from dataclasses import dataclass

from runwatch.alerting.config import AlertingConfig, Escalation


@dataclass(frozen=True, slots=True)
class Timer:
    esc_round: int
    esc_step: int
    base_at: float | None
    next_at: float | None


@dataclass(frozen=True, slots=True)
class Sibling:
    """Another open alert of the same run and escalation, as grouping sees it."""

    esc_round: int
    esc_step: int
    next_at: float | None
    notified_at: float | None
    held: bool = False
    """A silence holds it: its ``next_at`` is the silence's end, no message to join."""


def first_timer(
    config: AlertingConfig, escalation: Escalation, now: float, siblings: list[Sibling]
) -> Timer:
    """The timer of a new alert of a run whose other open alerts are ``siblings``."""
    waiting = [
        s.next_at
        for s in siblings
        if s.esc_round == 0 and s.esc_step == 0 and s.next_at is not None and not s.held
    ]
    if waiting:
        start = min(waiting)
    else:
        last = max((s.notified_at for s in siblings if s.notified_at is not None), default=None)
        if last is not None and now < last + config.group_interval:
            start = last + config.group_interval
        else:
            start = now + config.group_wait
    first = escalation.steps[0].after
    return Timer(0, 0, start - first, start)


def after_step(config: AlertingConfig, escalation: Escalation, timer: Timer, now: float) -> Timer:
    """The timer once step ``timer.esc_step`` has gone out at ``now``."""
    assert timer.base_at is not None
    step = timer.esc_step + 1
    if step < len(escalation.steps):
        return Timer(
            timer.esc_round, step, timer.base_at, timer.base_at + escalation.steps[step].after
        )
    if escalation.then == "stop":
        return Timer(timer.esc_round, step, timer.base_at, None)
    last = timer.base_at + escalation.steps[-1].after
    base = max(last, now) + config.repeat_interval - escalation.steps[0].after
    return Timer(timer.esc_round + 1, 0, base, base + escalation.steps[0].after)


def rebased(escalation: Escalation, timer: Timer, now: float) -> Timer:
    """The timer of an alert whose step comes due now after it was held (a silence ended):
    the rest of the round keeps its spacing from now on instead of firing all at once."""
    return Timer(timer.esc_round, timer.esc_step, now - escalation.steps[timer.esc_step].after, now)


def event_of(timer: Timer) -> str:
    """What the message of the step about to go out says: the first, a step on, a repeat."""
    if timer.esc_round > 0:
        return "repeat"
    return "firing" if timer.esc_step == 0 else "escalated"
