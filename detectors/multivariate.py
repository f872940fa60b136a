"""System outliers: a rank's system-metric vector far from every healthy state it was in.

The agent samples ``sys/*`` every 5 s on every rank (host CPU, memory, process RSS and CPU,
disk and network rates, and per GPU utilisation, memory, temperature and power), all the
keys of one sample at the trainer's current step and with the same wall time. The detector
reassembles each sample into a vector per rank (a sample is complete when every feature the
rank sends has arrived, or at the latest when the next sample begins) and judges it against
a *healthy window* of that rank's own samples:

1. **Scaling, per rank.** Each feature is centred on its median over the healthy window and
   divided by a robust spread: 1.4826 x its median absolute deviation, but at least a floor
   in the metric's own units (:data:`FLOORS`: 2 percentage points for ``*_percent``, 10 MB/s
   and 10 % for ``*_mb_s``, 50 MB and 5 % for ``*_gb``, 2 degrees for ``*temp_c``, 10 W and
   5 % for ``*power_w``, 5 % otherwise), so that a metric that was flat while the window was
   taken does not turn a wobble into a hundred deviations. Ranks differ (rank 0 logs, hosts
   differ) and are each measured against themselves.
2. **Distance to the healthy states.** The scaled healthy vectors of all ranks (at most
   ``reference_size``, the newest ranks' replacing the oldest) are the reference; a sample's
   score is its Euclidean distance to its ``k``-th nearest reference vector, divided by the
   typical such distance among the reference vectors themselves (leave-one-out, the median;
   at least :data:`MIN_REFERENCE_DISTANCE`). Multivariate, so a combination never seen
   healthy (host CPU up while the trainer's own CPU is not: a neighbour) counts, and
   ``k > 1`` lets a burst that happened once in the window (a checkpoint write) stay
   unusual.
3. **A finding** (``"system_outlier"``, warning) is ``sustained`` consecutive judged samples
   scoring at least ``threshold``; the message names the metrics that moved most and their
   healthy medians. One per rank and episode; the episode ends after as many samples below
   half the threshold (a score hovering around the threshold is one episode, not many).

Why a nearest-neighbour distance and not river's ``HalfSpaceTrees`` or scikit-learn's
``IsolationForest`` fitted on the same window (DESIGN.md names both): both partition the
healthy data's range, so a sample far outside it lands in the same cell, or is isolated as
fast, as the most extreme healthy sample. Measured on the simulated metrics the tests use
(an ``IsolationForest`` fitted on 60 scaled healthy samples): an RSS 0.3 GB above the
healthy 6 GB and one 10 GB above both score 0.55-0.57, *below* the 99th percentile of the
healthy samples' scores (0.62-0.64). A threshold would have to sit inside the healthy tail,
which bursty disk and network rates cross, and a benign drift just past the healthy range
would score like a failure. A distance grows with how far a sample is, in units of the
healthy spread, so the threshold has a meaning. It is also cheap: one vectorised pass over
``reference_size`` x features numbers per *sample* (~15 us), a dict insert per point.

Judged only while the trainer makes progress (the sample's step differs from the rank's
previous sample's): evaluations, checkpoint saves and hangs change the system metrics by
design and are other detectors' business (:class:`~runwatch.detectors.liveness.Liveness`).
The healthy window starts after ``skip`` such samples (start-up: data loading, compilation,
the allocator growing) and lasts ``window`` samples; with the agent's 5 s interval that is
1 minute then 5 minutes. Cumulative counters (``ecc_*``, ``xid_errors``: any rise is a
finding of its own, for a :class:`~runwatch.detectors.nonfinite.Positive`-style rule), a
constant (``mem_total_gb``) and a duplicate (``sys/mem_available_gb``) are left out
(``exclude``).

Defaults and why: ``threshold = 3`` (with a dozen features the typical healthy distance is
~1.6 floors, so one metric ~5-10 floors away, or several a few, make an outlier);
``k = 5``; ``sustained = 6`` samples (30 s: a fault that matters lasts minutes; a checkpoint
write burst, a noisy neighbour's spike or a one-sample utilisation dip does not). Measured
on simulated healthy metrics (bursty disk reads, checkpoint bursts, autocorrelated CPU,
network and power, wandering temperature, evaluations): no finding in 24 rank-runs of
8,000 samples (11 hours each); an RSS leak of 240 MB a minute found at +23 %, a throttled
GPU (+15 degrees, -35 % power), a CPU hog (+40 points) or a 70 % network drop 5-6 samples
after it began. ``reference_size = 256`` vectors (bounded: ~25 KB for a dozen features,
whatever the number of ranks and samples). A lasting change of regime (a new data
mixture's CPU load) is one finding per rank, not one per sample; the window is not
refitted.
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from typing import Any

import numpy as np

from runwatch.detectors.base import Anomaly, RunDetector, check_positive

DEFAULT_EXCLUDE: tuple[str, ...] = (
    "sys/*ecc_*",
    "sys/*xid_errors",
    "sys/*mem_total_gb",
    "sys/mem_available_gb",
)
FLOORS: tuple[tuple[str, float, float], ...] = (
    ("_percent", 2.0, 0.0),
    ("_mb_s", 10.0, 0.1),
    ("_gb", 0.05, 0.05),
    ("temp_c", 2.0, 0.0),
    ("power_w", 10.0, 0.05),
    ("", 0.0, 0.05),
)
"""(key suffix, absolute floor, floor relative to the median) of a feature's spread; first match."""
MIN_REFERENCE_DISTANCE = 1.0
"""Least healthy leave-one-out distance, in floors: a flat window does not make a hair-trigger."""
MAX_Z = 50.0
"""A scaled feature is clipped here, so that one broken metric cannot make a distance inf."""
RECOVERY = 0.5
"""An episode ends after ``sustained`` samples below this fraction of the threshold."""
TINY_SCALE = 1e-12
MAX_LISTED = 3
"""Features named in a message."""


class _Rank:
    """The sample being assembled for one rank, its healthy scaling and its episode."""

    __slots__ = (
        "above",
        "below",
        "done",
        "expected",
        "healthy",
        "median",
        "prev_step",
        "reported",
        "scale",
        "seen",
        "step",
        "values",
        "wall",
    )

    def __init__(self) -> None:
        self.wall = -math.inf  # wall time of the sample being assembled
        self.step = 0
        self.values: dict[str, float] = {}
        self.done = False  # that sample was complete and judged
        self.prev_step: int | None = None  # step of the previous sample
        self.seen = 0  # samples skipped as start-up
        self.healthy: list[dict[str, float]] = []  # the healthy window, until fitted
        self.median: Any = None  # per-feature healthy median (numpy), once fitted
        self.scale: Any = None  # per-feature healthy spread (numpy)
        self.expected = 0  # features this rank sends (known median)
        self.above = 0
        self.below = 0
        self.reported = False


class SystemOutlier(RunDetector):
    """Distance of a rank's scaled system-metric vector to the healthy reference.

    Parameters
    ----------
    threshold
        Score (distance over the healthy leave-one-out distance) of an outlying sample.
    k
        Nearest reference vectors: the score uses the ``k``-th.
    sustained
        Consecutive judged samples at or above ``threshold`` that make a finding (and below
        it that end the episode).
    skip
        Judged-eligible samples of a rank skipped before its healthy window.
    window
        Samples in a rank's healthy window.
    reference_size
        Most healthy vectors kept, over all ranks.
    exclude
        ``fnmatch`` patterns of ``sys/*`` keys left out.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> d = SystemOutlier(skip=2, window=30)
    >>> found = []
    >>> for i in range(100):  # one sample every 5 s, the trainer 10 steps further each time
    ...     rss = 4.0 + (0.1 * (i - 60) if i >= 60 else 0.0)  # leaking 100 MB per sample
    ...     sample = {"sys/cpu_percent": 40 + rng.normal(0, 3), "sys/proc_rss_gb": rss}
    ...     for key, value in sample.items():
    ...         found.append(d.update(key, 0, 10 * i, value, 5.0 * i))
    >>> [(a.kind, a.key, a.step) for a in found if a]
    [('system_outlier', 'sys/proc_rss_gb', 710)]
    """

    name = "system_outlier"
    patterns = ("sys/*",)

    def __init__(
        self,
        threshold: float = 3.0,
        k: int = 5,
        sustained: int = 6,
        skip: int = 12,
        window: int = 60,
        reference_size: int = 256,
        exclude: tuple[str, ...] = DEFAULT_EXCLUDE,
    ) -> None:
        check_positive(threshold=threshold)
        if k < 1 or sustained < 1 or skip < 0 or window < 2:
            raise ValueError(
                f"need k >= 1, sustained >= 1, skip >= 0, window >= 2, not {k}, {sustained}, "
                f"{skip}, {window}"
            )
        if reference_size < max(window, k + 1):
            raise ValueError(f"reference_size must be >= window and > k, not {reference_size}")
        self.threshold = threshold
        self.k = k
        self.sustained = sustained
        self.skip = skip
        self.window = window
        self.reference_size = reference_size
        self.exclude = tuple(exclude)
        self._reset()

    def _reset(self) -> None:
        self._ranks: dict[int, _Rank] = {}
        self._excluded: dict[str, bool] = {}  # key -> left out (a cache of the patterns)
        self._features: tuple[str, ...] = ()  # fixed by the first rank's healthy window
        self._index: dict[str, int] = {}
        self._floor_abs: Any = None
        self._floor_rel: Any = None
        self._reference: Any = None  # reference_size x features, scaled healthy vectors
        self._ref_n = 0  # rows in use
        self._ref_next = 0  # next row to replace once full
        self._ref_distance = MIN_REFERENCE_DISTANCE

    def update(
        self, key: str, rank: int, step: int, value: float, wall_time: float
    ) -> Anomaly | None:
        excluded = self._excluded.get(key)
        if excluded is None:
            excluded = self._excluded[key] = any(fnmatch.fnmatchcase(key, p) for p in self.exclude)
        if excluded or not math.isfinite(value):
            return None
        r = self._ranks.get(rank)
        if r is None:
            r = self._ranks[rank] = _Rank()
        found = None
        if wall_time != r.wall:
            if not wall_time > r.wall:  # older than the sample being assembled (or NaN)
                return None
            if not r.done and r.values:
                found = self._finish(rank, r)
            r.wall, r.step, r.values, r.done = wall_time, step, {}, False
        elif r.done:
            return None  # a late key of a sample judged complete
        if r.median is None:
            r.values[key] = value
            return found
        if key not in self._index:
            return found  # a key that appeared after the features were fixed
        r.values[key] = value
        if r.expected and len(r.values) >= r.expected:
            r.done = True
            return self._finish(rank, r) or found
        return found

    def score(self, rank: int, sample: dict[str, float]) -> float | None:
        """Score of ``sample`` (key -> value) for ``rank``; None before its window is fitted."""
        r = self._ranks.get(rank)
        if r is None or r.median is None:
            return None
        return self._score(r, sample)[0]

    def _finish(self, rank: int, r: _Rank) -> Anomaly | None:
        step, values = r.step, r.values
        progressing = r.prev_step is not None and step != r.prev_step
        r.prev_step = step
        if not progressing:
            return None
        if r.median is None:
            if r.seen < self.skip:
                r.seen += 1
            else:
                r.healthy.append(values)
                if len(r.healthy) >= self.window:
                    self._fit(r)
            return None
        score, z = self._score(r, values)
        if score < self.threshold:
            r.above = 0
            r.below = r.below + 1 if score < RECOVERY * self.threshold else 0
            if r.below >= self.sustained:
                r.reported = False
            return None
        r.above, r.below = r.above + 1, 0
        if r.reported or r.above < self.sustained:
            return None
        r.reported = True
        return self._finding(rank, r, step, score, z, values)

    def _vector(self, values: dict[str, float]) -> Any:
        x = np.full(len(self._features), np.nan)
        index = self._index
        for key, value in values.items():
            i = index.get(key)
            if i is not None:
                x[i] = value
        return x

    def _scaled(self, x: Any, r: _Rank) -> Any:
        z = (x - r.median) / r.scale
        z[~np.isfinite(z)] = 0.0  # a missing value, or a feature this rank never sent
        return np.clip(z, -MAX_Z, MAX_Z, out=z)

    def _score(self, r: _Rank, values: dict[str, float]) -> tuple[float, Any]:
        z = self._scaled(self._vector(values), r)
        diff = self._reference[: self._ref_n] - z
        d2 = np.einsum("ij,ij->i", diff, diff)
        k = min(self.k, self._ref_n) - 1
        kth = float(np.partition(d2, k)[k])
        return math.sqrt(kth) / self._ref_distance, z

    def _fit(self, r: _Rank) -> None:
        if not self._features:
            self._features = tuple(sorted({key for sample in r.healthy for key in sample}))
            self._index = {key: i for i, key in enumerate(self._features)}
            floors = [next(f for f in FLOORS if key.endswith(f[0])) for key in self._features]
            self._floor_abs = np.array([f[1] for f in floors])
            self._floor_rel = np.array([f[2] for f in floors])
            self._reference = np.zeros((self.reference_size, len(self._features)))
        x = np.array([self._vector(sample) for sample in r.healthy])
        with warnings.catch_warnings():  # a feature this rank never sent: an all-NaN column
            warnings.simplefilter("ignore", RuntimeWarning)
            median = np.nanmedian(x, axis=0)
            mad = 1.4826 * np.nanmedian(np.abs(x - median), axis=0)
        floor = np.maximum(self._floor_abs, self._floor_rel * np.abs(median))
        r.median = median
        r.scale = np.maximum(np.fmax(mad, floor), TINY_SCALE)
        r.expected = int(np.isfinite(median).sum())
        r.healthy = []
        for row in x:
            self._reference[self._ref_next] = self._scaled(row, r)
            self._ref_next = (self._ref_next + 1) % self.reference_size
            self._ref_n = min(self._ref_n + 1, self.reference_size)
        self._ref_distance = self._leave_one_out()

    def _leave_one_out(self) -> float:
        reference = self._reference[: self._ref_n]
        sq = np.einsum("ij,ij->i", reference, reference)
        d2 = sq[:, None] + sq[None, :] - 2 * reference @ reference.T
        np.fill_diagonal(d2, np.inf)
        k = min(self.k, self._ref_n - 1) - 1
        kth = np.partition(d2, k, axis=1)[:, k]
        spread = math.sqrt(max(float(np.median(kth)), 0.0))
        return max(spread, MIN_REFERENCE_DISTANCE)

    def _finding(
        self, rank: int, r: _Rank, step: int, score: float, z: Any, values: dict[str, float]
    ) -> Anomaly:
        order = np.argsort(-np.abs(z))[:MAX_LISTED]
        moved = [
            f"{self._features[i]} {values.get(self._features[i], math.nan):.4g} "
            f"(healthy {r.median[i]:.4g})"
            for i in order
            if z[i] != 0
        ]
        top = self._features[int(order[0])]
        return self.anomaly(
            "system_outlier",
            "warning",
            top,
            rank,
            step,
            score,
            f"rank {rank}'s system metrics have been unlike any healthy sample for "
            f"{r.above} samples (score {score:.1f}, threshold {self.threshold:g}): "
            f"{'; '.join(moved)}",
            samples=float(r.above),
            **{f"z:{self._features[i]}": float(z[i]) for i in order},
        )
