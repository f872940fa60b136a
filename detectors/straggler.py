"""Stragglers: one rank that makes the whole run slower.

The NVIDIA Resiliency Extension scores each rank's *relative performance* (a reference
time over the rank's own) and calls a rank a straggler below 0.75 (DESIGN.md, "Published
figures"): the run would go at least 1/0.75 = 1.33 times faster without it. Here the
reference is the median over the *other* ranks (with two ranks, the other one; with many,
the run's typical rank) and each rank's times are EWMAs of what the agent sends every step:

- ``train/step_time``: relative performance ``median(others) / own``. A rank whose steps take
  longer shows here when ranks do not wait for each other at every step (asynchronous or
  independent workers).
- ``train/data_wait``: under synchronous data parallelism every rank's step time is the
  same (the all-reduce makes the fast ranks wait for the slow one inside ``backward()``),
  so step times cannot name the culprit; a rank slowed *before* its forward (its data
  loader, its host, anything between ``optimizer.step()`` and the next forward) shows an
  excess data wait over the other ranks'. Its relative performance is
  ``1 - excess / own step time``: the share of the run's step that is not spent waiting for
  this rank. (A rank slowed inside its own forward/backward leaves no trace in either key
  under synchronous training; nothing the agent records per rank would name it.)

The score is the lower of the two; a finding (``"straggler"``, warning) is ``sustained``
consecutive steps of a rank below ``threshold``, once per episode (it ends after as many
steps at or above it). At least two ranks must have ``warmup`` observations.

Defaults and why: ``threshold = 0.75`` (NVIDIA); ``alpha = 0.05``, an EWMA over ~40 steps,
which shrinks the noise of a step time with a 30 % spread to ~5 %, so that a healthy rank's
score stays 5 deviations above 0.75 (measured: no finding in 400,000 rank-steps of 2-64
independent ranks with 10-30 % lognormal noise; 0.1 gave one); ``sustained = 10`` steps, so
that a straggler is a state and not a moment (a slow batch, a garbage collection). A rank
that turns 2x slower is reported 16-23 steps later. ``clip = 2``: one observation moves
the EWMA as if it were at most twice the current step time (for data waits: at most one
step time more than the current data wait), so that a rank-0-only evaluation or checkpoint
save between two steps (tens of seconds) is a blip, not a straggler; a lasting slowdown
still gets through within a few steps.

Bounded state: a few numbers per rank. The reference medians are recomputed after as many
step times as there are ranks, about once a step (a sort of the ranks' EWMAs, shared by
every rank's points of that step, in whatever order the ranks' batches arrive, rollbacks
included), so a point costs O(log ranks) amortised: ~1 us with 8 ranks or 256.
"""

from __future__ import annotations

import bisect
import math

from runwatch.detectors.base import Anomaly, RunDetector, check_positive

STEP_TIME = "train/step_time"
DATA_WAIT = "train/data_wait"


class _Rank:
    """EWMAs and episode counters of one rank."""

    __slots__ = (
        "above",
        "below",
        "cached_step",
        "cached_wait",
        "n",
        "reported",
        "step",
        "wait",
        "wait_n",
    )

    def __init__(self) -> None:
        self.n = 0  # step-time observations
        self.step = 0.0  # EWMA of the step time
        self.wait_n = 0  # data-wait observations
        self.wait = 0.0  # EWMA of the data wait
        self.cached_step: float | None = None  # the values in the sorted reference lists
        self.cached_wait: float | None = None
        self.below = 0  # consecutive judged steps below the threshold
        self.above = 0  # consecutive judged steps at or above it
        self.reported = False


class Straggler(RunDetector):
    """A rank whose relative performance stays below ``threshold`` for ``sustained`` steps.

    Parameters
    ----------
    threshold
        Relative performance (reference time / own time) below which a rank straggles.
    alpha
        EWMA weight of a new step time or data wait.
    sustained
        Consecutive steps below ``threshold`` that make a finding (and at or above it that
        end the episode).
    warmup
        Observations of a rank before it is judged or counted in the reference.
    clip
        Most an observation may weigh, as a multiple of the current step time.

    >>> d = Straggler()
    >>> found = []
    >>> for step in range(100):
    ...     for rank in range(4):  # rank 2 takes twice as long from step 50 on
    ...         t = 0.2 if rank == 2 and step >= 50 else 0.1
    ...         if a := d.update("train/step_time", rank, step, t, float(step)):
    ...             found.append((a.kind, a.rank, a.step, round(a.score, 2)))
    >>> found
    [('straggler', 2, 66, 0.63)]
    """

    name = "straggler"
    patterns = (STEP_TIME, DATA_WAIT)

    def __init__(
        self,
        threshold: float = 0.75,
        alpha: float = 0.05,
        sustained: int = 10,
        warmup: int = 10,
        clip: float = 2.0,
    ) -> None:
        check_positive(threshold=threshold, alpha=alpha)
        if not (threshold < 1 and alpha < 1):
            raise ValueError(f"need threshold < 1 and alpha < 1, not {threshold!r}, {alpha!r}")
        if sustained < 1 or warmup < 1 or not clip > 1:
            raise ValueError(
                f"need sustained >= 1, warmup >= 1 and clip > 1, not {sustained}, {warmup}, {clip}"
            )
        self.threshold = threshold
        self.alpha = alpha
        self.sustained = sustained
        self.warmup = warmup
        self.clip = clip
        self._reset()

    def _reset(self) -> None:
        self._ranks: dict[int, _Rank] = {}
        self._unsorted = 0  # step times learned since the reference lists were sorted
        self._steps: list[float] = []  # sorted step-time EWMAs of the warmed-up ranks
        self._waits: list[float] = []  # sorted data-wait EWMAs of the warmed-up ranks

    def update(
        self, key: str, rank: int, step: int, value: float, wall_time: float
    ) -> Anomaly | None:
        if not (value >= 0 and math.isfinite(value)):
            return None
        r = self._ranks.get(rank)
        if r is None:
            r = self._ranks[rank] = _Rank()
        if key == DATA_WAIT:
            r.wait_n += 1
            bound = r.wait + (self.clip - 1) * r.step if r.n and r.wait_n > 1 else value
            r.wait += max(self.alpha, 1 / r.wait_n) * (min(value, bound) - r.wait)
            return None
        if key != STEP_TIME:
            return None
        r.n += 1
        bound = self.clip * r.step if r.n > 1 else value
        r.step += max(self.alpha, 1 / r.n) * (min(value, bound) - r.step)
        self._unsorted += 1
        if self._unsorted >= len(self._ranks):  # about once a step, whatever the order
            self._unsorted = 0
            self._sort()
        if r.n < self.warmup or not r.step > 0:
            return None
        score, via = self.score(rank)
        if score is None:
            return None
        if score >= self.threshold:
            r.below, r.above = 0, r.above + 1
            if r.above >= self.sustained:
                r.reported = False
            return None
        r.below, r.above = r.below + 1, 0
        if r.reported or r.below < self.sustained:
            return None
        r.reported = True
        return self._finding(rank, r, step, score, via)

    def score(self, rank: int) -> tuple[float | None, str]:
        """Relative performance of ``rank`` now, and the key that shows it; pure."""
        r = self._ranks.get(rank)
        if r is None or r.n < self.warmup or not r.step > 0:
            return None, ""
        reference = _median_without(self._steps, r.cached_step)
        if reference is None:
            return None, ""
        score, via = reference / r.step, STEP_TIME
        if r.wait_n >= self.warmup:
            wait_reference = _median_without(self._waits, r.cached_wait)
            if wait_reference is not None:
                by_wait = 1 - max(0.0, r.wait - wait_reference) / r.step
                if by_wait < score:
                    score, via = by_wait, DATA_WAIT
        return score, via

    def _sort(self) -> None:
        steps: list[float] = []
        waits: list[float] = []
        for r in self._ranks.values():
            r.cached_step = r.cached_wait = None
            if r.n >= self.warmup:
                r.cached_step = r.step
                steps.append(r.step)
            if r.wait_n >= self.warmup:
                r.cached_wait = r.wait
                waits.append(r.wait)
        steps.sort()
        waits.sort()
        self._steps, self._waits = steps, waits

    def _finding(self, rank: int, r: _Rank, step: int, score: float, via: str) -> Anomaly:
        others = len(self._steps) - (r.cached_step is not None)
        reference = _median_without(self._steps, r.cached_step) or 0.0
        if via == DATA_WAIT:
            wait_reference = _median_without(self._waits, r.cached_wait) or 0.0
            what = (
                f"it waits {r.wait:.3g} s for its data before each step against "
                f"{wait_reference:.3g} s on the other {others} rank(s), in steps of "
                f"{r.step:.3g} s (its data loader, its host, or work between steps)"
            )
        else:
            wait_reference = math.nan
            what = (
                f"its steps take {r.step:.3g} s against {reference:.3g} s on the other "
                f"{others} rank(s)"
            )
        return self.anomaly(
            "straggler",
            "warning",
            via,
            rank,
            step,
            score,
            f"rank {rank} is a straggler at step {step}: relative performance {score:.2f} "
            f"(< {self.threshold}) for {r.below} steps; {what}",
            relative_performance=score,
            step_time=r.step,
            reference_step_time=reference,
            data_wait=r.wait,
            reference_data_wait=wait_reference,
            steps=float(r.below),
        )


def _median_without(ordered: list[float], own: float | None) -> float | None:
    """Median of ``ordered`` less one occurrence of ``own`` (None: nothing to leave out)."""
    n = len(ordered)
    skip = n if own is None else bisect.bisect_left(ordered, own)
    if skip < n and ordered[skip] != own:
        skip = n  # not there (cannot happen: cached values are what was sorted)
    m = n - (skip < n)
    if m < 1:
        return None

    def at(j: int) -> float:
        return ordered[j if j < skip else j + 1]

    return (at((m - 1) // 2) + at(m // 2)) / 2
