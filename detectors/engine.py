"""Per-run detection: which detectors watch which series, fed point by point, snapshotable.

An :class:`Engine` holds the detectors of one run. Series detectors are made on a series'
first point by the first :class:`Rule` patterns that match its key (a key no rule matches
costs one dictionary lookup per point from then on); run detectors are made with the engine
and fed every key matching their patterns. The whole engine pickles to bytes, so that a
restarted collector resumes where it stopped instead of warming up again.
"""

from __future__ import annotations

import fnmatch
import pickle
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from runwatch.detectors.base import Anomaly, RunDetector, SeriesDetector


@dataclass(frozen=True, slots=True)
class Rule:
    """Series whose key matches ``pattern`` (``fnmatch``) get ``detector(**options)``."""

    pattern: str
    detector: type[SeriesDetector]
    options: dict[str, Any] = field(default_factory=dict)

    def make(self) -> SeriesDetector:
        return self.detector(**self.options)


@dataclass(frozen=True, slots=True)
class RunRule:
    detector: type[RunDetector]
    options: dict[str, Any] = field(default_factory=dict)

    def make(self) -> RunDetector:
        return self.detector(**self.options)


class Engine:
    """The detectors of one run; ``observe`` points in order, ``check`` now and then."""

    def __init__(self, rules: Sequence[Rule], run_rules: Sequence[RunRule] = ()) -> None:
        self.rules = tuple(rules)
        self.run_detectors = [rule.make() for rule in run_rules]
        self._series: dict[tuple[str, int], list[SeriesDetector]] = {}
        self._matches: dict[str, tuple[tuple[Rule, ...], tuple[RunDetector, ...]]] = {}

    def observe(
        self, key: str, rank: int, step: int, value: float, wall_time: float
    ) -> list[Anomaly]:
        rules, listeners = self._route(key)
        if not rules and not listeners:
            return []
        found: list[Anomaly] = []
        if rules:
            detectors = self._series.get((key, rank))
            if detectors is None:
                detectors = self._series[(key, rank)] = [rule.make() for rule in rules]
                for detector in detectors:
                    detector.bind(key, rank)
            for detector in detectors:
                if (anomaly := detector.update(step, value, wall_time)) is not None:
                    found.append(anomaly)
        for listener in listeners:
            if (anomaly := listener.update(key, rank, step, value, wall_time)) is not None:
                found.append(anomaly)
        return found

    def observe_many(self, points: Iterable[tuple[str, int, int, float, float]]) -> list[Anomaly]:
        """``(key, rank, step, value, wall_time)`` in the order they were measured."""
        found: list[Anomaly] = []
        for key, rank, step, value, wall_time in points:
            found += self.observe(key, rank, step, value, wall_time)
        return found

    def check(self, now: float, heartbeats: dict[int, float]) -> list[Anomaly]:
        """Ask the run detectors about time passing (hangs, silent agents)."""
        found: list[Anomaly] = []
        for detector in self.run_detectors:
            found += detector.check(now, heartbeats)
        return found

    def snapshot(self) -> bytes:
        return pickle.dumps(self, protocol=pickle.HIGHEST_PROTOCOL)

    @staticmethod
    def restore(data: bytes) -> Engine:
        engine = pickle.loads(data)  # the collector's own database: trusted
        if not isinstance(engine, Engine):
            raise TypeError(f"not an engine snapshot: {type(engine).__name__}")
        return engine

    def _route(self, key: str) -> tuple[tuple[Rule, ...], tuple[RunDetector, ...]]:
        route = self._matches.get(key)
        if route is None:
            rules = tuple(r for r in self.rules if fnmatch.fnmatchcase(key, r.pattern))
            listeners = tuple(
                d
                for d in self.run_detectors
                if any(fnmatch.fnmatchcase(key, p) for p in d.patterns)
            )
            route = self._matches[key] = (rules, listeners)
        return route

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_matches"] = {}  # rebuilt on demand; rules may have changed with a release
        return state
