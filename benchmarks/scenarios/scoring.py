"""Scoring one run's anomalies against its ground truth, and the suite's overall figures.

- detected: some anomaly of severity warning or critical at or after the onset, within the
  run (its step at most the run's step count). "At or after the onset": its step is at
  least the onset, or, for anomalies dated by the clock (a hang noticed while no step
  completes carries the last step seen), its wall time is at least the onset step's start.
- delay: the first such anomaly's step minus the onset (0 when only its clock says it came
  after the onset), and the same in seconds from the onset step's start to the anomaly's
  ``wall_time``; alarm: seconds from the onset step's start to the anomaly's ``created_at``
  (when the collector recorded it, if the API says), transport and pipeline included.
- false alarms: every other anomaly before the onset, whatever its severity; on a healthy
  run, every anomaly.
- healthy steps: every step of a healthy run, and the steps before the onset of a fault run.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from benchmarks.scenarios.base import Outcome

ALARM = frozenset({"warning", "critical"})
Anomaly = dict[str, Any]


@dataclass
class Score:
    fault: bool
    detected: bool | None
    """None on a healthy run."""
    delay_steps: int | None = None
    delay_s: float | None = None
    alarm_s: float | None = None
    first: Anomaly | None = None
    kinds: list[str] = field(default_factory=list)
    """Kinds of the detecting anomalies, in the order they first appear."""
    false_alarms: int = 0
    false_alarm_kinds: dict[str, int] = field(default_factory=dict)
    healthy_steps: int = 0


def _after_onset(anomaly: Anomaly, onset: int, onset_time: float | None) -> bool:
    step = anomaly.get("step")
    if step is not None and step >= onset:
        return True
    wall = anomaly.get("wall_time")
    return onset_time is not None and wall is not None and wall >= onset_time


def _order(anomaly: Anomaly) -> tuple[float, float]:
    step = anomaly.get("step")
    wall = anomaly.get("wall_time")
    return (
        float(step) if step is not None else float("inf"),
        float(wall) if wall is not None else float("inf"),
    )


def score_run(outcome: Outcome, fault: bool, anomalies: list[Anomaly]) -> Score:
    onset = outcome.onset if fault else None
    if onset is None:
        kinds = Counter(str(a.get("kind")) for a in anomalies)
        return Score(
            fault,
            False if fault else None,
            false_alarms=len(anomalies),
            false_alarm_kinds=dict(kinds),
            healthy_steps=outcome.steps,
        )
    after = [a for a in anomalies if _after_onset(a, onset, outcome.onset_time)]
    before = [a for a in anomalies if not _after_onset(a, onset, outcome.onset_time)]
    hits = sorted(
        (
            a
            for a in after
            if a.get("severity") in ALARM and (a.get("step") is None or a["step"] <= outcome.steps)
        ),
        key=_order,
    )
    score = Score(
        fault,
        bool(hits),
        false_alarms=len(before),
        false_alarm_kinds=dict(Counter(str(a.get("kind")) for a in before)),
        healthy_steps=onset,
    )
    if hits:
        first = hits[0]
        score.first = first
        score.kinds = list(dict.fromkeys(str(a.get("kind")) for a in hits))
        step = first.get("step")
        score.delay_steps = max(0, int(step) - onset) if step is not None else None
        wall = first.get("wall_time")
        if wall is not None and outcome.onset_time is not None:
            score.delay_s = max(0.0, float(wall) - outcome.onset_time)
        created = first.get("created_at")
        if isinstance(created, int | float) and outcome.onset_time is not None:
            score.alarm_s = max(0.0, float(created) - outcome.onset_time)
    return score


@dataclass
class Summary:
    fault_runs: int
    detected_runs: int
    recall: float | None
    healthy_steps: int
    false_alarms: int
    false_alarms_per_1k_steps: float | None
    median_delay_steps: float | None
    median_delay_s: float | None
    median_alarm_s: float | None


def summarize(scores: list[Score]) -> Summary:
    faults = [s for s in scores if s.fault]
    detected = [s for s in faults if s.detected]
    healthy_steps = sum(s.healthy_steps for s in scores)
    false_alarms = sum(s.false_alarms for s in scores)
    delays = [s.delay_steps for s in detected if s.delay_steps is not None]
    delays_s = [s.delay_s for s in detected if s.delay_s is not None]
    alarms_s = [s.alarm_s for s in detected if s.alarm_s is not None]
    return Summary(
        fault_runs=len(faults),
        detected_runs=len(detected),
        recall=len(detected) / len(faults) if faults else None,
        healthy_steps=healthy_steps,
        false_alarms=false_alarms,
        false_alarms_per_1k_steps=1000 * false_alarms / healthy_steps if healthy_steps else None,
        median_delay_steps=statistics.median(delays) if delays else None,
        median_delay_s=statistics.median(delays_s) if delays_s else None,
        median_alarm_s=statistics.median(alarms_s) if alarms_s else None,
    )
